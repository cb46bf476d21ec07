"""The model as the instrumented full forward saw it, before any cut, as small frozen values with
``to_dict()``: its children (``Child``), the glue of the root's and each tracked container's own code
(``Glue``) with its status at a cut, the residual merges (``Residual``), the tracked containers
(``Container``), all in one ``Anatomy`` (what ``featx inspect`` shows). ``featx.anatomy`` makes them from
a recording; a ``Report`` and a ``Sweep`` (``featx.report``) carry them. The ``to_dict()`` keys are the JSON
contract in docs/json.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from featx.cut import CutPath
from featx.vocab import (
    AT_CUT,
    DROPPED,
    KEPT,
    LOST,
    GlueStatus,
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
