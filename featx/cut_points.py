"""Which cuts a sweep checks and which containers a recording tracks: the containers down to a sweep's
depth (``_sweep_containers``), the cut points in forward order (``_sweep_order``), the containers nested cuts
pass through (``_containers``) and those keep_glue modules need tracked for their reference
(``_with_tracks``)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from featx.cut import CutPath
from featx.glue_module import KeepGlue


def _sweep_containers(model: nn.Module, depth: int) -> list[str]:
    """Modules with children down to ``depth`` - 1 levels below the root, parents first."""
    found: list[str] = []
    level = [(name, child) for name, child in model.named_children()]
    for _ in range(depth - 1):
        level = [(name, child) for name, child in level if any(True for _ in child.children())]
        found += [name for name, _ in level]
        level = [(f"{name}.{n}", c) for name, child in level for n, c in child.named_children()]
    return found


def _sweep_order(model: nn.Module, names: list[str], containers: list[str]) -> list[str]:
    """Cut points in forward order: a container's inner cuts right before the cut after it."""
    tracked = set(containers)

    def walk(prefix: str, module: nn.Module) -> list[str]:
        out: list[str] = []
        for name, child in module.named_children():
            dotted = f"{prefix}.{name}" if prefix else name
            if dotted in tracked:
                out += walk(dotted, child)
            out.append(dotted)
        return out

    return walk("", model)


def _containers(paths: Iterable[CutPath]) -> list[str]:
    """The containers the nested cuts pass through, parents first."""
    found: dict[str, int] = {}
    for path in paths:
        for depth, container in enumerate(path.containers()[1:], start=1):
            found.setdefault(container, depth)
    return sorted(found, key=lambda c: c.count("."))  # parents first


def _with_tracks(containers: list[str], glued: Iterable[KeepGlue]) -> list[str]:
    """``containers`` and those the keep_glue modules need tracked for their reference, parents first."""
    found = dict.fromkeys(containers)
    for module in glued:
        found.update(dict.fromkeys(getattr(module, "tracks", ())))
    return sorted(found, key=lambda c: c.count("."))
