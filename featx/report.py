"""What verify, sweep and inspect found, as small frozen values with ``to_dict()``.

The ``to_dict()`` keys are the JSON contract in docs/json.md. ``str()`` of a value is its text for people
(aligned tables and a one-line verdict), drawn by ``featx.render.text``; it is never mixed with the JSON on
stdout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from featx.cut import CutPath
from featx.vocab import (
    AT_CUT,
    DROPPED,
    KEPT,
    LOST,
    GlueStatus,
    Method,
    NumericVerdict,
    ResidualStatus,
    Shortcut,
)


@dataclass(frozen=True)
class Child:
    """A direct child of the model as the full forward saw it."""

    index: int
    name: str
    type: str
    calls: Mapping[str, int]  # mode -> how many times the full forward called it
    output_shape: tuple[int, ...] | None  # None when it returned no single tensor, or never returned
    residuals: int
    projections: int
    # mode -> None when it was called once with exactly what its predecessor returned, else why not
    feed: Mapping[str, str | None]

    def to_dict(self, kept: int | None = None) -> dict[str, object]:
        out: dict[str, object] = {"index": self.index, "name": self.name, "type": self.type}
        if kept is not None:
            out["kept"] = self.index < kept
        out.update(
            calls=dict(self.calls),
            output_shape=list(self.output_shape) if self.output_shape is not None else None,
            residuals=self.residuals,
            feed=dict(self.feed),
        )
        return out


@dataclass(frozen=True)
class Glue:
    """An op the root's own ``forward()`` performs outside every child."""

    op: str
    source: str
    after: str | None  # the child that returned before it; None at the model's input
    before: str | None  # the child called after it; None at the model's output
    after_index: int | None
    before_index: int | None
    modes: tuple[str, ...]
    count: int = 1  # calls per forward, in the mode that made most
    # The root calls this child's own children itself, as calling it would (``for block in self.stages:
    # x = block(x)`` over an ``nn.Sequential``): the glue is that child's, kept with it.
    inside: int | None = None
    container: str = ""  # whose forward performs it: "" the root, else a container's dotted name

    def status(self, kept: int, keep_glue: bool = False, last: bool = False) -> GlueStatus:
        """``lost`` before the last kept child, ``at_cut`` right after it, ``dropped`` with the tail.

        With ``keep_glue`` (the cut is a ``KeepGlue`` module) what would be lost is ``kept``, and so is the
        glue after the last child when the cut is at the last child (``last``): the module returns the
        model's output.
        """
        if self.inside is not None:
            return KEPT if self.inside < kept else DROPPED
        if self.before_index is not None and self.before_index < kept:
            return KEPT if keep_glue else LOST
        if self.after_index == kept - 1:
            return KEPT if keep_glue and last and self.before_index is None else AT_CUT
        if self.after_index is None and self.before_index is None:
            return KEPT if keep_glue else LOST
        return DROPPED

    def status_at(self, path: CutPath, keep_glue: bool = False, last: bool = False) -> GlueStatus:
        """The status relative to a cut that may be nested. Glue of a container the truncated model
        replaces by its kept children (the root, a container the cut passes through or runs child by
        child) is ``lost`` when it runs before some module the truncated model still runs after it,
        ``at_cut`` when it is applied right to the cut's last output, else ``dropped``; glue of a
        container inside a kept module is ``kept`` (the module runs whole), inside a dropped one
        ``dropped``. With ``keep_glue`` (the cut is a ``KeepGlue`` module, which runs the forward of the
        root and of each container on the path up to the cut) what would be ``lost`` is ``kept``."""
        if self.inside is not None and not self.container:  # a Sequential child the root iterates
            return (
                self.status(path.kept, keep_glue, last)
                if path.whole(path.levels[0].names[self.inside])
                else DROPPED
            )
        level = next((lv for lv in path.levels if lv.container == self.container), None)
        if level is None:
            inside = any(self.container.startswith(unit + ".") for unit in path.units())
            return KEPT if inside else DROPPED
        if not path.nested:
            return self.status(level.kept, keep_glue, last)
        lost: GlueStatus = KEPT if keep_glue else LOST
        k = level.kept
        if self.before_index is not None and self.before_index < k:
            return lost
        if self.after_index is None:
            return lost if self.before_index is None else DROPPED
        if self.after_index >= k:
            return DROPPED
        units = path.units()
        after = level.names[self.after_index]
        end = max(i for i, u in enumerate(units) if u == after or u.startswith(after + "."))
        if end < len(units) - 1:
            return lost  # the truncated model runs on after that child, without this op
        return AT_CUT if path.whole(after) else DROPPED

    def to_dict(
        self, kept: int | CutPath | None = None, keep_glue: bool = False, last: bool = False
    ) -> dict[str, object]:
        out: dict[str, object] = {
            "op": self.op,
            "source": self.source,
            "after": self.after,
            "before": self.before,
            "modes": list(self.modes),
            "count": self.count,
            "container": self.container,
        }
        if isinstance(kept, CutPath):
            out["status"] = self.status_at(kept, keep_glue)
        elif kept is not None:
            out["status"] = self.status(kept, keep_glue, last)
        return out

    def label(self) -> str:
        return f"`{self.op}` ({self.source})"


@dataclass(frozen=True)
class Residual:
    """A merge of two activation tensors (an add) inside ``module``."""

    module: str  # "" is the root itself
    child: str | None
    child_index: int | None
    shortcut: Shortcut
    source: str
    modes: tuple[str, ...]

    def status(self, kept: int) -> ResidualStatus:
        if self.child_index is None:
            return LOST
        return KEPT if self.child_index < kept else DROPPED

    def status_at(self, path: CutPath, keep_glue: bool = False, last: bool = False) -> ResidualStatus:
        """Relative to a cut that may be nested: ``kept`` inside a kept module, ``lost`` when the root or
        a container the cut passes through merges (its Sequential stand-in does not), else ``dropped``."""
        if not path.nested:
            return self.status(path.kept)
        if any(self.module == unit or self.module.startswith(unit + ".") for unit in path.units()):
            return KEPT
        return LOST if self.module in path.containers() else DROPPED

    def to_dict(self, kept: int | CutPath | None = None) -> dict[str, object]:
        out: dict[str, object] = {
            "module": self.module,
            "child": self.child,
            "shortcut": self.shortcut,
            "source": self.source,
            "modes": list(self.modes),
        }
        if isinstance(kept, CutPath):
            out["status"] = self.status_at(kept)
        elif kept is not None:
            out["status"] = self.status(kept)
        return out


@dataclass(frozen=True)
class NumericResult:
    """One mode of a cut judged in a numeric setting other than float32 eager (``featx.numeric_check``):
    the tolerance of the dtype the forward computes in, and the errors of the full model and of the cut
    against the full model run in float64, in units of that tolerance (``error``: the largest
    ``|a - b| / (atol + rtol * |b|)`` over the elements, ``b`` the float64 value; 1 is the tolerance's edge)."""

    dtype: str  # the dtype the forward computes in (bfloat16 under CPU autocast)
    rtol: float
    atol: float
    model_error: float | None  # the full model in the setting against float64; None: not comparable
    cut_error: float | None  # the cut in the setting against the full model in float64
    factor: float  # faithful needs cut_relative_error <= factor * max(model_relative_error, the dtype's eps)
    float64_diff: float | None  # largest |cut - full| with both in float64 (0 for a faithful cut)
    verdict: NumericVerdict
    compiled: bool = False  # the cut ran compiled (torch.compile)
    # ||a - b|| / ||b|| against float64 over the whole value: what the factor judges
    model_relative_error: float | None = None
    cut_relative_error: float | None = None

    @property
    def ok(self) -> bool:
        return self.verdict == "faithful"

    def failure(self) -> str | None:
        """Why an otherwise equal cut is not faithful, without numbers; None when it is or it differs."""
        if self.verdict == "below_resolution":
            return (
                f"equal to the full model within {self.dtype}'s tolerance, but not in float64: a difference "
                f"below what {self.dtype} can show"
            )
        if self.verdict == "beyond_factor":
            return (
                f"further from the float64 full model than {self.factor:g} times the full model's own "
                f"{self.dtype} error"
            )
        if self.verdict == "no_float64":
            return (
                "the model or the cut does not run in float64, so there is no float64 reference to judge by"
            )
        return None

    def reason(self) -> str | None:
        """``failure`` with the numbers."""
        if self.verdict == "below_resolution":
            return (
                f"the truncated output equals the full model's within {self.dtype}'s tolerance (rtol "
                f"{self.rtol:g}, atol {self.atol:g}), but in float64 they differ by up to "
                f"{self.float64_diff:.6g}: a difference below what {self.dtype} can show"
            )
        if self.verdict == "beyond_factor":
            return (
                f"the truncated output's relative error against the float64 full model is "
                f"{_number(self.cut_relative_error)}, more than {self.factor:g} times the full model's own "
                f"{self.dtype} error ({_number(self.model_relative_error)}, at least {self.dtype}'s eps)"
            )
        if self.verdict == "no_float64":
            return self.failure()
        return None

    def to_dict(self) -> dict[str, object]:
        return {
            "dtype": self.dtype,
            "tolerance": {"rtol": self.rtol, "atol": self.atol},
            "model_error": self.model_error,
            "cut_error": self.cut_error,
            "model_relative_error": self.model_relative_error,
            "cut_relative_error": self.cut_relative_error,
            "factor": self.factor,
            "float64_max_abs_diff": self.float64_diff,
            "compiled": self.compiled,
            "verdict": self.verdict,
        }


def _number(value: float | None) -> str:
    return "not comparable" if value is None else f"{value:.3g}"


@dataclass(frozen=True)
class ModeResult:
    """The truncated model against the full model's value at the cut, in one mode."""

    max_abs_diff: float | None  # None when there is nothing to subtract (error, other shapes)
    equal: bool  # within atol/rtol; NaN and Inf never count as equal
    error: str | None = None  # what the truncated model raised
    mismatch: str | None = None  # why the outputs could not be compared value by value
    nonfinite: int = 0  # positions where either output is NaN or infinite
    method: Method = "run"  # run: the Sequential was executed; derived: follows from the recorded forward
    # keep_glue: the same module, after the comparison on the example input held, on a fresh input it was
    # not built with (other values, and another batch and spatial size where the model takes them); when
    # that one fails, the fields above are its own
    fresh: ModeResult | None = None
    fresh_shape: tuple[int, ...] | None = None  # the fresh input's shape (None: not one tensor)
    element: str | None = None  # in an output of several tensors, the one that differs most (``[1]``)
    # in a numeric setting other than float32 eager: the dtype's tolerance and the float64 errors
    numerics: NumericResult | None = None
    # whether the comparison sees a difference just above the tolerance (featx.sensitivity); None: not
    # checked (the comparison failed, or a sweep's); when False, ``blind`` says why it cannot
    sensitive: bool | None = None
    blind: str | None = None
    # whether the full model's output changes when the value at the cut does (featx.sensitivity.depends);
    # None: not checked, or it cannot be told (the cut's module never ran in this mode)
    output_depends_on_cut: bool | None = None

    @property
    def ok(self) -> bool:
        """Equal within the tolerance, nothing raised or mismatched, the comparison not blind, and in a
        numeric setting the float64 check passed."""
        return (
            self.equal
            and self.error is None
            and self.mismatch is None
            and self.sensitive is not False
            and (self.numerics is None or self.numerics.ok)
        )

    def with_fresh(self, fresh: ModeResult, shape: tuple[int, ...] | None) -> ModeResult:
        """This result (ok, on the input the module was built with) and ``fresh`` as one: ``fresh``'s fields
        where it fails, so every reader of them sees the failure; else the larger difference of the two."""
        if not fresh.ok:
            return replace(fresh, method=self.method, fresh=fresh, fresh_shape=shape)
        diffs = [d for d in (self.max_abs_diff, fresh.max_abs_diff) if d is not None]
        return replace(self, max_abs_diff=max(diffs, default=None), fresh=fresh, fresh_shape=shape)

    @property
    def failed_fresh(self) -> bool:
        """Right on the input the module was built with, wrong on a fresh one."""
        return self.fresh is not None and not self.fresh.ok

    def _on(self) -> str:
        if not self.failed_fresh:
            return ""
        shape = f" of shape {list(self.fresh_shape)}" if self.fresh_shape is not None else ""
        return f", on a fresh input{shape} (not the one the module was built with):"

    def reason(self, mode: str) -> str:
        """The sentence ``reasons`` gives for this result in ``mode`` when it is not ok."""
        head = f"in {mode} mode{self._on()} "
        if self.error is not None:
            return f"{head}the truncated model raised {self.error}"
        if self.mismatch is not None:
            return f"{head}{self.mismatch}"
        if self.nonfinite:
            return (
                f"{head}{self.nonfinite} values at the cut are NaN or infinite (they never count as equal)"
                + (f"; elsewhere they differ by up to {self.max_abs_diff:.6g}" if self.max_abs_diff else "")
            )
        numeric = self.numerics.reason() if self.numerics is not None and self.equal else None
        if numeric is not None:
            return f"{head}{numeric}"
        if self.sensitive is False:
            return f"{head}the comparison cannot fail, so it proves nothing: {self.blind}"
        at = f" (most at element {self.element})" if self.element else ""
        return (
            f"{head}the truncated output differs from the full model's by up to {self.max_abs_diff:.6g}{at}"
        )

    def failure(self) -> str:
        """What went wrong, without the mode and without the numbers that vary from cut to cut: what a
        sweep groups its cuts by."""
        on = "on a fresh input (not the one the module was built with): " if self.failed_fresh else ""
        if self.error is not None:
            return f"{on}the truncated model raised {self.error}"
        if self.mismatch is not None:
            return f"{on}{self.mismatch}"
        if self.nonfinite:
            return f"{on}values at the cut are NaN or infinite (they never count as equal)"
        numeric = self.numerics.failure() if self.numerics is not None and self.equal else None
        if numeric is not None:
            return f"{on}{numeric}"
        if self.sensitive is False:
            return f"{on}the comparison cannot fail, so it proves nothing: {self.blind}"
        return f"{on}the truncated output differs from the full model's (max abs diff in the table)"

    def to_dict(self, keep_glue: bool = False) -> dict[str, object]:
        """With ``keep_glue`` (a keep_glue module's result) also ``fresh``: the comparison on the fresh
        input with its ``input_shape``, or None where none ran (the example input already differed)."""
        out: dict[str, object] = {
            "max_abs_diff": self.max_abs_diff,  # over positions finite in both outputs
            "equal": self.equal,
            "error": self.error,
            "mismatch": self.mismatch,
            "nonfinite": self.nonfinite,
            "method": self.method,
            "numerics": self.numerics.to_dict() if self.numerics is not None else None,
            "sensitive": self.sensitive,
            "output_depends_on_cut": self.output_depends_on_cut,
        }
        if keep_glue:
            out["fresh"] = None
            if self.fresh is not None:
                shape = list(self.fresh_shape) if self.fresh_shape is not None else None
                fresh = {
                    k: v
                    for k, v in self.fresh.to_dict().items()
                    if k not in ("method", "numerics", "output_depends_on_cut")
                }
                out["fresh"] = {"input_shape": shape, **fresh}
        return out


@dataclass(frozen=True)
class Container:
    """A module inside the model whose children featx tracked as it tracks the root's (for nested cuts).

    ``children`` are named dotted from the root; their ``index`` is the position in the container.
    """

    name: str
    type: str
    children: tuple[Child, ...]

    def to_dict(self, path: CutPath | None = None) -> dict[str, object]:
        level = next((lv for lv in path.levels if lv.container == self.name), None) if path else None
        out: dict[str, object] = {"name": self.name, "type": self.type}
        if level is not None:
            out["kept"] = level.kept
        out["children"] = [c.to_dict(level.kept if level is not None else None) for c in self.children]
        return out


@dataclass(frozen=True)
class Anatomy:
    """The model as the instrumented full forward saw it, before any cut: what ``featx inspect`` shows."""

    model: str
    model_class: str
    input_shape: tuple[int, ...] | None
    modes: tuple[str, ...]
    children: tuple[Child, ...]
    glue: tuple[Glue, ...]
    residuals: tuple[Residual, ...]
    full_errors: Mapping[str, str | None]  # mode -> what the full forward raised
    containers: tuple[Container, ...] = ()  # tracked for nested cuts, outermost first
    environment: dict[str, object] = field(default_factory=dict)  # featx.numerics.environment() of the run

    def unit(self, name: str) -> Child:
        """A child of the root or of a tracked container, by its dotted name."""
        for child in (*self.children, *(c for k in self.containers for c in k.children)):
            if child.name == name:
                return child
        raise KeyError(name)

    def to_dict(self, kept: int | CutPath | None = None, keep_glue: bool = False) -> dict[str, object]:
        path, root_kept = (kept, kept.kept) if isinstance(kept, CutPath) else (None, kept)
        last = root_kept == len(self.children) and path is None
        out: dict[str, object] = {
            "model": self.model,
            "model_class": self.model_class,
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
            "children": [c.to_dict(root_kept) for c in self.children],
            "glue": [g.to_dict(kept, keep_glue, last) for g in self.glue],
            "residuals": [r.to_dict(kept) for r in self.residuals],
            "full_model_errors": dict(self.full_errors),
        }
        if self.containers:
            out["containers"] = [c.to_dict(path) for c in self.containers]
        out["environment"] = dict(self.environment)
        return out

    def __str__(self) -> str:
        from featx.render.text import anatomy_text

        return anatomy_text(self)


def discarded_modes(modes: Mapping[str, ModeResult]) -> list[str]:
    """The modes in which the full model's output does not depend on the value at the cut."""
    return [m for m, r in modes.items() if r.output_depends_on_cut is False]


def discarded_note(upto: str, modes: Mapping[str, ModeResult]) -> str | None:
    """The note for a cut whose value the model's output does not depend on, in the modes it does not."""
    off = discarded_modes(modes)
    if not off:
        return None
    return (
        f"the model's output does not depend on `{upto}`'s value in {' and '.join(off)} mode (it discards it): "
        "a tap there is legal, but nothing the model returns is computed from it"
    )


class Verdict:
    """What a verified cut (``Report``, a sweep's ``Cut``) says by its per-mode results: faithful or not."""

    modes: Mapping[str, ModeResult]

    @property
    def faithful(self) -> bool:
        """In every mode checked, the truncated model ran and equals the full model at the cut."""
        return bool(self.modes) and all(r.ok for r in self.modes.values())


@dataclass(frozen=True)
class Report(Verdict):
    """``featx.verify``'s answer for one cut."""

    anatomy: Anatomy
    upto: str  # the child name, or the dotted path of a nested cut
    kept: int  # root children the cut touches (a nested cut's container counts, partly kept)
    modes: Mapping[str, ModeResult]
    reasons: tuple[str, ...]
    keep_glue: bool = False  # the truncated model is featx.truncate(..., keep_glue=True)
    path: CutPath | None = None  # level by level; None is a cut between the root's children
    numerics: Mapping[str, object] | None = None  # the numeric setting it ran in (Numerics.to_dict())
    environment: dict[str, object] = field(default_factory=dict)  # where the forward ran (docs/json.md)

    def glue_status(self, glue: Glue) -> GlueStatus:
        """The glue's status at this cut: ``Glue.status_at`` for a nested cut, else ``Glue.status``."""
        if self.path is not None and self.path.nested:
            return glue.status_at(self.path, self.keep_glue)
        return glue.status(self.kept, self.keep_glue, self.kept == len(self.anatomy.children))

    @property
    def notes(self) -> tuple[str, ...]:
        """What a faithful verdict does not say: the glue the full model applies to the last kept child's
        output before the next child (``at_cut``), which the truncated model returns without; and a value at
        the cut the model's output does not depend on (``discarded_note``)."""
        discarded = discarded_note(self.upto, self.modes)
        at_cut = [g for g in self.anatomy.glue if self.glue_status(g) == AT_CUT]
        if not at_cut:
            return (discarded,) if discarded else ()
        last = self.path.upto if self.path is not None else self.anatomy.children[self.kept - 1].name
        notes = []
        for before in dict.fromkeys(g.before for g in at_cut):
            ops = [g for g in at_cut if g.before == before]
            applied = ", ".join(
                f"`{g.op}` ({g.source}"
                + (f", {' and '.join(g.modes)} only" if set(g.modes) != set(self.anatomy.modes) else "")
                + ")"
                for g in ops
            )
            where = f"before `{before}` sees it" if before else "before returning it"
            notes.append(
                f"glue at the cut: the full model applies {applied} to the output of `{last}` {where}; "
                "the truncated model returns that output as it is"
            )
        return (*notes, discarded) if discarded else tuple(notes)

    @property
    def cut(self) -> Cut:
        """This cut as a sweep reports it: the same ``Cut``, its ``to_dict()`` the same row."""
        return Cut.of(
            self.anatomy,
            self.upto,
            self.kept,
            self.modes,
            self.reasons,
            keep_glue=self.keep_glue,
            path=self.path,
        )

    def to_dict(self) -> dict[str, object]:
        base = self.anatomy.to_dict(
            self.path if self.path is not None and self.path.nested else self.kept, self.keep_glue
        )
        out = {
            "model": base["model"],
            "model_class": base["model_class"],
            "input_shape": base["input_shape"],
            "upto": self.upto,
            "kept": self.kept,
            "keep_glue": self.keep_glue,
            "children": base["children"],
            "glue": base["glue"],
            "residuals": base["residuals"],
            "modes": {m: r.to_dict(self.keep_glue) for m, r in self.modes.items()},
            "faithful": self.faithful,
            "reasons": list(self.reasons),
            "notes": list(self.notes),
            "full_model_errors": base["full_model_errors"],
            "numerics": dict(self.numerics) if self.numerics is not None else None,
        }
        if "containers" in base:
            out["containers"] = base["containers"]
        out["environment"] = dict(self.environment)
        return out

    def __str__(self) -> str:
        from featx.render.text import report_text

        return report_text(self)


@dataclass(frozen=True)
class Cut(Verdict):
    """One cut point of a sweep; ``Report.cut`` is a verified cut's."""

    upto: str
    kept: int
    modes: Mapping[str, ModeResult]
    lost_glue: tuple[Glue, ...]
    reasons: tuple[str, ...]
    keep_glue: bool = False  # the cut was made with keep_glue
    kept_glue: tuple[Glue, ...] = ()  # glue the keep_glue module carries
    refused: str | None = None  # why keep_glue could not make this cut
    path: CutPath | None = None  # None: a cut between the root's children

    @classmethod
    def of(
        cls,
        anatomy: Anatomy,
        upto: str,
        kept: int,
        modes: Mapping[str, ModeResult],
        reasons: tuple[str, ...],
        *,
        keep_glue: bool = False,
        refused: str | None = None,
        path: CutPath | None = None,
    ) -> Cut:
        """The row of the cut at ``upto``, what a sweep and ``Report.cut`` both give: the glue it loses and,
        with ``keep_glue``, the glue the keep_glue module carries, by each glue's status at the cut.

        The glue is the root's and that of the containers ``path`` passes through (the root's alone without
        a path). A cut keep_glue ``refused`` is a plain cut to its glue: no module carries it.
        """
        by_module = keep_glue and refused is None
        last = kept == len(anatomy.children)
        if path is None:
            statuses = [(g, g.status(kept, by_module, last)) for g in anatomy.glue if not g.container]
        else:
            containers = path.containers()
            statuses = [
                (g, g.status_at(path, by_module, last)) for g in anatomy.glue if g.container in containers
            ]
        return cls(
            upto,
            kept,
            modes,
            tuple(g for g, status in statuses if status == LOST),
            reasons,
            keep_glue=keep_glue,
            kept_glue=tuple(g for g, status in statuses if status == KEPT) if keep_glue else (),
            refused=refused,
            path=path,
        )

    @property
    def depth(self) -> int:
        """1 for a cut between the root's children, 2 inside a child, and so on: by ``upto`` alone, so the
        same cut has the same depth whether a sweep or a config's taps made its path."""
        return self.upto.count(".") + 1

    def to_dict(self) -> dict[str, object]:
        where: int | CutPath = self.path if self.path is not None and self.path.nested else self.kept
        out: dict[str, object] = {
            "upto": self.upto,
            "kept": self.kept,
            "depth": self.depth,
            "faithful": self.faithful,
            "modes": {m: r.to_dict(self.keep_glue) for m, r in self.modes.items()},
            "lost_glue": [g.to_dict(where) for g in self.lost_glue],
            "reasons": list(self.reasons),
        }
        if self.keep_glue:
            out.update(
                keep_glue=True,
                kept_glue=[{**g.to_dict(), "status": KEPT} for g in self.kept_glue],
                refused=self.refused,
            )
        return out


@dataclass(frozen=True)
class Sweep:
    """``featx.sweep``'s answer: every cut point 1..number of children."""

    anatomy: Anatomy
    cuts: tuple[Cut, ...]
    numerics: Mapping[str, object] | None = None  # the numeric setting it ran in (Numerics.to_dict())
    environment: dict[str, object] = field(default_factory=dict)  # where the forwards ran (docs/json.md)

    def to_dict(self) -> dict[str, object]:
        base = self.anatomy.to_dict()
        return {
            "model": base["model"],
            "model_class": base["model_class"],
            "input_shape": base["input_shape"],
            "cuts": [c.to_dict() for c in self.cuts],
            "children": base["children"],
            "glue": base["glue"],
            "residuals": base["residuals"],
            "full_model_errors": base["full_model_errors"],
            **({"containers": base["containers"]} if "containers" in base else {}),
            "numerics": dict(self.numerics) if self.numerics is not None else None,
            "environment": dict(self.environment),
        }

    def grouped_reasons(self) -> list[tuple[str, str]]:
        """The unfaithful cuts' reasons, each cause once with the cuts it explains: ``("`fc`, `head`",
        "glue `flatten` (...) runs before `fc` ... and is lost")``. A mode's comparison is grouped by what
        went wrong (the same error, "differs"), its numbers are in the table."""
        causes: dict[str, list[Cut]] = {}
        failures: dict[str, dict[str, list[Cut]]] = {}  # failure -> mode -> cuts
        for c in self.cuts:
            failing = {m: r for m, r in c.modes.items() if not r.ok}
            said = {r.reason(m) for m, r in failing.items()}
            for reason in c.reasons:
                if reason not in said:
                    causes.setdefault(reason, []).append(c)
            if c.refused is not None:  # keep_glue's refusal is the cause, said once above
                continue
            for m, r in failing.items():
                failures.setdefault(r.failure(), {}).setdefault(m, []).append(c)
        order = {c.upto: i for i, c in enumerate(self.cuts)}
        grouped = [(_cuts_text(cuts, order), reason) for reason, cuts in causes.items()]
        for failure, per_mode in failures.items():
            by_cuts: dict[tuple[str, ...], list[str]] = {}  # by upto: nested cuts share `kept`
            for m, cuts in per_mode.items():
                by_cuts.setdefault(tuple(c.upto for c in cuts), []).append(m)
            for uptos, modes in by_cuts.items():
                cuts = [c for c in self.cuts if c.upto in uptos]
                grouped.append((_cuts_text(cuts, order), f"in {' and '.join(modes)} mode {failure}"))
        return grouped

    def __str__(self) -> str:
        from featx.render.text import sweep_text

        return sweep_text(self)


def _cuts_text(cuts: Sequence[Cut], order: Mapping[str, int]) -> str:
    """```fc``` or ```fc``, ``head``` — or, for a run of more than three neighbouring cuts (``order``: each
    cut's place in the sweep), ```blocks` … `head` (12 cuts)``."""
    places = [order[c.upto] for c in cuts]
    if len(cuts) > 3 and places == list(range(places[0], places[0] + len(places))):
        return f"`{cuts[0].upto}` … `{cuts[-1].upto}` ({len(cuts)} cuts)"
    return ", ".join(f"`{c.upto}`" for c in cuts)
