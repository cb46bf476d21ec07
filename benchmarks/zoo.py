"""featx.sweep on the zoo: every ResNet, then every torchvision classifier and one small model per timm module.

Run from the repository root::

    python benchmarks/zoo.py                  # both tables: results/zoo.json, results/beyond.json, docs/zoo.md
    python benchmarks/zoo.py --only zoo       # the ResNet zoo alone
    python benchmarks/zoo.py --pick           # choose the "beyond" timm models and minimum sizes (prints Python)

Every model is built with random weights under seed 0 (``tests/zoo_models.py``: the same lists, sizes and
literal harness ``tests/test_zoo.py`` uses) and swept with ``featx.sweep`` at batch 2, 64 px or the model's
smallest working size. Per model, a row: parameters, children, cuts, faithful cuts (eval and train) without
keep_glue and with it (null while ``featx.sweep`` has no ``keep_glue``), the lost glue ops, the sweep's
seconds and its ratio to one plain forward per mode (eval + train, no featx; the forwards are timed right
before the sweep, once each, so the ratio is a rough figure on a shared machine — ``bench_sweep.py`` is the
careful one). Every cut featx calls faithful is checked against the literal harness; a wrong "faithful" is
recorded in ``wrong_faithful`` (the tests fail on it). The JSON is written atomically with featx.files, the
full Markdown table to ``docs/zoo.md``, the summary to stdout (docs/performance.md's zoo section).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import timm  # noqa: E402
import torch  # noqa: E402
from timm.models import _registry  # noqa: E402
from torch import nn  # noqa: E402
from zoo_models import (  # noqa: E402
    MODES,
    SEED,
    TIMM_RESNET_MODULES,
    TIMM_SKIPPED,
    TIMM_SMALL,
    build,
    literal_verdicts,
    resnet_zoo,
    torchvision_classifiers,
)

import featx  # noqa: E402
from featx.files import write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "zoo.md"
KEEP_GLUE = "keep_glue" in inspect.signature(featx.sweep).parameters
SIZES = (64, 96, 128, 160, 192, 224, 256)


# -- choosing the models (--pick) --------------------------------------------------------------------------
_SMALL_WORDS = ("test", "atto", "femto", "pico", "nano", "xxtiny", "tiny", "xxs", "xs", "mini", "small", "s")


def _name_rank(name: str) -> tuple[int, float, str]:
    """Names that usually mean a small model first (timm's ``test_*``, atto, femto, … tiny, small)."""
    tokens = re.split(r"[_.]", name)
    word = next((i for i, w in enumerate(_SMALL_WORDS) if any(t.startswith(w) for t in tokens)), 99)
    number = re.search(r"\d+(\.\d+)?", name)
    return word, float(number.group()) if number else 0.0, name


def meta_params(name: str) -> int | None:
    try:
        with torch.device("meta"):
            model = timm.create_model(name)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def min_size(model: nn.Module) -> tuple[int | None, str]:
    """The smallest of SIZES (then the model's own size) a forward at batch 2 runs at, in eval and train."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    own = cfg.get("input_size", (3, 224, 224))[-1]
    error = ""
    for size in sorted({*SIZES, own}):
        try:
            with torch.no_grad():
                for mode in MODES:
                    model.train(mode == "train")
                    model(torch.randn(2, 3, size, size))
            return size, ""
        except Exception as err:
            error = f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
    return None, error


def pick(budget: float, after: str = "") -> None:
    """Print TIMM_SMALL, TIMM_SKIPPED and MIN_SIZE for tests/zoo_models.py."""
    small: dict[str, str] = {}
    skipped: dict[str, str] = {}
    sizes: dict[str, int] = {}
    modules = sorted(set(_registry._module_to_models) - set(TIMM_RESNET_MODULES))
    for module in modules:
        if module <= after:
            continue
        names = sorted(timm.list_models(module=module), key=_name_rank)[:8]
        start, counted = time.perf_counter(), []
        for name in names:  # parameter counts on the meta device, small-sounding names first
            counted.append((meta_params(name), name))
            if time.perf_counter() - start > budget:
                break
        ranked = sorted((p, n) for p, n in counted if p is not None)
        if not ranked:
            skipped[module] = "no model builds, not even on the meta device"
            log(f"{module}: skipped ({skipped[module]})")
            continue
        why = ""
        for _, name in ranked[:3]:
            try:
                model = build(f"timm/{name}", size=64).model
            except Exception as err:
                why = f"`{name}` does not build on the CPU: {type(err).__name__}: {' '.join(str(err).split())[:160]}"
                continue
            size, why = min_size(model)
            del model
            gc.collect()
            if size is not None:
                small[module] = name
                if size != 64:
                    sizes[f"timm/{name}"] = size
                break
            why = f"`{name}` runs at none of {SIZES}: {why}"
        else:
            skipped[module] = why
        log(
            f"{module}: {small.get(module) or 'skipped: ' + skipped[module]} {sizes.get(f'timm/{small.get(module)}', '')}"
        )
    for spec in torchvision_classifiers():
        size, why = min_size(build(spec, size=64).model)
        if size is None:
            log(f"{spec}: runs at no size: {why}")
        elif size != 64:
            sizes[spec] = size
        log(f"{spec}: {size}")
        gc.collect()
    print("TIMM_SMALL = " + json.dumps(small, indent=4))
    print("TIMM_SKIPPED = " + json.dumps(skipped, indent=4))
    print("MIN_SIZE = " + json.dumps(sizes, indent=4))


# -- the run ------------------------------------------------------------------------------------------------
def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def _restore(model: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


def plain_seconds(model: nn.Module, x: torch.Tensor) -> float:
    """One forward per mode under ``torch.no_grad()``, seeded, buffers put back: what a bare check costs."""
    buffers, total = _buffers(model), 0.0
    for mode in MODES:
        model.train(mode == "train")
        torch.manual_seed(SEED)
        start = time.perf_counter()
        with torch.no_grad():
            model(x)
        total += time.perf_counter() - start
        _restore(model, buffers)
    model.eval()
    return total


def _faithful(sweep: featx.Sweep) -> dict[str, int]:
    per_mode = {m: sum(c.modes[m].ok for c in sweep.cuts) for m in MODES}
    return per_mode | {"both": sum(c.faithful for c in sweep.cuts)}


def row(spec: str, check: bool) -> dict[str, Any]:
    """One model's row; ``error`` holds anything but a FeatxError (a featx bug), ``refused`` a FeatxError."""
    start = time.perf_counter()
    built = build(spec)
    model, x = built.model, built.x
    out: dict[str, Any] = {
        "model": spec,
        "params": sum(p.numel() for p in model.parameters()),
        "children": len(list(model.children())),
        "input_shape": list(x.shape),
        "build_seconds": round(time.perf_counter() - start, 3),
        "cuts": None,
        "faithful": None,
        "faithful_keep_glue": None,
        "lost_glue": None,
        "sweep_seconds": None,
        "plain_seconds": None,
        "sweep_over_plain": None,
        "refused": None,
        "error": None,
        "wrong_faithful": None,
    }
    try:
        plain = plain_seconds(model, x)
    except Exception as err:
        out["error"] = f"the plain forward raised {type(err).__name__}: {' '.join(str(err).split())[:200]}"
        return out
    try:
        start = time.perf_counter()
        sweep = featx.sweep(model, x)
        seconds = time.perf_counter() - start
    except featx.FeatxError as err:
        out["refused"] = str(err)
        return out
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        return out
    lost = dict.fromkeys(g.label() for c in sweep.cuts for g in c.lost_glue)
    out |= {
        "cuts": len(sweep.cuts),
        "faithful": _faithful(sweep),
        "lost_glue": list(lost),
        "sweep_seconds": round(seconds, 3),
        "plain_seconds": round(plain, 4),
        "sweep_over_plain": round(seconds / plain, 2) if plain else None,
    }
    if KEEP_GLUE:
        try:
            out["faithful_keep_glue"] = _faithful(featx.sweep(model, x, keep_glue=True))  # type: ignore[call-arg]
        except featx.FeatxError as err:
            out["faithful_keep_glue"] = {"refused": str(err)}
    if check:
        claimed = sorted({(c.kept, m) for c in sweep.cuts for m, r in c.modes.items() if r.ok})
        literal = literal_verdicts(model, x, cuts=sorted({k for k, _ in claimed}))
        out["wrong_faithful"] = [f"{sweep.cuts[k - 1].upto} ({m})" for k, m in claimed if not literal[(k, m)]]
    return out


def family(spec: str) -> str:
    source, name = spec.split("/", 1)
    if source == "torchvision":
        return "torchvision"
    return f"timm {_registry._model_to_module[name]}"


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def summary_table(rows: list[dict[str, Any]], by: Any) -> str:
    """Per group: models, cuts, faithful cuts (eval / train / both, and with keep_glue), models faithful at
    every cut, refusals, featx errors, median sweep / plain."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(by(r), []).append(r)
    lines = [
        "| models | n | cuts | faithful eval | faithful train | faithful both | with keep_glue | "
        "all cuts faithful | refused | errors | sweep / plain (median) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, members in [*groups.items(), ("all", rows)]:
        swept = [r for r in members if r["cuts"] is not None]
        total = {k: sum(r["faithful"][k] for r in swept) for k in ("eval", "train", "both")}
        kept = [r["faithful_keep_glue"] for r in swept if isinstance(r["faithful_keep_glue"], dict)]
        keep = sum(k.get("both", 0) for k in kept) if kept else None
        everywhere = sum(r["faithful"]["both"] == r["cuts"] for r in swept)
        ratio = _median([r["sweep_over_plain"] for r in swept])
        lines.append(
            f"| {'**all**' if name == 'all' else name} | {len(members)} | {sum(r['cuts'] for r in swept)} "
            f"| {total['eval']} | {total['train']} | {total['both']} | {_fmt(keep)} | {everywhere} "
            f"| {sum(r['refused'] is not None for r in members)} | {sum(r['error'] is not None for r in members)} "
            f"| {_fmt(None if ratio is None else round(ratio, 2))} |"
        )
    return "\n".join(lines)


def rows_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | params (M) | input | children | faithful cuts (both modes) | keep_glue | lost glue | "
        "sweep s | sweep / plain |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        shape = "x".join(map(str, r["input_shape"]))
        if r["cuts"] is None:
            why = r["refused"] or r["error"]
            verdict = f"{'refused' if r['refused'] else 'ERROR'}: {why}".replace("|", "\\|")
            lines.append(
                f"| {r['model']} | {r['params'] / 1e6:.1f} | {shape} | {r['children']} | {verdict} | | | | |"
            )
            continue
        keep = r["faithful_keep_glue"]
        keep_text = "-" if keep is None else keep.get("both", "refused")
        glue = ", ".join(r["lost_glue"]).replace("|", "\\|") or "-"
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f} | {shape} | {r['children']} "
            f"| {r['faithful']['both']} / {r['cuts']} | {keep_text} | {glue} | {r['sweep_seconds']:.2f} "
            f"| {_fmt(r['sweep_over_plain'])} |"
        )
    return "\n".join(lines)


def environment(wall: float) -> dict[str, Any]:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "wall_seconds": round(wall, 1),
        "keep_glue_available": KEEP_GLUE,
    }


def run(kind: str, specs: list[str], check: bool, write: bool) -> tuple[list[dict[str, Any]], float]:
    """Every spec's row; with ``write``, the JSON is rewritten after each row (``complete`` false until the
    last), so an interrupted run leaves what it measured."""
    start, rows = time.perf_counter(), []
    for i, spec in enumerate(specs, 1):
        r = row(spec, check)
        rows.append(r)
        gc.collect()
        if r["refused"]:
            verdict = "refused: " + r["refused"]
        elif r["error"]:
            verdict = "ERROR " + r["error"]
        else:
            verdict = f"{r['faithful']['both']}/{r['cuts']} faithful, sweep {r['sweep_seconds']:.2f}s"
        log(f"[{kind} {i}/{len(specs)}] {spec}: {verdict}")
        if write:
            save(kind, rows, time.perf_counter() - start, complete=i == len(specs))
    return rows, time.perf_counter() - start


def save(kind: str, rows: list[dict[str, Any]], wall: float, complete: bool) -> None:
    data = environment(wall) | {"complete": complete, "rows": rows}
    if kind == "beyond":
        data["timm_skipped"] = TIMM_SKIPPED
    write_text(RESULTS / f"{kind}.json", json.dumps(data, indent=1) + "\n")


TITLES = {"zoo": "ResNet zoo", "beyond": "Beyond ResNets"}


def _grouping(kind: str) -> Any:
    if kind == "zoo":
        return lambda r: family(r["model"])
    return lambda r: r["model"].split("/")[0]


def write_docs() -> None:
    """docs/zoo.md from the JSON files on disk: each table's summary and every row."""
    sections = []
    for kind, title in TITLES.items():
        path = RESULTS / f"{kind}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        rows = data["rows"]
        when = (
            f"{data['date']}, {data['wall_seconds']:.0f} s wall, load average {data['load_average'][0]:.1f}"
        )
        if not data["complete"]:
            when += "; the run was stopped before the last model"
        sections.append(
            f"## {title}\n\n{len(rows)} models ({when}).\n\n{summary_table(rows, _grouping(kind))}\n\n"
            f"{rows_table(rows)}\n"
        )
        if kind == "beyond":
            skipped = "\n".join(
                f"- `{module}`: {why}" for module, why in data.get("timm_skipped", {}).items()
            )
            sections.append(f"### timm modules with no model here\n\n{skipped or '(none)'}\n")
    text = (
        "# featx on the zoo\n\nGenerated by `python benchmarks/zoo.py` (random weights, seed 0, batch 2, "
        "64 px or the model's smallest working size, CPU). *faithful* counts cuts faithful in eval and in "
        "train; *keep_glue* the same with `featx.sweep(..., keep_glue=True)` (`-` while featx has no "
        "keep_glue); *sweep / plain* is the sweep's seconds over one plain forward per mode.\n\n"
        + "\n".join(sections)
    )
    write_text(DOCS, text)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pick", action="store_true", help="choose the beyond models and sizes, print them")
    parser.add_argument(
        "--budget", type=float, default=15.0, help="--pick: seconds of meta builds per module"
    )
    parser.add_argument("--after", default="", help="--pick: only the timm modules after this one (resume)")
    parser.add_argument("--only", choices=("zoo", "beyond"), help="one of the two tables")
    parser.add_argument("--limit", type=int, help="the first N models only (a smoke run: writes no files)")
    parser.add_argument(
        "--check", action="store_true", help="check every faithful cut with the literal harness"
    )
    parser.add_argument("--docs", action="store_true", help="only regenerate docs/zoo.md from the JSON files")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.pick:
        pick(args.budget, args.after)
        return 0
    kinds = {
        "zoo": resnet_zoo(),
        "beyond": torchvision_classifiers() + [f"timm/{name}" for name in TIMM_SMALL.values()],
    }
    for kind in (("zoo", "beyond") if args.only is None else (args.only,)) if not args.docs else ():
        specs = kinds[kind][: args.limit]
        rows, wall = run(kind, specs, args.check, write=args.limit is None)
        summary = summary_table(rows, _grouping(kind))
        print(f"### {TITLES[kind]} ({len(rows)} models, {wall:.0f} s)\n\n{summary}\n")
        bad = [r["model"] for r in rows if r["error"] or r["wrong_faithful"]]
        if bad:
            log(f"{kind}: featx errors or wrong verdicts on {', '.join(bad)}")
    if args.limit is None:
        write_docs()
    return 0


if __name__ == "__main__":
    sys.exit(main())
