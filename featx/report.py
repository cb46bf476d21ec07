"""What verify and sweep found, as small frozen values with ``to_dict()``: one verified cut (``Report``),
a sweep's row (``Cut``) and the sweep (``Sweep``), and the notes a faithful verdict does not say.

They carry the model's anatomy (``featx.anatomy_values``: ``Anatomy``, ``Child``, ``Glue``, ...; what
inspect shows) and each mode's result (``featx.mode_result``: ``ModeResult``, ``NumericResult``), which
are importable from here too. The ``to_dict()`` keys are the JSON contract in docs/json.md. ``str()`` of a
value is its text for people (aligned tables and a one-line verdict), drawn by ``featx.render.text``; it is
never mixed with the JSON on stdout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from featx.anatomy_values import Anatomy, Glue
from featx.anatomy_values import Child as Child
from featx.anatomy_values import Container as Container
from featx.anatomy_values import Residual as Residual
from featx.cut import CutPath
from featx.mode_result import ModeResult
from featx.mode_result import NumericResult as NumericResult
from featx.vocab import AT_CUT, KEPT, LOST, GlueStatus


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
