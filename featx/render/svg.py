"""The picture of a cut as a self-contained SVG (``featx verify --svg``): no scripts, fonts or links to
fetch, every label real ``<text>``."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape

from featx.anatomy_values import Child
from featx.render.picture import COLOURS, boxes, detail
from featx.render.text import diff_text, shape_text, verdict_text
from featx.report import Report
from featx.vocab import AT_CUT, DROPPED, LOST

_CUT = "#c62828"
_FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
_MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"


def svg(report: Report, taps: Mapping[str, Sequence[str]] | None = None) -> str:
    """The cut as a standalone SVG document (UTF-8 text)."""
    taps = taps or {}
    a, kept = report.anatomy, report.kept
    width, left, right = 780, 24, 756
    parts: list[str] = []
    y = 28

    def text(x: float, y: float, s: str, size: int = 13, colour: str = "#212121", **attrs: str) -> None:
        extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
        parts.append(
            f'<text x="{x:.0f}" y="{y:.0f}" font-size="{size}" fill="{colour}"{extra}>{escape(s)}</text>'
        )

    verdict_colour = COLOURS["kept"][1] if report.faithful else _CUT
    text(left, y, f"{a.model}: cut at {report.upto}", 17, font_weight="bold")
    y += 22
    text(
        left,
        y,
        f"keeps {kept} of {len(a.children)} children · input {shape_text(a.input_shape)} · "
        f"modes {', '.join(report.modes)}",
        13,
        "#424242",
    )
    text(right, y, verdict_text(report.faithful), 13, verdict_colour, font_weight="bold", text_anchor="end")
    y += 24
    spine_top = y
    for step in boxes(report):
        if isinstance(step, Child):
            c = step
            kind = "kept" if c.index < kept else "dropped"
            fill, stroke, ink = COLOURS[kind]
            dash = ' stroke-dasharray="6 4"' if kind == "dropped" else ""
            parts.append(
                f'<rect x="{left + 16}" y="{y}" width="{right - left - 16}" height="44" rx="6" '
                f'fill="{fill}" stroke="{stroke}" stroke-width="1.5"{dash}/>'
            )
            parts.append(
                f'<text x="{left + 28}" y="{y + 19}" font-size="14" fill="{ink}">'
                f'<tspan font-weight="bold">{escape(f"{c.index}  {c.name}")}</tspan>'
                f'<tspan dx="12" font-size="13">{escape(c.type)}</tspan></text>'
            )
            text(
                right - 12, y + 19, shape_text(c.output_shape), 12, ink, text_anchor="end", font_family=_MONO
            )
            text(left + 28, y + 36, detail(c, taps), 12, ink)
            y += 44
            if c.index == kept - 1:
                y += 8
                parts.append(
                    f'<line x1="{left - 8}" y1="{y + 10}" x2="{right + 8}" y2="{y + 10}" stroke="{_CUT}" '
                    'stroke-width="2.5" stroke-dasharray="10 5"/>'
                )
                label = f"✂ cut at {report.upto}: keeps {kept} of {len(a.children)} children"
                parts.append(
                    f'<rect x="{left + 34}" y="{y + 1}" width="{len(label) * 7.4 + 22:.0f}" height="18" '
                    'fill="#ffffff"/>'
                )
                text(left + 48, y + 15, label, 13, _CUT, font_weight="bold")
                y += 20
            y += 8
        else:
            g = step
            status = report.glue_status(g)
            fill, stroke, ink = COLOURS["glue_dropped" if status == DROPPED else status]
            parts.append(
                f'<rect x="{left + 64}" y="{y}" width="{right - left - 112}" height="26" rx="13" '
                f'fill="{fill}" stroke="{stroke}" stroke-width="1.5"/>'
            )
            count = f" ×{g.count}" if g.count > 1 else ""
            text(
                left + 80,
                y + 17,
                f"glue {g.op}{count} · {status} · {g.source} ({', '.join(g.modes)})",
                12,
                ink,
            )
            y += 34
    # the spine behind the boxes, drawn first so the boxes cover it
    parts.insert(
        0,
        f'<line x1="{left + 40}" y1="{spine_top}" x2="{left + 40}" y2="{y - 8}" stroke="#bdbdbd" stroke-width="2"/>',
    )
    y += 6
    for mode, r in report.modes.items():
        if r.error is not None:
            result = f"the truncated model raised {r.error.partition(':')[0]}"
        elif r.mismatch is not None:
            result = "not comparable"
        else:
            result = f"max abs diff {diff_text(r.max_abs_diff)}, " + ("equal" if r.equal else "differs")
        for line in textwrap.wrap(f"{mode}: {result}", 100) or [""]:
            text(left, y + 12, line, 12, "#212121")
            y += 17
    for reason in report.reasons:
        for i, line in enumerate(textwrap.wrap(reason, 98)):
            text(left + (0 if i == 0 else 12), y + 12, ("• " if i == 0 else "") + line, 12, _CUT)
            y += 17
    y += 10
    x = left
    for label, kind in (
        ("kept child", "kept"),
        ("dropped child", "dropped"),
        ("lost glue", LOST),
        ("glue at the cut", AT_CUT),
        ("dropped glue", "glue_dropped"),
    ):
        fill, stroke, ink = COLOURS[kind]
        parts.append(f'<rect x="{x}" y="{y}" width="14" height="14" rx="3" fill="{fill}" stroke="{stroke}"/>')
        text(x + 20, y + 12, label, 12, "#424242")
        x += 28 + len(label) * 7
    y += 26
    body = "\n  ".join(parts)
    title = f"featx: {a.model} cut at {report.upto} ({verdict_text(report.faithful)})"
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" '
        f'viewBox="0 0 {width} {y}" font-family="{_FONT}" role="img">\n'
        f"  <title>{escape(title)}</title>\n"
        f'  <rect width="{width}" height="{y}" fill="#ffffff"/>\n'
        f"  {body}\n"
        "</svg>\n"
    )
