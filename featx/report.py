"""What verify, sweep and inspect found, as small frozen values with ``to_dict()`` and a text rendering.

The ``to_dict()`` keys are the JSON contract in DESIGN.md; the text is for people (aligned tables and a
one-line verdict) and is never mixed with the JSON on stdout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from featx.truncate import CutPath

KEPT, DROPPED, LOST, AT_CUT = "kept", "dropped", "lost", "at_cut"


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
    container: str = ""  # whose forward performs it: "" the root, else a container's dotted name

    def status(self, kept: int) -> str:
        """``lost`` before the last kept child, ``at_cut`` right after it, ``dropped`` with the tail."""
        if self.before_index is not None and self.before_index < kept:
            return LOST
        if self.after_index == kept - 1:
            return AT_CUT
        if self.after_index is None and self.before_index is None:
            return LOST
        return DROPPED

    def status_at(self, path: CutPath) -> str:
        """The status relative to a cut that may be nested. Glue of a container the truncated model
        replaces by its kept children (the root, a container the cut passes through or runs child by
        child) is ``lost`` when it runs before some module the truncated model still runs after it,
        ``at_cut`` when it is applied right to the cut's last output, else ``dropped``; glue of a
        container inside a kept module is ``kept`` (the module runs whole), inside a dropped one
        ``dropped``."""
        level = next((lv for lv in path.levels if lv.container == self.container), None)
        if level is None:
            inside = any(self.container.startswith(unit + ".") for unit in path.units())
            return KEPT if inside else DROPPED
        if not path.nested:
            return self.status(level.kept)
        k = level.kept
        if self.before_index is not None and self.before_index < k:
            return LOST
        if self.after_index is None:
            return LOST if self.before_index is None else DROPPED
        if self.after_index >= k:
            return DROPPED
        units = path.units()
        after = level.names[self.after_index]
        last = max(i for i, u in enumerate(units) if u == after or u.startswith(after + "."))
        if last < len(units) - 1:
            return LOST  # the truncated model runs on after that child, without this op
        return AT_CUT if path.whole(after) else DROPPED

    def to_dict(self, kept: int | CutPath | None = None) -> dict[str, object]:
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
            out["status"] = self.status_at(kept)
        elif kept is not None:
            out["status"] = self.status(kept)
        return out

    def label(self) -> str:
        return f"`{self.op}` ({self.source})"


@dataclass(frozen=True)
class Residual:
    """A merge of two activation tensors (an add) inside ``module``."""

    module: str  # "" is the root itself
    child: str | None
    child_index: int | None
    shortcut: str  # identity | projection | other
    source: str
    modes: tuple[str, ...]

    def status(self, kept: int) -> str:
        if self.child_index is None:
            return LOST
        return KEPT if self.child_index < kept else DROPPED

    def status_at(self, path: CutPath) -> str:
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
class ModeResult:
    """The truncated model against the full model's value at the cut, in one mode."""

    max_abs_diff: float | None  # None when there is nothing to subtract (error, other shapes)
    equal: bool  # within atol/rtol; NaN and Inf never count as equal
    error: str | None = None  # what the truncated model raised
    mismatch: str | None = None  # why the outputs could not be compared value by value
    nonfinite: int = 0  # positions where either output is NaN or infinite
    method: str = "run"  # run: the Sequential was executed; derived: follows from the recorded forward

    @property
    def ok(self) -> bool:
        return self.equal and self.error is None and self.mismatch is None

    def to_dict(self) -> dict[str, object]:
        return {
            "max_abs_diff": self.max_abs_diff,  # over positions finite in both outputs
            "equal": self.equal,
            "error": self.error,
            "mismatch": self.mismatch,
            "nonfinite": self.nonfinite,
            "method": self.method,
        }


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

    def unit(self, name: str) -> Child:
        """A child of the root or of a tracked container, by its dotted name."""
        for child in (*self.children, *(c for k in self.containers for c in k.children)):
            if child.name == name:
                return child
        raise KeyError(name)

    def to_dict(self, kept: int | CutPath | None = None) -> dict[str, object]:
        path = kept if isinstance(kept, CutPath) else None
        root_kept = path.kept if path is not None else kept
        out: dict[str, object] = {
            "model": self.model,
            "model_class": self.model_class,
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
            "children": [c.to_dict(root_kept) for c in self.children],
            "glue": [g.to_dict(kept) for g in self.glue],
            "residuals": [r.to_dict(kept) for r in self.residuals],
            "full_model_errors": dict(self.full_errors),
        }
        if self.containers:
            out["containers"] = [c.to_dict(path) for c in self.containers]
        return out

    def __str__(self) -> str:
        projections = sum(r.shortcut == "projection" for r in self.residuals)
        lines = [
            f"featx inspect  {self.model}  ({self.model_class})  input {shape_text(self.input_shape)}  "
            f"modes {', '.join(self.modes)}",
            "",
            *_children_table(self, kept=None),
            "",
            f"{len(self.children)} children, {len(self.glue)} glue ops, "
            f"{len(self.residuals)} residuals ({projections} projection shortcuts)",
        ]
        lines += _full_error_lines(self)
        return "\n".join(lines)


@dataclass(frozen=True)
class Report:
    """``featx.verify``'s answer for one cut."""

    anatomy: Anatomy
    upto: str  # the child name, or the dotted path of a nested cut
    kept: int  # root children the cut touches (a nested cut's container counts, partly kept)
    modes: Mapping[str, ModeResult]
    reasons: tuple[str, ...]
    path: CutPath | None = None  # level by level; None is a cut between the root's children

    @property
    def faithful(self) -> bool:
        """In every mode checked, the truncated model ran and equals the full model at the cut."""
        return bool(self.modes) and all(r.ok for r in self.modes.values())

    def to_dict(self) -> dict[str, object]:
        base = self.anatomy.to_dict(self.path if self.path is not None and self.path.nested else self.kept)
        out = {
            "model": base["model"],
            "model_class": base["model_class"],
            "input_shape": base["input_shape"],
            "upto": self.upto,
            "kept": self.kept,
            "children": base["children"],
            "glue": base["glue"],
            "residuals": base["residuals"],
            "modes": {m: r.to_dict() for m, r in self.modes.items()},
            "faithful": self.faithful,
            "reasons": list(self.reasons),
            "full_model_errors": base["full_model_errors"],
        }
        if "containers" in base:
            out["containers"] = base["containers"]
        return out

    def __str__(self) -> str:
        a = self.anatomy
        nested = self.path is not None and self.path.nested
        where = (
            f"(inside `{self.path.levels[1].container}`, keeps {self.kept} of {len(a.children)} children)"
            if nested
            else f"(keeps {self.kept} of {len(a.children)} children)"
        )
        lines = [
            f"featx verify  {a.model}  cut at `{self.upto}` {where}  input {shape_text(a.input_shape)}",
            "",
            *_children_table(a, kept=self.kept, path=self.path),
            "",
            *table(
                ["mode", "max abs diff", "result"],
                [[m, _diff(r), _result(r)] for m, r in self.modes.items()],
            ),
            "",
        ]
        modes = " and ".join(self.modes)
        if self.faithful:
            lines.append(f"faithful: the cut at `{self.upto}` equals the full model there in {modes}")
        else:
            lines.append(
                f"NOT faithful: the cut at `{self.upto}` does not match the full model ({len(self.reasons)} "
                f"reason{'s' if len(self.reasons) != 1 else ''})"
            )
            lines += [f"  - {reason}" for reason in self.reasons]
        lines += _full_error_lines(a)
        return "\n".join(lines)


@dataclass(frozen=True)
class Cut:
    """One cut point of a sweep."""

    upto: str
    kept: int
    modes: Mapping[str, ModeResult]
    lost_glue: tuple[Glue, ...]
    reasons: tuple[str, ...]
    path: CutPath | None = None  # None: a cut between the root's children

    @property
    def faithful(self) -> bool:
        return bool(self.modes) and all(r.ok for r in self.modes.values())

    @property
    def depth(self) -> int:
        """1 for a cut between the root's children, 2 inside a child, and so on."""
        return len(self.path.levels) if self.path is not None else 1

    def to_dict(self) -> dict[str, object]:
        where: int | CutPath = self.path if self.path is not None and self.path.nested else self.kept
        return {
            "upto": self.upto,
            "kept": self.kept,
            "depth": self.depth,
            "faithful": self.faithful,
            "modes": {m: r.to_dict() for m, r in self.modes.items()},
            "lost_glue": [g.to_dict(where) for g in self.lost_glue],
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class Sweep:
    """``featx.sweep``'s answer: every cut point 1..number of children."""

    anatomy: Anatomy
    cuts: tuple[Cut, ...]

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
        }

    def __str__(self) -> str:
        a = self.anatomy
        modes = list(a.modes)
        rows = [
            [
                str(c.kept),
                "  " * (c.depth - 1) + c.upto,
                *(_diff(c.modes[m]) for m in modes),
                "faithful" if c.faithful else "NOT faithful",
                ", ".join(g.label() for g in c.lost_glue) or "-",
            ]
            for c in self.cuts
        ]
        bad = [c.upto for c in self.cuts if not c.faithful]
        lines = [
            f"featx sweep  {a.model}  input {shape_text(a.input_shape)}  {len(self.cuts)} cuts  modes {', '.join(modes)}",
            "",
            *table(["kept", "upto", *(f"{m} diff" for m in modes), "verdict", "lost glue"], rows),
            "",
            f"{len(self.cuts) - len(bad)} of {len(self.cuts)} cuts are faithful"
            + (f"; not faithful: {', '.join(f'`{u}`' for u in bad)}" if bad else ""),
        ]
        for c in self.cuts:
            lines += [f"  `{c.upto}`: {reason}" for reason in c.reasons]
        lines += _full_error_lines(a)
        return "\n".join(lines)


# -- rendering -----------------------------------------------------------------------------------------
def _children_table(a: Anatomy, kept: int | None, path: CutPath | None = None) -> list[str]:
    lines = _level_table(a, a.children, "", kept, path)
    if path is not None and path.nested:
        for level in path.levels[1:]:
            container = next(c for c in a.containers if c.name == level.container)
            lines += ["", f"inside `{container.name}` ({container.type}):"]
            lines += _level_table(a, container.children, container.name, level.kept, path)
    return lines


def _level_table(
    a: Anatomy, children: Sequence[Child], container: str, kept: int | None, path: CutPath | None
) -> list[str]:
    header = ["#", "child", "type", "output shape", "calls", "residuals", "notes"]
    rows: list[list[str]] = []
    glue_after: dict[int | None, list[Glue]] = {}
    for g in a.glue:
        if g.container == container:
            glue_after.setdefault(g.after_index, []).append(g)
    markers: list[tuple[int, str]] = []  # (row position, full-width line)
    nested = path is not None and path.nested

    def add_glue(after: int | None) -> None:
        for g in glue_after.get(after, []):
            status = g.status_at(path) if nested and path is not None else g.status(kept) if kept else None
            kind = f"glue, {status}" if status is not None else "glue"
            rows.append(["", f"↳ {g.op}", kind, "", _count(g), "", f"{g.source} ({', '.join(g.modes)})"])

    add_glue(None)
    for child in children:
        calls = set(child.calls.values())
        notes = sorted({note for note in child.feed.values() if note})
        rows.append(
            [
                str(child.index),
                child.name,
                child.type,
                shape_text(child.output_shape),
                str(calls.pop())
                if len(calls) == 1
                else " / ".join(f"{m} {n}" for m, n in child.calls.items()),
                _residuals(child),
                "; ".join(notes),
            ]
        )
        ends_here = path is None or path.upto == child.name or path.upto.startswith(child.name + ".")
        if kept is not None and child.index == kept - 1 and ends_here:
            markers.append((len(rows), "cut"))
        add_glue(child.index)
    lines = table(header, rows)
    width = min(100, max(len(line) for line in lines))
    inner = nested and path is not None and path.upto not in {c.name for c in children}
    for position, _ in reversed(markers):
        if inner:
            label = f" cut inside `{children[kept - 1].name}` at `{path.upto}` "  # type: ignore[union-attr]
        else:
            of = f" of `{container}`" if container else ""
            label = f" cut: keeps {kept} of {len(children)} children{of} "
        lines.insert(position + 1, "─" * 4 + label + "─" * max(4, width - len(label) - 4))
    return lines


def _count(g: Glue) -> str:
    return f"{g.count}" if g.count > 1 else ""


def _residuals(child: Child) -> str:
    if not child.residuals:
        return "-"
    if child.projections:
        return f"{child.residuals} ({child.projections} projection)"
    return str(child.residuals)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()

    return [fmt(header), *(fmt(r) for r in rows)]


def shape_text(shape: Sequence[int] | None) -> str:
    """``2x3x224x224``, or ``-`` for no shape."""
    return "x".join(str(d) for d in shape) if shape is not None else "-"


def diff_text(value: float | None) -> str:
    """A max abs difference as people read it: 6 significant digits, ``n/a`` when nothing was compared."""
    return "n/a" if value is None else f"{value:.6g}"


def _diff(r: ModeResult) -> str:
    return "error" if r.error is not None else diff_text(r.max_abs_diff)


def _result(r: ModeResult) -> str:
    if r.error is not None:
        return f"truncated model raised {r.error}"
    if r.mismatch is not None:
        return r.mismatch
    return "equal" if r.equal else "differs"


def _full_error_lines(a: Anatomy) -> list[str]:
    return [f"note: in {m} mode the full model's forward raised {e}" for m, e in a.full_errors.items() if e]
