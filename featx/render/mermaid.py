"""The picture of a cut as a Mermaid flowchart for Markdown, which GitHub renders (``featx check
--markdown``)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from featx.anatomy_values import Child
from featx.render.picture import COLOURS, boxes, detail
from featx.render.text import shape_text
from featx.report import Report
from featx.vocab import DROPPED


def mermaid(report: Report, taps: Mapping[str, Sequence[str]] | None = None) -> str:
    """The cut as a Mermaid flowchart (the text inside a ```` ```mermaid ```` block)."""
    taps = taps or {}
    a, kept = report.anatomy, report.kept
    lines = ["flowchart TB", f'  input(["input {shape_text(a.input_shape)}"])']
    order = ["input"]
    classes: dict[str, list[str]] = {}
    for i, step in enumerate(boxes(report)):
        if isinstance(step, Child):
            c = step
            node = f"c{c.index}"
            lines.append(f'  {node}["{_m(f"{c.index} {c.name} · {c.type}")}<br/>{_m(detail(c, taps))}"]')
            classes.setdefault("kept" if c.index < kept else "dropped", []).append(node)
        else:
            g = step
            status = report.glue_status(g)
            node = f"g{i}"
            label = f"{_m(f'glue {g.op} · {status}')}<br/>{_m(g.source)}"
            lines.append(f'  {node}{{{{"{label}"}}}}')
            classes.setdefault("glue_dropped" if status == DROPPED else status, []).append(node)
        order.append(node)
    lines.append('  output(["model output"])')
    order.append("output")
    last_kept = f"c{kept - 1}"
    for a_node, b_node in itertools.pairwise(order):
        if a_node == last_kept:
            lines.append(
                f'  {a_node} -. "✂ cut: keeps {kept} of {len(report.anatomy.children)}" .-> {b_node}'
            )
        else:
            lines.append(f"  {a_node} --> {b_node}")
    for kind, (fill, stroke, ink) in COLOURS.items():
        dash = ",stroke-dasharray: 5 4" if kind == "dropped" else ""
        lines.append(f"  classDef {kind} fill:{fill},stroke:{stroke},color:{ink}{dash}")
    lines += [f"  class {','.join(nodes)} {kind}" for kind, nodes in classes.items()]
    return "\n".join(lines)


def _m(text: str) -> str:
    """Text safe inside a quoted Mermaid label: shown as written, never read as markup or an entity."""
    return (
        " ".join(text.splitlines())
        .replace("#", "#35;")  # first: the entities below start with it
        .replace("&", "#amp;")
        .replace('"', "#quot;")
        .replace("<", "#lt;")
        .replace(">", "#gt;")
        .replace("`", "'")
    )
