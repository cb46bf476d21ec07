"""The text of verify, sweep and inspect for people: aligned tables and one-line verdicts, and the words
every table, picture and summary spells values with (``verdict_text``, ``diff_text``, ``table``).

``str(report)``, ``str(sweep)`` and ``str(anatomy)`` (``featx.report``'s values) render here. This module reads
those values without importing them at run time, since they import it to render themselves; it tells a
glue op from a child by its ``op``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from typing import TypeGuard

    from featx.anatomy_values import Anatomy, Child, Glue
    from featx.cut import CutPath
    from featx.mode_result import ModeResult
    from featx.report import Report, Sweep
    from featx.vocab import GlueStatus


def anatomy_text(a: Anatomy) -> str:
    """``str(anatomy)``: the children table with the glue between them, ``featx inspect``'s text."""
    projections = sum(r.shortcut == "projection" for r in a.residuals)
    lines = [
        f"featx inspect  {a.model}  ({a.model_class})  input {shape_text(a.input_shape)}  "
        f"modes {', '.join(a.modes)}",
        *environment_lines(a.environment),
        "",
        *_children_table(a, kept=None),
        "",
        f"{_count_of(len(a.children), 'child', 'children')}, {_count_of(len(a.glue), 'glue op')}, "
        f"{_count_of(len(a.residuals), 'residual')} "
        f"({_count_of(projections, 'projection shortcut')})",
    ]
    lines += _full_error_lines(a)
    return "\n".join(lines)


def report_text(report: Report) -> str:
    """``str(report)``: the children table with the cut line, each mode's comparison and the verdict."""
    a = report.anatomy
    glue = ", and the glue" if report.keep_glue else ""
    if report.path is not None and report.path.nested:
        where = f"(inside `{report.path.levels[1].container}`, keeps {report.kept} of {len(a.children)} children{glue})"
    else:
        where = f"(keeps {report.kept} of {len(a.children)} children{glue})"
    lines = [
        f"featx verify  {a.model}  cut at `{report.upto}` {where}  input {shape_text(a.input_shape)}",
        *environment_lines(report.environment),
        "",
        *_children_table(a, kept=report.kept, keep_glue=report.keep_glue, path=report.path),
        *(f"note: {note}" for note in report.notes),
        "",
        *table(
            ["mode", "max abs diff", "result"],
            [[m, _diff(r), _result(r)] for m, r in report.modes.items()],
        ),
        *_numeric_lines(report.numerics, report.modes),
        "",
    ]
    modes = " and ".join(report.modes)
    if report.faithful:
        lines.append(
            f"{verdict_text(True)}: the cut at `{report.upto}` equals the full model there in {modes}"
        )
    else:
        lines.append(
            f"{verdict_text(False)}: the cut at `{report.upto}` does not match the full model ({len(report.reasons)} "
            f"reason{'s' if len(report.reasons) != 1 else ''})"
        )
        lines += [f"  - {reason}" for reason in report.reasons]
    lines += _full_error_lines(a)
    return "\n".join(lines)


def sweep_text(sweep: Sweep) -> str:
    """``str(sweep)``: one row per cut point, then each cause with the cuts it explains."""
    a = sweep.anatomy
    modes = list(a.modes)
    keep_glue = any(c.keep_glue for c in sweep.cuts)
    rows = [
        [
            str(c.kept),
            "  " * (c.depth - 1) + c.upto,
            *(_diff(c.modes[m]) for m in modes),
            verdict_text(c.faithful),
            *([_ops_text(c.kept_glue)] if keep_glue else []),
            ", ".join(g.label() for g in c.lost_glue) or "-",
        ]
        for c in sweep.cuts
    ]
    bad = [c.upto for c in sweep.cuts if not c.faithful]
    lines = [
        f"featx sweep  {a.model}  input {shape_text(a.input_shape)}  {len(sweep.cuts)} cuts  modes {', '.join(modes)}"
        + ("  keep_glue" if keep_glue else ""),
        *_numeric_lines(sweep.numerics, {}),
        *environment_lines(sweep.environment),
        "",
        *table(
            [
                "kept",
                "upto",
                *(f"{m} diff" for m in modes),
                "verdict",
                *(["kept glue"] if keep_glue else []),
                "lost glue",
            ],
            rows,
        ),
        "",
        f"{len(sweep.cuts) - len(bad)} of {len(sweep.cuts)} cuts are faithful"
        + (f"; not faithful: {', '.join(f'`{u}`' for u in bad)}" if bad else ""),
    ]
    lines += [f"  {where}: {reason}" for where, reason in sweep.grouped_reasons()]
    discarded: dict[tuple[str, ...], list[str]] = {}  # modes -> the cuts the output does not depend on
    for c in sweep.cuts:
        off = tuple(m for m, r in c.modes.items() if r.output_depends_on_cut is False)
        if off:
            discarded.setdefault(off, []).append(f"`{c.upto}`")
    lines += [
        f"note: the model's output does not depend on the value at {', '.join(cuts)} in {' and '.join(off)} "
        "mode (it discards it): a tap there is legal, but nothing the model returns is computed from it"
        for off, cuts in discarded.items()
    ]
    lines += _full_error_lines(a)
    return "\n".join(lines)


def _children_table(
    a: Anatomy, kept: int | None, keep_glue: bool = False, path: CutPath | None = None
) -> list[str]:
    lines = _level_table(a, a.children, "", kept, path, keep_glue)
    if path is not None and path.nested:
        for level in path.levels[1:]:
            container = next(c for c in a.containers if c.name == level.container)
            lines += ["", f"inside `{container.name}` ({container.type}):"]
            lines += _level_table(a, container.children, container.name, level.kept, path, keep_glue)
    return lines


def _level_table(
    a: Anatomy,
    children: Sequence[Child],
    container: str,
    kept: int | None,
    path: CutPath | None,
    keep_glue: bool = False,
) -> list[str]:
    header = ["#", "child", "type", "output shape", "calls", "residuals", "notes"]
    rows: list[list[str]] = []
    markers: list[tuple[int, str]] = []  # (row position, the cut line's label)
    nested = path is not None and path.nested
    names = {c.name for c in children}
    for step in chain(a.glue, children, container):
        if _is_glue(step):
            g = step
            status: GlueStatus | None
            if nested and path is not None:
                status = g.status_at(path, keep_glue)
            else:
                status = g.status(kept, keep_glue, kept == len(a.children)) if kept is not None else None
            kind = f"glue, {status}" if status is not None else "glue"
            rows.append(["", f"↳ {g.op}", kind, "", _count(g), "", f"{g.source} ({', '.join(g.modes)})"])
            continue
        child = cast("Child", step)
        notes = sorted({note for note in child.feed.values() if note})
        rows.append(
            [
                str(child.index),
                child.name,
                child.type,
                shape_text(child.output_shape),
                calls_text(child),
                residual_text(child),
                "; ".join(notes),
            ]
        )
        ends_here = path is None or path.upto == child.name or path.upto.startswith(child.name + ".")
        if kept is not None and child.index == kept - 1 and ends_here:
            if path is not None and path.nested and path.upto not in names:
                label = f" cut inside `{child.name}` at `{path.upto}` "
            else:
                of = f" of `{container}`" if container else ""
                label = f" cut: keeps {kept} of {len(children)} children{of} "
            markers.append((len(rows), label))
    lines = table(header, rows)
    width = min(100, max(len(line) for line in lines))
    for position, label in reversed(markers):
        lines.insert(position + 1, "─" * 4 + label + "─" * max(4, width - len(label) - 4))
    return lines


def _ops_text(glue: Sequence[Glue], limit: int = 5) -> str:
    """``expand, cat, add, call `blocks.0`, … (12 more)``: the ops, in forward order, once each."""
    ops = list(dict.fromkeys(g.op for g in glue))
    if not ops:
        return "-"
    return ", ".join(ops[:limit]) + (f", … ({len(ops) - limit} more)" if len(ops) > limit else "")


def _count_of(n: int, noun: str, plural: str | None = None) -> str:
    """``1 glue op``, ``2 glue ops``."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _count(g: Glue) -> str:
    return f"{g.count}" if g.count > 1 else ""


def chain(glue: Iterable[Glue], children: Iterable[Child], container: str = "") -> Iterator[Child | Glue]:
    """``children`` in forward order with ``container``'s own glue (``""``: the root's) between them, each
    op after the child that returned before it: the rows of a children table, the boxes of a picture."""
    after: dict[int | None, list[Glue]] = {}
    for g in glue:
        if g.container == container:
            after.setdefault(g.after_index, []).append(g)
    yield from after.get(None, [])
    for child in children:
        yield child
        yield from after.get(child.index, [])


def environment_text(env: Mapping[str, object]) -> str:
    """``environment: torch 2.14.1, cpu (AMD EPYC), float32, threads 2``: the numeric environment
    (``featx.numerics.environment``) in one line, naming what is not the default (autocast, compile,
    channels-last, TF32 on a CUDA device, a float32 matmul precision below ``highest``, deterministic
    algorithms)."""
    device = str(env.get("device"))
    name = env.get("device_name")
    parts = [f"torch {env.get('torch')}", f"{device} ({name})" if name and name != device else device]
    parts.append(str(env.get("dtype")))
    if env.get("autocast"):
        parts.append(f"autocast {env['autocast']}")
    if env.get("compile"):
        parts.append("compiled")
    if env.get("channels_last"):
        parts.append("channels-last")
    if device.startswith("cuda"):
        tf32 = [what for what, key in (("matmul", "tf32_matmul"), ("cuDNN", "tf32_cudnn")) if env.get(key)]
        if tf32:
            parts.append(f"TF32 {' and '.join(tf32)}")
    precision = env.get("float32_matmul_precision")
    if precision not in (None, "highest"):
        parts.append(f"float32 matmul precision {precision}")
    if env.get("deterministic"):
        parts.append("deterministic algorithms")
    threads = env.get("threads")
    parts.append(f"threads {threads}")
    return "environment: " + ", ".join(parts)


def environment_lines(env: Mapping[str, object]) -> list[str]:
    """The line under a text report's heading: ``environment_text``, none for a value built without one."""
    return [environment_text(env)] if env else []


def verdict_text(faithful: bool) -> str:
    """``faithful`` or ``NOT faithful``: the verdict as every table, picture and summary spells it."""
    return "faithful" if faithful else "NOT faithful"


def residual_text(child: Child, words: bool = False) -> str:
    """A child's residual merges: ``2 (1 projection)``, ``-`` for none; with ``words`` (a picture's box,
    no column header to say what the number counts) ``2 residuals (1 projection)``, ``no residuals``."""
    if not child.residuals:
        return "no residuals" if words else "-"
    text = str(child.residuals)
    if words:
        text += f" residual{'s' if child.residuals != 1 else ''}"
    return text + (f" ({child.projections} projection)" if child.projections else "")


def calls_text(child: Child, words: bool = False) -> str:
    """How often the full forward called a child: ``1``, or ``eval 1 / train 2`` when the modes differ;
    with ``words`` (a picture's box) nothing for once, ``called 2×``, ``called 1× in eval / 2× in train``."""
    calls = set(child.calls.values())
    if words and calls == {1}:
        return ""
    if len(calls) == 1:
        n = calls.pop()
        return f"called {n}×" if words else str(n)
    if words:
        return "called " + " / ".join(f"{n}× in {m}" for m, n in child.calls.items())
    return " / ".join(f"{m} {n}" for m, n in child.calls.items())


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()

    return [fmt(header), *(fmt(r) for r in rows)]


def shape_text(shape: Sequence[int] | None) -> str:
    """``2x3x224x224``, or ``-`` for no shape."""
    return "x".join(str(d) for d in shape) if shape is not None else "-"


def diff_text(value: float | None) -> str:
    """A max abs difference as people read it: 6 significant digits, ``n/a`` when nothing was compared."""
    return "n/a" if value is None else f"{value:.6g}"


def _diff(r: ModeResult) -> str:
    return "error" if r.error is not None else diff_text(r.max_abs_diff)


def _result(r: ModeResult) -> str:
    if r.error is not None:
        return f"truncated model raised {r.error}"
    if r.mismatch is not None:
        return r.mismatch
    if r.equal and r.numerics is not None and not r.numerics.ok:
        return r.numerics.verdict.replace("_", " ")
    if r.equal and r.sensitive is False:
        return "equal, but the comparison cannot fail"
    return "equal" if r.equal else "differs"


def _numeric_lines(numerics: Mapping[str, object] | None, modes: Mapping[str, ModeResult]) -> list[str]:
    """In a numeric setting other than float32 eager: the setting, then per mode the dtype's tolerance
    and the full model's and the cut's errors against float64 (in tolerances)."""
    if numerics is None or numerics == _DEFAULT_NUMERICS:
        return []
    switches = [k.replace("_", "-") for k in ("autocast", "compile", "channels_last") if numerics.get(k)]
    lines = [f"numerics: {numerics.get('dtype')}" + "".join(f", {s}" for s in switches)]
    for m, r in modes.items():
        n = r.numerics
        if n is None:
            continue
        lines.append(
            f"  {m}: tolerance rtol {n.rtol:g} atol {n.atol:g} ({n.dtype}); error against float64, in "
            f"tolerances: full model {_error_text(n.model_error)}, cut {_error_text(n.cut_error)}; relative: "
            f"full model {_error_text(n.model_relative_error)}, cut {_error_text(n.cut_relative_error)} "
            f"(factor {n.factor:g})" + (", cut compiled" if n.compiled else "")
        )
    return lines


def _error_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


_DEFAULT_NUMERICS = {"dtype": "float32", "autocast": False, "compile": False, "channels_last": False}


def _full_error_lines(a: Anatomy) -> list[str]:
    return [f"note: in {m} mode the full model's forward raised {e}" for m, e in a.full_errors.items() if e]


def _is_glue(step: Child | Glue) -> TypeGuard[Glue]:
    """A glue op among ``chain``'s steps, not a child."""
    return hasattr(step, "op")
