"""The anatomy of a model as its recorded full forward shows it: the children (calls, output shapes, how
each was fed), the glue of the root and of each tracked container, and the residual merges with their
shortcut, gathered over the modes recorded. ``anatomy_of`` builds the ``Anatomy`` that ``verify``,
``sweep`` and ``inspect`` report; it runs nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from featx.anatomy_values import Anatomy, Child, Container, Glue, Residual
from featx.cut import child_names
from featx.recording import Recording


def anatomy_of(
    model: nn.Module, label: str, x: Any, recordings: dict[str, Recording], modules: dict[str, nn.Module]
) -> Anatomy:
    """``modules``: every module of ``model`` by every name it has (``Snapshot.by_name``)."""
    modes = tuple(recordings)
    first = recordings[modes[0]]
    names = child_names(model)
    residuals = _residuals(recordings, names)

    def child(i: int) -> Child:
        traces = {m: rec.units[i] for m, rec in recordings.items()}
        out = next((t.output for t in traces.values() if t.returned), None)
        name = first.units[i].name
        inside = [r for r in residuals if r.module == name or r.module.startswith(name + ".")]
        return Child(
            index=first.units[i].position,
            name=name,
            type=first.units[i].type,
            calls={m: t.calls for m, t in traces.items()},
            output_shape=tuple(out.shape) if isinstance(out, torch.Tensor) else None,
            residuals=sum(r.child_index == i for r in residuals) if i < len(names) else len(inside),
            projections=sum(r.child_index == i and r.shortcut == "projection" for r in residuals)
            if i < len(names)
            else sum(r.shortcut == "projection" for r in inside),
            feed={m: _feed_note(recordings[m], i) for m in modes},
        )

    containers = tuple(
        Container(c, type(modules[c]).__name__, tuple(child(i) for i in units))
        for c, units in first.containers.items()
    )
    cls = type(model)
    return Anatomy(
        model=label,
        model_class=f"{cls.__module__}.{cls.__qualname__}",
        input_shape=tuple(x.shape) if isinstance(x, torch.Tensor) else None,
        modes=modes,
        children=tuple(child(i) for i in range(len(names))),
        glue=_glue(recordings),
        residuals=residuals,
        full_errors={m: rec.error for m, rec in recordings.items()},
        containers=containers,
    )


def _feed_note(rec: Recording, i: int) -> str | None:
    trace = rec.units[i]
    if trace.feed is None or trace.calls == 0 or trace.container:
        return trace.feed
    first_calls = list(dict.fromkeys(rec.order))
    if i > 0 and rec.children[i - 1].calls and first_calls.index(i) < first_calls.index(i - 1):
        return f"called before `{rec.children[i - 1].name}`, out of registration order"
    return trace.feed


def _glue(recordings: dict[str, Recording]) -> tuple[Glue, ...]:
    first = next(iter(recordings.values()))
    names = {"": [c.name for c in first.children]}
    names |= {c: [first.units[i].name for i in units] for c, units in first.containers.items()}
    found: dict[tuple, dict] = {}
    for mode, rec in recordings.items():
        counts: dict[tuple, int] = {}
        for op in rec.ops:
            key = (op.container, op.name, op.source, op.after, op.before, op.inside)
            counts[key] = counts.get(key, 0) + 1
            entry = found.setdefault(key, {"modes": [], "count": 0})
            if mode not in entry["modes"]:
                entry["modes"].append(mode)
        for key, count in counts.items():
            found[key]["count"] = max(found[key]["count"], count)
    glue = [
        Glue(
            op=name,
            source=source,
            after=names[container][after] if after is not None else None,
            before=names[container][before] if before is not None else None,
            after_index=after,
            before_index=before,
            modes=tuple(entry["modes"]),
            count=entry["count"],
            inside=inside,
            container=container,
        )
        for (container, name, source, after, before, inside), entry in found.items()
    ]
    # In forward order: the root's first, then each container's; by the boundary they sit at, then by
    # first appearance.
    order = {key: i for i, key in enumerate(found)}
    rank = {c: i for i, c in enumerate(names)}
    glue.sort(
        key=lambda g: (
            rank[g.container],
            -1 if g.after_index is None else g.after_index,
            order[(g.container, g.op, g.source, g.after_index, g.before_index, g.inside)],
        )
    )
    return tuple(glue)


def _residuals(recordings: dict[str, Recording], names: list[str]) -> tuple[Residual, ...]:
    # The same merge in each mode: same module, line and occurrence. Its shortcut is the first mode's: a
    # mode can change the lineage (eval's F.dropout hands back its input), not what the code merges.
    found: dict[tuple, dict] = {}
    for mode, rec in recordings.items():
        seen: dict[tuple, int] = {}
        for merge in rec.merges:
            base = (merge.module, merge.source, merge.child)
            seen[base] = seen.get(base, 0) + 1
            entry = found.setdefault((*base, seen[base]), {"modes": [], "shortcut": merge.shortcut})
            entry["modes"].append(mode)
    return tuple(
        Residual(
            module=module,
            child=names[child] if child is not None else None,
            child_index=child,
            shortcut=entry["shortcut"],
            source=source,
            modes=tuple(entry["modes"]),
        )
        for (module, source, child, _), entry in found.items()
    )
