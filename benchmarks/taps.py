"""The support matrix of ``featx.taps``: its pyramid against timm's ``feature_info`` and torchvision's detection
backbones, model by model, with what discovery costs against one forward.

Run from the repository root::

    python benchmarks/taps.py                 # results/taps.json and docs/taps_matrix.md
    python benchmarks/taps.py --all-timm      # every timm architecture, not one per module (hours)
    python benchmarks/taps.py --limit 5       # a smoke run: prints rows, writes no files
    python benchmarks/taps.py --markdown      # only the summary and docs/taps_matrix.md, from the JSON's rows
    python benchmarks/taps.py --update --models timm/cait_xxs24_224   # measure rows again, in place
    python benchmarks/taps.py --cost          # discovery / forward at 224 px on 8 models, best of 3

Models (random weights, seed 0, ``pretrained=False``): by default one small model of every timm module
(``tests/zoo_models.py``'s ``TIMM_SMALL``, the smallest by parameters that runs on the CPU) plus the smallest
model of each ResNet module, every torchvision classifier, and the backbone of every torchvision detection
model (``.backbone.body``: the ``IntermediateLayerGetter`` its FPN taps; SSD's ``.backbone``). Each runs at
batch 1 and the model's smallest working size (``MIN_SIZE``, else 64 px). A model above ``--max-params``
(counted on the meta device) is a ``skipped`` row, not built; so is one that does not build, and one whose row
took more than ``--timeout`` seconds. Each model runs in a forked process of its own, two at a time, so one
model's crash or timeout costs only its row.

Per model: ``featx.taps(model, shape, check=False)`` (measuring and the pyramid; cut verdicts are the sweep's
job), its wall ``seconds``, and ``forward_seconds``: one eval forward of the same model at the same input under
``torch.no_grad()`` (after one warm-up forward, not timed). The verdict:

- ``agree``: at strides 4 to 32 featx's pyramid has the reference's strides and channels, and each level is the
  reference's module, or (name-only difference) a module whose output is the same tensor values in a real
  forward (``torch.equal``: e.g. a stage and its last block, or the activation module after it);
- ``differ``: anything else; ``differences`` says what, one line per stride;
- ``timm-has-none``: no reference (a torchvision classifier; a timm model without ``feature_info``);
- ``refused``: ``featx.taps`` raised a FeatxError (``reason``: its line);
- ``error``: it raised anything else (a featx bug);
- ``skipped``: not measured (``reason``: above the parameter budget, does not build, timeout).

The reference is timm's ``feature_info`` (hand-written per model in timm) or, for a torchvision detection body,
its ``return_layers`` with channels and strides measured by featx (compared only at the strides the detector
returns: it picks a subset by design).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import timm  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402
from zoo_models import MIN_SIZE, TIMM_RESNET_MODULES, TIMM_SMALL  # noqa: E402

import featx  # noqa: E402
from featx.discovery import level_differences  # noqa: E402
from featx.errors import FeatxError, one_line  # noqa: E402
from featx.files import write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "taps.json"
MATRIX = ROOT / "docs" / "taps_matrix.md"
SEED = 0
DEFAULT_SIZE = 64
MAX_PARAMS = 150_000_000
TIMEOUT_S = 240.0
VERDICTS = ("agree", "differ", "timm-has-none", "refused", "error", "skipped")
GOAL_RATIO = 1.5
FORWARD_BANDS = ((0.0, 0.02), (0.02, 0.1), (0.1, 0.5), (0.5, 1000.0))
# SSD's extra layers shrink the map to 1x1 and below under their own input size
DETECTION_SIZE = {
    "torchvision-detection/ssd300_vgg16": 300,
    "torchvision-detection/ssdlite320_mobilenet_v3_large": 320,
}


# -- the models ---------------------------------------------------------------------------------------------
def timm_specs(all_timm: bool) -> list[str]:
    if all_timm:
        return [f"timm/{n}" for n in timm.list_models()]
    resnets = {m: _smallest(timm.list_models(module=m)) for m in TIMM_RESNET_MODULES}
    return [f"timm/{n}" for n in sorted({*TIMM_SMALL.values(), *resnets.values()})]


def _smallest(names: Sequence[str]) -> str:
    counted = sorted((meta_params(f"timm/{n}") or 10**12, n) for n in names)
    return counted[0][1]


def torchvision_specs() -> list[str]:
    classifiers = torchvision.models.list_models(module=torchvision.models)
    detectors = torchvision.models.list_models(module=torchvision.models.detection)
    return [f"torchvision/{n}" for n in classifiers] + [f"torchvision-detection/{n}" for n in detectors]


def _constructor(spec: str) -> nn.Module:
    source, name = spec.split("/", 1)
    if source == "timm":
        return timm.create_model(name, pretrained=False)
    if source == "torchvision":
        return torchvision.models.get_model(name, weights=None)
    if source == "torchvision-detection":
        detector = torchvision.models.get_model(name, weights=None, weights_backbone=None)
        backbone = detector.backbone
        return getattr(backbone, "body", backbone)
    raise ValueError(f"unknown source in {spec!r}")


def meta_params(spec: str) -> int | None:
    try:
        with torch.device("meta"):
            model = _constructor(spec)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def input_shape(spec: str) -> tuple[int, int, int, int]:
    size = MIN_SIZE.get(spec.replace("torchvision-detection/", "torchvision/"), DEFAULT_SIZE)
    size = DETECTION_SIZE.get(spec, size)
    return (1, 3, size, size)


# -- one row ------------------------------------------------------------------------------------------------
def _reference(model: nn.Module, found: featx.Taps) -> tuple[str, list[dict[str, Any]]] | None:
    """("timm", feature_info) or ("torchvision", the detection body's return_layers, measured), or None."""
    if found.feature_info is not None:
        return "timm", [dict(f) for f in found.feature_info]
    layers = getattr(model, "return_layers", None)
    if isinstance(layers, Mapping) and layers:
        measured = {t.name: t for t in found.taps}
        entries = []
        for name in layers:
            tap = measured.get(name)
            entries.append(
                {
                    "module": name,
                    "channels": tap.channels if tap else None,
                    "stride": tap.stride if tap else None,
                }
            )
        return "torchvision", entries
    return None


def _outputs(model: nn.Module, x: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
    """The first output tensor of each named module in one real eval forward (copied at once)."""
    got: dict[str, torch.Tensor] = {}
    handles = []
    modules = dict(model.named_modules())

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if name not in got and isinstance(out, torch.Tensor):
                got[name] = out.detach().clone()

        return hook

    for name in names:
        if name in modules:
            handles.append(modules[name].register_forward_hook(keep(name)))
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return got


def compare(
    model: nn.Module, x: torch.Tensor, found: featx.Taps, source: str, reference: Sequence[Mapping[str, Any]]
) -> tuple[str, list[str]]:
    """The verdict against ``reference`` at strides 4-32 and the difference lines (see the module docstring):
    ``featx.discovery.level_differences``, and a forward to tell whether a level under another name is the
    same value."""
    lines, levels = level_differences(
        found.pyramid, reference, source, reference_strides_only=source == "torchvision"
    )
    renamed = [(stride, level.block, str(entry["module"])) for stride, level, entry in levels]
    if renamed:
        values = _outputs(model, x, {n for _, a, b in renamed for n in (a, b)})
        for stride, ours_name, theirs_name in renamed:
            a, b = values.get(ours_name), values.get(theirs_name)
            if a is None or b is None or a.shape != b.shape or not torch.equal(a, b):
                lines.append(
                    f"stride {stride}: featx taps `{ours_name}`, {source} `{theirs_name}`: same channels, "
                    "different values in a real forward"
                )
    return ("differ" if lines else "agree"), lines


def _timed_forward(model: nn.Module, x: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        model(x)  # warm-up
        start = time.perf_counter()
        model(x)
        return time.perf_counter() - start


def row(spec: str, model: nn.Module | None = None, shape: Sequence[int] | None = None) -> dict[str, Any]:
    """One model's row of the matrix (the keys of benchmarks/results/taps.json's ``rows``)."""
    shape = tuple(shape or input_shape(spec))
    out = row_template(spec, shape)
    if model is None:
        try:
            torch.manual_seed(SEED)
            model = _constructor(spec)
        except Exception as err:
            out["reason"] = f"does not build on the CPU: {type(err).__name__}: {one_line(err)[:200]}"
            return out
    out["params"] = sum(p.numel() for p in model.parameters())
    model.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
    try:
        out["forward_seconds"] = round(_timed_forward(model, x), 4)
    except Exception as err:
        out["verdict"] = "refused"
        out["reason"] = f"does not run at {list(shape)}: {type(err).__name__}: {one_line(err)[:200]}"
        return out
    start = time.perf_counter()
    try:
        found = featx.taps(model, shape, check=False, label=spec)
    except FeatxError as err:
        out["seconds"] = round(time.perf_counter() - start, 4)
        out["verdict"], out["reason"] = "refused", one_line(err)[:400]
        return out
    except Exception as err:
        out["seconds"] = round(time.perf_counter() - start, 4)
        out["verdict"] = "error"
        out["reason"] = f"{type(err).__name__}: {one_line(err)[:300]}"
        return out
    out["seconds"] = round(time.perf_counter() - start, 4)
    out["pyramid"] = [{"name": lv.name, "channels": lv.channels, "stride": lv.stride} for lv in found.pyramid]
    if found.feature_info is not None:
        out["feature_info"] = [dict(f) for f in found.feature_info]
    reference = _reference(model, found)
    if reference is None:
        out["verdict"] = "timm-has-none"
        if not found.pyramid:
            out["reason"] = f"no pyramid: {found.why_no_pyramid()}"
        return out
    source, entries = reference
    out["reference"] = source
    if source == "torchvision":
        out["feature_info"] = entries
    out["verdict"], out["differences"] = compare(model, x, found, source, entries)
    return out


# -- the run: one forked process per model, two at a time ------------------------------------------------
def _child(spec: str, conn: Connection) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    try:
        result = row(spec)
    except BaseException as err:  # a crash of the row itself: its own row, not the run's end
        result = {"model": spec, "verdict": "error", "reason": f"{type(err).__name__}: {one_line(err)[:300]}"}
        traceback.print_exc()
    conn.send(result)
    conn.close()


def run(specs: Sequence[str], workers: int, timeout: float, max_params: int) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("fork")
    warm_up()
    pending = list(specs)
    running: dict[str, tuple[Any, Connection, float]] = {}
    rows: dict[str, dict[str, Any]] = {}
    while pending or running:
        while pending and len(running) < workers:
            spec = pending.pop(0)
            params = meta_params(spec)
            if params is not None and params > max_params:
                rows[spec] = _skipped(
                    spec, f"{params / 1e6:.0f} M parameters, above the budget of {max_params / 1e6:.0f} M"
                )
                rows[spec]["params"] = params
                log(spec, rows[spec])
                continue
            parent, child = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(spec, child), daemon=True)
            process.start()
            child.close()
            running[spec] = (process, parent, time.perf_counter())
        time.sleep(0.05)
        for spec, (process, conn, started) in list(running.items()):
            result = None
            if conn.poll():
                try:
                    result = conn.recv()
                except EOFError:
                    result = _skipped(spec, f"the process died (exit code {process.exitcode})")
            elif not process.is_alive():
                result = _skipped(spec, f"the process died (exit code {process.exitcode})")
            elif time.perf_counter() - started > timeout:
                process.kill()
                result = _skipped(spec, f"timeout: no row after {timeout:.0f} s")
            if result is not None:
                process.join(5)
                conn.close()
                del running[spec]
                rows[spec] = result
                log(spec, result)
        gc.collect()
    return [rows[spec] for spec in specs]


def warm_up() -> None:
    """One discovery on a tiny model before forking: imports and first-call caches (fake tensors) are paid once
    here, not in the first model's ``seconds`` (its forward is warmed up too)."""
    tiny = nn.Sequential(
        nn.Conv2d(3, 4, 3, 2, 1), nn.Sequential(nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 2, 1))
    )
    featx.taps(tiny, (1, 3, 32, 32), check=False)


def _skipped(spec: str, reason: str) -> dict[str, Any]:
    return row_template(spec) | {"verdict": "skipped", "reason": reason}


def row_template(spec: str, shape: Sequence[int] | None = None) -> dict[str, Any]:
    """A row before anything is measured: verdict `skipped`, every measurement None."""
    return {
        "model": spec,
        "input_shape": list(shape or input_shape(spec)),
        "params": None,
        "pyramid": [],
        "feature_info": None,
        "reference": None,
        "verdict": "skipped",
        "reason": None,
        "differences": [],
        "seconds": None,
        "forward_seconds": None,
    }


def log(spec: str, result: Mapping[str, Any]) -> None:
    why = result.get("reason") or "; ".join(result.get("differences") or [])
    print(
        f"{spec}: {result['verdict']} {result.get('seconds')} / {result.get('forward_seconds')} {why}"[:300],
        flush=True,
    )


# -- results and the table ----------------------------------------------------------------------------------
def ratio(r: Mapping[str, Any]) -> float | None:
    if r.get("seconds") and r.get("forward_seconds"):
        return float(r["seconds"]) / float(r["forward_seconds"])
    return None


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    ratios = [x for r in rows if (x := ratio(r)) is not None]
    return {
        "verdicts": {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS},
        "discovery_over_forward": {
            "median": round(statistics.median(ratios), 2) if ratios else None,
            "models": len(ratios),
            "goal": f"<= {GOAL_RATIO}",
            # discovery costs per module call, not per pixel: the ratio falls as the forward gets dearer
            "median_by_forward_seconds": {
                f"{lo}-{hi}": _median_ratio(rows, lambda r, lo=lo, hi=hi: lo <= r["forward_seconds"] < hi)
                for lo, hi in FORWARD_BANDS
            },
            "median_at_224_px_or_more": _median_ratio(rows, lambda r: r["input_shape"][-1] >= 224),
        },
    }


def _median_ratio(rows: Sequence[Mapping[str, Any]], keep: Any) -> dict[str, Any]:
    ratios = [x for r in rows if (x := ratio(r)) is not None and keep(r)]
    return {"models": len(ratios), "median": round(statistics.median(ratios), 2) if ratios else None}


def family(spec: str) -> str:
    source, name = spec.split("/", 1)
    if source != "timm":
        return source
    from timm.models import _registry  # the registry knows each model's module

    return f"timm {_registry._model_to_module.get(name, '?')}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _levels(levels: Sequence[Mapping[str, Any]] | None) -> str:
    if not levels:
        return ""
    return " ".join(f"{lv.get('name', lv.get('module'))}:{lv['channels']}/{lv['stride']}" for lv in levels)


def markdown(data: Mapping[str, Any]) -> str:
    rows = data["rows"]
    counts = data["summary"]["verdicts"]
    env = data["environment"]
    lines = [
        "# Support matrix: every model measured",
        "",
        "Generated by `python benchmarks/taps.py` from `benchmarks/results/taps.json`; do not edit. What the",
        "verdicts mean and what the differences are: the Support matrix section of [taps.md](taps.md).",
        "",
        f"torch {env['torch']}, timm {env['timm']}, torchvision {env['torchvision']}, {env['cpu_count']} CPUs, "
        f"{env['date']}; {len(rows)} models; " + ", ".join(f"{v} {n}" for v, n in counts.items() if n) + ".",
        "",
        "A level is `name:channels/stride`. `seconds`: `featx.taps(check=False)`; `fwd`: one eval forward.",
        "",
        "| model | input | verdict | featx pyramid | reference | seconds | fwd | ratio | reason / differences |",
        "|---|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        x = ratio(r)
        why = r.get("reason") or "; ".join(r.get("differences") or [])
        ref = _levels(r.get("feature_info"))
        lines.append(
            f"| {r['model']} | {r.get('input_shape', [0, 0, 0, 0])[-1]} | {r['verdict']} | {_cell(_levels(r.get('pyramid')))} "
            f"| {_cell(ref)} | {r.get('seconds') or ''} | {r.get('forward_seconds') or ''} "
            f"| {'' if x is None else f'{x:.2f}'} | {_cell(why)} |"
        )
    return "\n".join(lines) + "\n"


def family_table(rows: Sequence[Mapping[str, Any]]) -> str:
    by: dict[str, Counter[str]] = {}
    for r in rows:
        by.setdefault(family(r["model"]), Counter())[r["verdict"]] += 1
    head = "| family | models | " + " | ".join(VERDICTS) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(VERDICTS)]
    for name in sorted(by):
        c = by[name]
        lines.append(f"| {name} | {sum(c.values())} | " + " | ".join(str(c[v]) for v in VERDICTS) + " |")
    return "\n".join(lines) + "\n"


COST_MODELS = (
    "timm/resnet50",
    "timm/efficientnet_b0",
    "timm/convnext_tiny",
    "timm/regnety_016",
    "timm/deit_tiny_patch16_224",
    "timm/swin_tiny_patch4_window7_224",
    "torchvision/resnet50",
    "torchvision/mobilenet_v3_large",
)


def _best(run: Any, times: int) -> float:
    best = float("inf")
    for _ in range(times):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def cost(size: int = 224, times: int = 3) -> list[dict[str, Any]]:
    """Discovery against one forward at ``size`` px, in this process on one thread, each the best of
    ``times`` after a warm-up: the issue's "at most 1.5 forwards" at a size models are used at."""
    torch.set_num_threads(1)
    warm_up()
    rows = []
    for spec in COST_MODELS:
        torch.manual_seed(SEED)
        model = _constructor(spec).eval()
        shape = (1, 3, size, size)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
        with torch.no_grad():
            model(x)
            forward = _best(lambda m=model, x=x: m(x), times)
        featx.taps(model, shape, check=False)
        seconds = _best(lambda m=model, s=shape: featx.taps(m, s, check=False), times)
        rows.append(
            {
                "model": spec,
                "input_shape": list(shape),
                "seconds": round(seconds, 4),
                "forward_seconds": round(forward, 4),
            }
        )
        print(f"{spec}: {seconds:.3f} s / {forward:.3f} s = {seconds / forward:.2f}", flush=True)
        del model
        gc.collect()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-timm", action="store_true", help="every timm architecture, not one per module")
    parser.add_argument("--only", choices=("timm", "torchvision"), help="one source only")
    parser.add_argument("--limit", type=int, help="the first N models only (a smoke run: writes no files)")
    parser.add_argument(
        "--models", nargs="*", help="these specs only (timm/NAME, torchvision/NAME; no files)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per model")
    parser.add_argument("--max-params", type=int, default=MAX_PARAMS, help="skip models above this many")
    parser.add_argument(
        "--update",
        action="store_true",
        help="with --models: measure them again and replace their rows in the JSON",
    )
    parser.add_argument("--markdown", action="store_true", help="only regenerate docs/taps_matrix.md")
    parser.add_argument(
        "--cost", action="store_true", help="only discovery / forward at 224 px, into the JSON"
    )
    parser.add_argument("--families", action="store_true", help="print the per-family table from the JSON")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.cost:
        data = json.loads(RESULTS.read_text())
        rows = cost()
        ratios = [r["seconds"] / r["forward_seconds"] for r in rows]
        data["discovery_cost_at_224"] = {
            "environment": environment(),
            "median": round(statistics.median(ratios), 2),
            "goal": f"<= {GOAL_RATIO}",
            "rows": rows,
        }
        write_text(RESULTS, json.dumps(data, indent=1) + "\n")
        print(f"median {statistics.median(ratios):.2f}")
        return 0
    if args.markdown or args.families:
        data = json.loads(RESULTS.read_text())
        data["summary"] = summary(data["rows"])
        write_text(RESULTS, json.dumps(data, indent=1) + "\n")
        if args.markdown:
            write_text(MATRIX, markdown(data))
        if args.families:
            print(family_table(data["rows"]))
        return 0
    specs = args.models or (
        ([] if args.only == "torchvision" else timm_specs(args.all_timm))
        + ([] if args.only == "timm" else torchvision_specs())
    )
    partial = bool(args.models or args.limit)
    if args.limit:
        specs = specs[: args.limit]
    start = time.perf_counter()
    rows = run(specs, args.workers, args.timeout, args.max_params)
    if args.update:
        data = json.loads(RESULTS.read_text())
        again = {r["model"]: r for r in rows}
        data["rows"] = [again.get(r["model"], r) for r in data["rows"]]
        data["summary"] = summary(data["rows"])
        data["environment"]["updated"] = sorted(again)
        write_text(RESULTS, json.dumps(data, indent=1) + "\n")
        write_text(MATRIX, markdown(data))
        return 0
    data = {
        "environment": environment() | {"wall_seconds": round(time.perf_counter() - start, 1)},
        "input_shape": f"batch 1, 3 channels, the model's smallest working size (tests/zoo_models.py MIN_SIZE), else {DEFAULT_SIZE} px",
        "models": "every timm architecture"
        if args.all_timm
        else "one small model per timm module, every torchvision classifier and detection backbone",
        "summary": summary(rows),
        "rows": rows,
    }
    print(json.dumps(data["summary"], indent=1))
    if not partial:
        write_text(RESULTS, json.dumps(data, indent=1) + "\n")
        write_text(MATRIX, markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
