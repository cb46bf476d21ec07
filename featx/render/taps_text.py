"""``featx taps``' table: every tap candidate, then the proposed pyramid and how it compares with timm's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from featx.render.text import environment_lines, table

if TYPE_CHECKING:
    from featx.discovery import Taps

_VERDICT = {"plain": "plain", "keep_glue": "keep_glue", "refused": "refused", "unchecked": "-"}


def render_taps(found: Taps) -> str:
    """The candidates (module, shape, layout, channels, stride, cut), the reasons of refused cuts, the
    pyramid, and the differences from timm's ``feature_info``."""
    shape = "x".join(map(str, found.input_shape))
    lines = [
        f"{found.model}: tap candidates at input {shape} (depth {found.depth})",
        *environment_lines(found.environment),
        "",
    ]
    rows = [
        [
            c.name,
            "-" if c.shape is None else "x".join(map(str, c.shape)),
            c.layout,
            "-" if c.channels is None else str(c.channels),
            "-" if c.stride is None else str(c.stride),
            _VERDICT[c.verdict],
        ]
        for c in found.taps
    ]
    lines += table(["module", "shape", "layout", "channels", "stride", "cut"], rows)
    refused = [c for c in found.taps if c.verdict == "refused"]
    if refused:
        lines += ["", "refused cuts:"]
        lines += [f"  - `{c.name}`: {c.reason}" for c in refused]
    lines.append("")
    if found.pyramid:
        glue = " (keep_glue)" if found.keep_glue else ""
        lines.append(f"pyramid{glue}:")
        lines += [
            f"  stride {level.stride:>3}  {level.channels:>5} channels  {level.name}"
            for level in found.pyramid
        ]
    else:
        lines.append(f"pyramid: none ({found.why_no_pyramid()})")
    if found.feature_info is not None:
        if found.differences:
            lines.append("differs from timm's feature_info at strides 4-32:")
            lines += [f"  - {d}" for d in found.differences]
        else:
            lines.append("equals timm's feature_info at strides 4-32 (channels and strides)")
    return "\n".join(lines)
