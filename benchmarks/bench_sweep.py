"""What featx's sweep and verify cost, against plain forwards and the naive one-cut-at-a-time loop.

Run from the repository root::

    python benchmarks/bench_sweep.py                      # full run, 2x3x224x224, 5 repetitions
    python benchmarks/bench_sweep.py --repeats 9          # more repetitions, tighter medians
    python benchmarks/bench_sweep.py --quick              # smoke run: 1 repetition at 2x3x64x64

Models: torchvision ``resnet50`` and timm ``resnet50``, both randomly initialised, on the CPU. Measures,
per model and per mode (eval, train):

- ``plain``: one forward of the full model under ``torch.no_grad()``;
- ``featx_sweep``: ``featx.sweep(model, x, modes=(mode,))``; and ``modes=("eval", "train")``, shown as
  ``eval+train`` (plain and naive_sweep ``eval+train`` are the sums of their two modes);
- ``naive_sweep``: for every cut k in 1..N, one full forward plus one forward of
  ``nn.Sequential(*list(model.children())[:k])`` (a cut that raises, like torchvision's ``fc``, is caught);
- ``featx_verify``: ``featx.verify(model, "layer2", x, modes=(mode,))``, which also tells whether the model's
  output depends on the value at the cut (``output_depends_on_cut``: one more full forward, noise at the cut);
- ``naive_verify_dependence``: what a hand-written check of the same needs: one full forward, one full forward
  with noise added to ``layer2``'s output by a forward hook, one forward of the Sequential cut at ``layer2``;
- ``featx_verify_nodep``: ``featx.verify(..., dependence=False)``;
- ``naive_verify``: one full forward plus one forward of the Sequential cut at ``layer2``.

Every contender runs once as warm-up, then ``--repeats`` times, all contenders of a model interleaved within
a repetition so machine noise hits all alike: the contenders a ratio compares run back to back, and the order
rotates from one repetition to the next. Seconds are the median over repetitions; a ratio is the median of
the per-repetition ratios (the JSON also has the ratio of the fastest samples, the least disturbed by other
load). Results go to ``--out`` (JSON, written atomically) and a Markdown table to stdout; progress and the
load average after each repetition go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from torch import nn

import featx
from featx.files import write_text
from featx.numerics import device_name

MODES = ("eval", "train")
BOTH = "eval+train"
VERIFY_CUT = "layer2"
FULL_SHAPE = (2, 3, 224, 224)
QUICK_SHAPE = (2, 3, 64, 64)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sweep.json"


@dataclass(frozen=True)
class Contender:
    """One timed call: ``run()`` is what the clock sees; the model's state is put back after it."""

    measure: str  # plain | featx_sweep | naive_sweep | featx_verify[_nodep] | naive_verify[_dependence]
    mode: str  # eval | train | eval+train
    run: Callable[[], object]

    @property
    def key(self) -> str:
        return f"{self.measure} {self.mode}"


@dataclass(frozen=True)
class Goal:
    """``numerator / denominator`` compared with ``target``; shown on the numerator's row."""

    numerator: str  # "measure mode" keys; a denominator of several keys is their sum
    denominator: tuple[str, ...]
    name: str
    op: str  # "<=" or ">="
    target: float

    def met(self, ratio: float) -> bool:
        return ratio <= self.target if self.op == "<=" else ratio >= self.target


# -- the contenders -----------------------------------------------------------------------------------
def build_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    models = {
        "torchvision/resnet50": torchvision.models.resnet50(),
        "timm/resnet50": timm.create_model("resnet50", pretrained=False),
    }
    for model in models.values():
        model.eval()
    return models


def plain_forward(model: nn.Module, x: torch.Tensor, mode: str) -> None:
    model.train(mode == "train")
    with torch.no_grad():
        model(x)


def naive_sweep(model: nn.Module, x: torch.Tensor, mode: str) -> None:
    children = list(model.children())
    model.train(mode == "train")
    with torch.no_grad():
        for k in range(1, len(children) + 1):
            model(x)
            # A cut may raise, e.g. torchvision's fc: Linear on the unflattened pool output.
            with contextlib.suppress(Exception):
                nn.Sequential(*children[:k])(x)


def naive_verify(model: nn.Module, x: torch.Tensor, mode: str, kept: int) -> None:
    model.train(mode == "train")
    with torch.no_grad():
        model(x)
        nn.Sequential(*list(model.children())[:kept])(x)


def naive_verify_dependence(model: nn.Module, x: torch.Tensor, mode: str, kept: int) -> None:
    model.train(mode == "train")
    with torch.no_grad():
        model(x)
        hook = getattr(model, VERIFY_CUT).register_forward_hook(
            lambda _m, _a, out: out + torch.randn_like(out)
        )
        try:
            model(x)
        finally:
            hook.remove()
        nn.Sequential(*list(model.children())[:kept])(x)


def contenders(model: nn.Module, x: torch.Tensor) -> list[list[Contender]]:
    """The contenders of one model, in groups whose members a ratio compares: run back to back."""
    kept = [name for name, _ in model.named_children()].index(VERIFY_CUT) + 1
    groups: list[list[Contender]] = []
    for mode in MODES:
        groups += [
            [
                Contender("plain", mode, lambda m=mode: plain_forward(model, x, m)),
                Contender("featx_sweep", mode, lambda m=mode: featx.sweep(model, x, modes=(m,))),
            ],
            [
                Contender(
                    "featx_verify", mode, lambda m=mode: featx.verify(model, VERIFY_CUT, x, modes=(m,))
                ),
                Contender(
                    "naive_verify_dependence", mode, lambda m=mode: naive_verify_dependence(model, x, m, kept)
                ),
            ],
            [
                Contender(
                    "featx_verify_nodep",
                    mode,
                    lambda m=mode: featx.verify(model, VERIFY_CUT, x, modes=(m,), dependence=False),
                ),
                Contender("naive_verify", mode, lambda m=mode: naive_verify(model, x, m, kept)),
            ],
            [Contender("naive_sweep", mode, lambda m=mode: naive_sweep(model, x, m))],
        ]
    groups.append([Contender("featx_sweep", BOTH, lambda: featx.sweep(model, x, modes=MODES))])
    return groups


def schedule(groups: list[list[Contender]], rep: int) -> list[Contender]:
    """Repetition ``rep``'s order: groups rotated by ``rep``, each group reversed on odd repetitions."""
    shift = rep % len(groups)
    return [c for group in groups[shift:] + groups[:shift] for c in (group[::-1] if rep % 2 else group)]


def goals() -> list[Goal]:
    found = []
    for mode in (*MODES, BOTH):
        modes = MODES if mode == BOTH else (mode,)
        found.append(
            Goal(f"featx_sweep {mode}", tuple(f"plain {m}" for m in modes), "sweep/plain", "<=", 1.5)
        )
        found.append(Goal(f"naive_sweep {mode}", (f"featx_sweep {mode}",), "naive/sweep", ">=", 5.0))
    for mode in MODES:
        found.append(
            Goal(
                f"featx_verify {mode}", (f"naive_verify_dependence {mode}",), "verify/(2 full+cut)", "<=", 1.2
            )
        )
        found.append(
            Goal(f"featx_verify_nodep {mode}", (f"naive_verify {mode}",), "verify/(full+cut)", "<=", 1.2)
        )
    return found


# -- timing -------------------------------------------------------------------------------------------
class Buffers:
    """BN running stats and counters, put back after every call so each contender starts alike."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved = [(b, b.detach().clone()) for b in model.buffers()]

    def restore(self) -> None:
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)
        self.model.eval()


def timed(contender: Contender, buffers: Buffers) -> float:
    gc.collect()
    start = time.perf_counter()
    contender.run()
    elapsed = time.perf_counter() - start
    buffers.restore()
    return elapsed


@dataclass
class Timings:
    samples: dict[str, dict[str, list[float]]]  # model -> contender key -> seconds, one per repetition
    findings: dict[str, dict[str, Any]]  # model -> what featx.sweep found
    load: list[float]  # 1-minute load average after each repetition: others' work skews the clock


def measure(models: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int) -> Timings:
    plan = {name: (contenders(model, x), Buffers(model)) for name, model in models.items()}
    timings = Timings({name: {c.key: [] for c in schedule(gs, 0)} for name, (gs, _) in plan.items()}, {}, [])
    for name, (groups, buffers) in plan.items():
        log(f"warm-up {name}: {len(timings.samples[name])} contenders x {warmup}")
        for _ in range(warmup):
            for c in schedule(groups, 0):
                timed(c, buffers)
        timings.findings[name] = sweep_findings(models[name], x)
        buffers.restore()
    for rep in range(repeats):
        for name, (groups, buffers) in plan.items():
            for c in schedule(groups, rep):
                timings.samples[name][c.key].append(timed(c, buffers))
        timings.load.append(os.getloadavg()[0])
        log(f"repetition {rep + 1}/{repeats} done (load average {timings.load[-1]:.2f})")
    return timings


def sweep_findings(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Per cut and mode: faithful or not, and whether featx derived it or ran the Sequential."""
    result = featx.sweep(model, x, modes=MODES)
    return {
        "children": [c.upto for c in result.cuts],
        "cuts": {
            c.upto: {mode: {"ok": r.ok, "method": r.method} for mode, r in c.modes.items()}
            for c in result.cuts
        },
    }


# -- reporting ----------------------------------------------------------------------------------------
def summarise(samples: dict[str, list[float]]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    rows = dict(samples)
    for prefix in ("plain", "naive_sweep"):  # eval+train of a per-mode contender: the sum
        rows[f"{prefix} {BOTH}"] = [
            sum(pair) for pair in zip(*(samples[f"{prefix} {m}"] for m in MODES), strict=True)
        ]
    measures = {
        key: {"median_s": statistics.median(values), "min_s": min(values), "samples_s": values}
        for key, values in rows.items()
    }
    ratios = []
    for goal in goals():
        per_rep = [
            num / sum(den)
            for num, *den in zip(rows[goal.numerator], *(rows[d] for d in goal.denominator), strict=True)
        ]
        ratio = statistics.median(per_rep)
        floor = min(rows[goal.numerator]) / min(
            map(sum, zip(*(rows[d] for d in goal.denominator), strict=True))
        )
        ratios.append(
            {
                "measure": goal.numerator,
                "over": " + ".join(goal.denominator),
                "name": goal.name,
                "ratio": ratio,
                "ratio_samples": per_rep,
                "ratio_of_mins": floor,  # fastest over fastest: the least disturbed by others' load
                "goal": f"{goal.op} {goal.target:g}",
                "met": goal.met(ratio),
            }
        )
    return measures, ratios


ROW_ORDER = [
    f"{measure} {mode}"
    for measure in (
        "plain",
        "featx_sweep",
        "naive_sweep",
        "featx_verify",
        "naive_verify_dependence",
        "featx_verify_nodep",
        "naive_verify",
    )
    for mode in (*MODES, BOTH)
]


def markdown(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | measure | seconds | ratio | goal | met |", "|---|---|---:|---:|---|---|"]
    for model, result in results.items():
        by_measure = {r["measure"]: r for r in result["ratios"]}
        for key in ROW_ORDER:
            if key not in result["measures"]:
                continue
            seconds = f"{result['measures'][key]['median_s']:.3f}"
            r = by_measure.get(key)
            if r is None:
                lines.append(f"| {model} | {key} | {seconds} |  |  |  |")
                continue
            goal = f"{r['name']} {r['goal']}"
            lines.append(
                f"| {model} | {key} | {seconds} | {r['ratio']:.2f} | {goal} | "
                f"{'yes' if r['met'] else '**no**'} |"
            )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "featx": featx.__version__,
        **featx_revision(),
        "torch_num_threads": torch.get_num_threads(),
        "cpu": device_name(torch.device("cpu")),
        "cpu_count": os.cpu_count(),
    }


def featx_revision() -> dict[str, Any]:
    """The commit the featx under test was imported from, and whether its folder had uncommitted edits."""
    root = Path(featx.__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "featx"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return {"featx_commit": None, "featx_dirty": None}
    return {"featx_commit": head.stdout.strip(), "featx_dirty": bool(status.stdout.strip())}


def log(message: str) -> None:
    print(f"[bench_sweep {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"results JSON (default: {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repetitions (default 5; 1 with --quick)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed runs of every contender first (default 1)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition at 2x3x64x64")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    started = datetime.now(timezone.utc)
    threads = torch.get_num_threads()
    log(f"input {'x'.join(map(str, shape))}, {args.repeats} repetitions, torch threads {threads}")
    env = environment()  # now: featx's commit is the one imported, not one made while this runs
    models = build_models()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    load_before = list(os.getloadavg())
    timings = measure(models, x, args.repeats, args.warmup)
    results: dict[str, dict[str, Any]] = {}
    for name in models:
        measures, ratios = summarise(timings.samples[name])
        results[name] = {"measures": measures, "ratios": ratios, "featx_sweep": timings.findings[name]}
    table = markdown(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "bench_sweep",
        "date": started.isoformat(timespec="seconds"),
        "wall_s": round((datetime.now(timezone.utc) - started).total_seconds(), 1),
        "config": {
            "input_shape": list(shape),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "quick": args.quick,
            "verify_cut": VERIFY_CUT,
            "device": "cpu",
        },
        "environment": {
            **env,
            "load_average_before": load_before,
            "load_average_per_repetition": timings.load,
            "load_average_after": list(os.getloadavg()),
        },
        "models": results,
        "table_markdown": table,
    }
    write_text(args.out, json.dumps(document, indent=2) + "\n")  # whole or not at all
    print(table)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
