"""``featx check``'s table for people (``str(check)``), its summary line and the words of its cells,
which the Markdown shares. Reads ``featx.checks``' values without importing them at run time, since they
import it to render themselves."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from featx.render.text import diff_text, environment_lines, table, verdict_text
from featx.vocab import ERROR, FAITHFUL, NOT_FAITHFUL, Outcome

if TYPE_CHECKING:
    from featx.checks import Check, ConfigCheck

VERDICTS: dict[Outcome, str] = {
    FAITHFUL: verdict_text(True),
    NOT_FAITHFUL: verdict_text(False),
    ERROR: "error",
}


def summary_text(result: Check) -> str:
    """``2 of 3 configs faithful, 1 not faithful, 0 errors``: the last line of the text and the Markdown."""
    c = result.counts
    n = len(result.items)
    return (
        f"{c[FAITHFUL]} of {n} config{'s' if n != 1 else ''} faithful, "
        f"{c[NOT_FAITHFUL]} not faithful, {c[ERROR]} error{'s' if c[ERROR] != 1 else ''}"
    )


def render_text(result: Check) -> str:
    """The ``featx check`` table: one row per config, the summary, then what failed where."""
    rows = [
        [
            i.config,
            i.model or "-",
            i.upto or "-",
            outputs_text(i) or "-",
            VERDICTS[i.outcome],
            diff_text(i.max_abs_diff) if i.outcome != ERROR else "-",
            built_text(i),
            ", ".join(g.label() for g in i.lost_glue) or "-",
            *([i.fpn or "-"] if result.has_fpn else []),
            *([artifacts_text(i)] if result.has_artifacts else []),
        ]
        for i in result.items
    ]
    header = ["config", "model", "cut", "outputs", "verdict", "max abs diff", "built", "lost glue"]
    header += [*(["fpn"] if result.has_fpn else []), *(["artifacts"] if result.has_artifacts else [])]
    lines = [
        f"featx check  {' '.join(result.paths)}",
        *environment_lines(result.environment),
        "",
        *table(header, rows),
        "",
        summary_text(result),
    ]
    for i in result.items:
        if i.outcome == ERROR:
            lines.append(f"  {i.config}: error: {i.error}")
        elif i.outcome == NOT_FAITHFUL:
            lines += [f"  {i.config}: {reason}" for reason in i.reasons]
        if i.outcome != ERROR:
            lines += [f"  {i.config}: note: {note}" for note in i.notes]
    return "\n".join(lines)


def artifacts_text(item: ConfigCheck) -> str:
    """``r18.onnx ok, r18.pt2 STALE``: each artifact's file name and whether it still matches."""
    return ", ".join(f"{Path(a.path).name} {'ok' if a.ok else 'STALE'}" for a in item.artifacts) or "-"


def built_text(item: ConfigCheck) -> str:
    """The built backbone against the full model: ``same``, ``DIFFERS in train``, ``-`` when not built."""
    if not item.built:
        return "-"
    differ = [b.mode for b in item.built if not b.faithful]
    return f"DIFFERS in {', '.join(differ)}" if differ else "same"


def built_lines(item: ConfigCheck) -> str:
    """The built backbone's taps per mode, for JUnit's ``system-out``."""
    rows = [
        [b.mode, t.output, t.module, diff_text(t.result.max_abs_diff), "same" if t.result.ok else "DIFFERS"]
        for b in item.built
        for t in b.taps
    ]
    return "\n".join(
        [
            "the backbone as built against the full model at its taps:",
            *table(["mode", "output", "module", "max abs diff", "result"], rows),
        ]
    )


def outputs_text(item: ConfigCheck) -> str:
    if all(output == child for output, child in item.outputs):
        return ", ".join(child for _, child in item.outputs)
    return ", ".join(f"{output}={child}" for output, child in item.outputs)
