"""``featx check --markdown``: a CI job summary, the table and a Mermaid picture of each cut."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from featx.render.check_text import VERDICTS, artifacts_text, built_text, outputs_text, summary_text
from featx.render.mermaid import mermaid
from featx.render.text import diff_text, environment_text
from featx.vocab import ERROR, FAITHFUL, NOT_FAITHFUL

if TYPE_CHECKING:
    from featx.checks import Check


def render_markdown(result: Check) -> str:
    """A CI job summary: the table, then per config its reasons and a Mermaid picture of the cut
    (open for configs that fail, folded for the rest)."""
    c = result.counts
    icon = {FAITHFUL: "✅", NOT_FAITHFUL: "❌", ERROR: "⚠️"}
    if result.exit_code == 0:
        title = f"✅ featx check: all {len(result.items)} configs faithful"
    else:
        title = f"❌ featx check: {c[NOT_FAITHFUL]} not faithful, {c[ERROR]} could not be checked"
    extra = result.has_artifacts
    lines = [
        f"## {title}",
        "",
        "| config | model | cut | outputs | verdict | max abs diff | built | lost glue |"
        + (" artifacts |" if extra else ""),
        "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if extra else ""),
    ]
    for i in result.items:
        cells = [
            f"`{i.config}`",
            f"`{i.model}`" if i.model else "-",
            f"`{i.upto}`" if i.upto else "-",
            outputs_text(i) or "-",
            f"{icon[i.outcome]} {VERDICTS[i.outcome]}",
            diff_text(i.max_abs_diff) if i.outcome != ERROR else "-",
            built_text(i),
            ", ".join(g.label() for g in i.lost_glue) or "-",
            *([artifacts_text(i)] if extra else []),
        ]
        lines.append("| " + " | ".join(_cell(x) for x in cells) + " |")
    lines += ["", summary_text(result) + ".", ""]
    for i in result.items:
        heading = f"`{i.config}`: {icon[i.outcome]} {VERDICTS[i.outcome]}"
        if i.outcome == ERROR:
            lines += [f"### {heading}", "", f"cannot be checked: {_md(i.error or '')}", ""]
            continue
        body = [*(f"- {_md(reason)}" for reason in i.reasons), ""] if i.reasons else []
        body += ["```mermaid", mermaid(i.reports[-1], i.taps), "```", ""]
        if i.outcome == NOT_FAITHFUL:
            lines += [f"### {heading}", "", *body]
        else:
            summary = f"<code>{html.escape(i.config)}</code>: {icon[i.outcome]} faithful, the cut"
            lines += ["<details>", f"<summary>{summary}</summary>", "", *body, "</details>", ""]
    if result.environment:  # the footer: what the verdicts were computed in
        lines += ["", f"<sub>{_md(environment_text(result.environment))}</sub>"]
    return "\n".join(lines).rstrip() + "\n"


def _cell(text: str) -> str:
    return _md(text).replace("|", "\\|").replace("\n", " ")


def _md(text: str) -> str:
    """Markdown text with ``<``/``>``/``&`` outside code spans escaped, so nothing reads as HTML."""
    parts = text.split("`")
    for i in range(0, len(parts), 2 if len(parts) % 2 else 1):  # unbalanced backticks: escape it all
        parts[i] = html.escape(parts[i], quote=False)
    return "`".join(parts)
