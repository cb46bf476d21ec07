"""The cut: where a model is truncated, resolved once into a ``CutPath`` (how many of the root's children
are kept and, for a dotted cut such as ``stages.2``, how many of each container's on the way down).

``resolve_cut`` reads a root cut (a child name, a count, a negative count); ``resolve_path`` reads any
cut, dotted ones included. What is built from a cut lives elsewhere: the ``nn.Sequential`` in
``featx.truncation``, the keep_glue module in ``featx.glue``.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from featx.errors import FeatxError, did_you_mean, listing, long_integer, shortened, too_many_digits


def child_names(model: nn.Module) -> list[str]:
    """The model's direct children, in registration order."""
    return [name for name, _ in model.named_children()]


def resolve_cut(model: nn.Module, upto: str | int, *, what: str = "upto") -> int:
    """How many children the cut ``upto`` keeps, from 1 to the number of children.

    ``upto`` is a child name (kept, inclusive), a count N (the first N children), or a negative count -N
    (all but the last N, as in ``list(model.children())[:-N]``). A string of digits counts as a count,
    so ``"6"`` from a command line means the first six children. ``what`` names the value in the errors
    (``upto``, or ``output`` for a backbone's tap).

    Raises:
        FeatxError: unknown name (with close matches), a count that keeps no child or more than there are.
    """
    names = child_names(model)
    if not names:
        raise FeatxError(
            f"`{type(model).__name__}` has no children to cut between; featx cuts between direct "
            "children (model.named_children())"
        )
    n = len(names)
    # A name first: nn.Sequential's children are named "0", "1", ...; a string of digits that names no
    # child is a count.
    if isinstance(upto, str) and upto not in names and upto.lstrip("-").isdigit():
        text = upto
        try:
            upto = int(text)
        except ValueError as err:  # past Python's digit limit: no model has that many children
            if not too_many_digits(err):
                raise
            raise FeatxError(
                f"{what} `{shortened(text)}` is {long_integer()}; accepted: {_counts(n)}, or a child name: "
                f"{listing(names, n)}"
            ) from None
    if not isinstance(upto, (str, bool)):
        with contextlib.suppress(TypeError):
            upto = operator.index(upto)  # numpy and torch integers too
    if isinstance(upto, bool) or not isinstance(upto, (int, str)):
        raise FeatxError(f"{what} {upto!r} is neither a child name nor an int; children: {listing(names)}")
    if isinstance(upto, str):
        if upto not in names:
            raise FeatxError(
                f"{what} `{upto}` is not a child of `{type(model).__name__}`{did_you_mean(upto, names)}; "
                f"children: {listing(names, n)}"
            )
        return names.index(upto) + 1
    kept = upto if upto >= 0 else n + upto
    if not 1 <= kept <= n:
        # -N past the first child says what it asks for, not a negative count of kept children
        keeps = f"keeps {kept} of {n} children" if kept >= 0 else f"drops the last {-upto} of {n} children"
        raise FeatxError(
            f"{what} {upto} {keeps}; accepted: {_counts(n)}, or a child name: {listing(names, n)}"
        )
    return kept


def _counts(n: int) -> str:
    """The counts a cut of a model with ``n`` children takes: ``1..n`` and ``-1..-(n-1)`` (``-N`` keeps all
    but the last N, so at least one), each range only as long as it is: ``1`` alone for one child."""
    kept = "1" if n == 1 else f"1..{n}"
    dropped = "" if n == 1 else ", -1" if n == 2 else f", -1..-{n - 1}"
    return kept + dropped


@dataclass(frozen=True)
class Level:
    """One container a cut passes through: ``container`` ("" is the root) keeps its first ``kept`` children."""

    container: str
    names: tuple[str, ...]  # the container's children, dotted from the root (``stages.0``, ...)
    kept: int


@dataclass(frozen=True)
class CutPath:
    """Where a cut is, level by level: the root keeps its first children, the last of which may itself be
    cut (a nested cut such as ``stages.2``), and so on down to the named module.

    ``levels`` start with the root's; each further level is a container kept by an earlier one, cut after
    its ``kept``-th child. A backbone whose taps reach into a container adds that container as a level
    that keeps all its children (``expanded``), so the truncated model runs its children one by one.
    """

    levels: tuple[Level, ...]

    @property
    def upto(self) -> str:
        """The last module the truncated model runs: the child name, or the dotted path of a nested cut."""
        return self.units()[-1]

    @property
    def kept(self) -> int:
        """Root children the cut touches, a partly kept container included."""
        return self.levels[0].kept

    @property
    def nested(self) -> bool:
        return len(self.levels) > 1

    def units(self) -> list[str]:
        """The modules the truncated model calls one after the other, dotted: the root's kept children,
        where a container that is a level is replaced by its own kept children, and so on."""
        by = {level.container: level for level in self.levels}
        out: list[str] = []

        def walk(level: Level) -> None:
            for name in level.names[: level.kept]:
                if name in by:
                    walk(by[name])
                else:
                    out.append(name)

        walk(self.levels[0])
        return out

    def containers(self) -> list[str]:
        """The containers the cut passes through or runs child by child, the root ("") first."""
        return [level.container for level in self.levels]

    def whole(self, name: str) -> bool:
        """Whether the truncated model runs all of module ``name`` (a unit, or a level kept to its end)."""
        by = {level.container: level for level in self.levels}
        while name in by:
            level = by[name]
            if level.kept < len(level.names):
                return False
            name = level.names[-1]
        return True

    def expanded(self, model: nn.Module, containers: Iterable[str]) -> CutPath:
        """This cut with ``containers`` (kept modules, parents first) run child by child, all kept."""
        levels = list(self.levels)
        known = {level.container for level in levels}
        modules = dict(model.named_modules(remove_duplicate=False))
        for name in containers:
            if name not in known:
                names = tuple(f"{name}.{n}" for n in child_names(modules[name]))
                levels.append(Level(name, names, len(names)))
                known.add(name)
        return CutPath(tuple(levels))

    def prefix(self, unit: str) -> CutPath:
        """The cut that runs this cut's units up to and including ``unit`` (one of ``units()``)."""
        order = {name: i for i, name in enumerate(self.units())}
        end = order[unit]
        levels = []
        for level in self.levels:
            if level.container == "" or unit.startswith(level.container + "."):  # an ancestor of unit
                child = next(n for n in level.names if unit == n or unit.startswith(n + "."))
                levels.append(Level(level.container, level.names, level.names.index(child) + 1))
            elif all(order.get(u, end + 1) <= end for u in _inside(level.container, order)):
                levels.append(level)
        return CutPath(tuple(levels))


def _inside(container: str, order: dict[str, int]) -> list[str]:
    return [u for u in order if u.startswith(container + ".")]


def resolve_path(model: nn.Module, upto: str | int, *, what: str = "upto") -> CutPath:
    """The cut ``upto`` level by level: a root cut (a child name, a count or a negative count, as
    ``resolve_cut`` takes them), or a dotted path of module names into a child (``stages.2``,
    ``layer3.1``, ``features.3``, any depth). Each segment of a path names a child of the module before it;
    the named module is kept, whole, and so is every child before it at every level. ``what`` names the
    value in the errors, as for ``resolve_cut``.

    Raises:
        FeatxError: an empty segment, a segment that names no child (with the container's children and a
            close match), a path through a module that has no children.
    """
    if not isinstance(upto, str) or "." not in upto or upto in child_names(model):
        kept = resolve_cut(model, upto, what=what)
        return CutPath((Level("", tuple(child_names(model)), kept),))
    segments = upto.split(".")
    if any(not s for s in segments):
        raise FeatxError(
            f"{what} `{upto}` has an empty segment; accepted: module names joined by single dots, "
            f"such as `{'.'.join(s for s in segments if s)}`"
        )
    levels = []
    module, prefix = model, ""
    for segment in segments:
        names = child_names(module)
        if not names:
            kind = "a parameter or buffer" if _is_tensor_attr(module, segment) else "not a module"
            raise FeatxError(
                f"{what} `{upto}` goes through `{prefix}` ({type(module).__name__}), which has no children to "
                f"cut between (`{segment}` is {kind}); cut at `{prefix}` or at a module with children"
            )
        if segment not in names:
            where = f"`{prefix}` ({type(module).__name__})" if prefix else f"`{type(model).__name__}`"
            raise FeatxError(
                f"{what} `{upto}`: {where} has no child `{segment}`{did_you_mean(segment, names)}; "
                f"its children: {listing(names, 16)}"
            )
        dotted = tuple(f"{prefix}.{n}" if prefix else n for n in names)
        levels.append(Level(prefix, dotted, names.index(segment) + 1))
        module = dict(module.named_children())[segment]
        prefix = dotted[names.index(segment)]
    return CutPath(tuple(levels))


def _is_tensor_attr(module: nn.Module, name: str) -> bool:
    return name in module._parameters or name in module._buffers
