"""A picture of a cut, whatever draws it: the boxes of the chain in forward order (the root's children and
its own glue between them), the second line of a child's box and the colours of each kind of box. Kept
children are green, dropped ones grey and dashed; glue is coloured by its status: ``lost`` red, ``at_cut``
orange, ``dropped`` grey. ``featx.render.svg`` and ``featx.render.mermaid`` draw it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from featx.anatomy_values import Child, Glue
from featx.render.text import calls_text, chain, residual_text
from featx.report import Report
from featx.vocab import AT_CUT, LOST

# (fill, stroke, text) per kind of box
COLOURS = {
    "kept": ("#e8f5e9", "#2e7d32", "#1b5e20"),
    "dropped": ("#f5f5f5", "#9e9e9e", "#616161"),
    LOST: ("#ffebee", "#c62828", "#b71c1c"),
    AT_CUT: ("#fff3e0", "#ef6c00", "#e65100"),
    "glue_dropped": ("#eeeeee", "#9e9e9e", "#616161"),
}


def boxes(report: Report) -> Iterator[Child | Glue]:
    """The boxes of the chain, in forward order: the root's children and its own glue between them (a
    container's own glue sits inside its box; the picture is the root's)."""
    return chain(report.anatomy.glue, report.anatomy.children)


def detail(child: Child, taps: Mapping[str, Sequence[str]]) -> str:
    """The second line of a child's box: residuals, calls when not once, the taps on it."""
    texts = (residual_text(child, words=True), calls_text(child, words=True), _taps_text(child, taps))
    return " · ".join(s for s in texts if s)


def _taps_text(child: Child, taps: Mapping[str, Sequence[str]]) -> str:
    names = [
        o
        for unit, outs in taps.items()
        if unit == child.name or unit.startswith(child.name + ".")
        for o in outs
    ]
    return ("output " + ", ".join(names)) if names else ""
