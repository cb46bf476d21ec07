"""What keep_glue costs a sweep: a depth-2 ``featx.sweep(..., keep_glue=True)`` over the plain depth-2 sweep.

Run from the repository root::

    python benchmarks/bench_glue_sweeps.py                # 5 repetitions, 1 thread
    python benchmarks/bench_glue_sweeps.py --repeats 3 --models resnet18

Models (random init, seed 0, CPU, batch 2; ``tests/zoo_models.py``'s ``build``): torchvision ``resnet18``
and ``resnet50``, timm ``resnet50``, ``convnext_atto`` and ``efficientnet_b0`` at 64x64, timm
``vit_tiny_patch16_224`` at 224x224. Per model, within each repetition and back to back (the order rotating
between repetitions), CPU time of:

- ``plain``: ``featx.sweep(model, x, depth=2)``;
- ``glue``: ``featx.sweep(model, x, depth=2, keep_glue=True)``, as featx runs it: every cut's value from one
  run of one module per mode and input (``featx.glue_proof.all_cuts``);
- ``per_cut``: the same sweep with each cut's own module run (``all_cuts`` made to return None, the path
  featx falls back to, and the one it took before): the "before" of the change, measured in the same run.

Both keep_glue sweeps must give the same JSON (checked on every repetition). A model's ratio is the median
over repetitions of glue / plain (and per_cut / plain); ``seconds`` splits the last ``glue`` sweep into
where its time went: tracing and cutting (``trace_root`` and each cut's module), the recorded forward of
``x`` (as the plain sweep has), the fresh input's recorded forward, and running the keep_glue modules.
One torch thread by default: on a 2-core machine shared with other work, OpenMP's second thread waits for
a core and makes every number several times slower. Results go to ``benchmarks/results/glue_sweeps.json``
with the numeric environment (``featx.numerics.environment``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from zoo_models import build  # noqa: E402

import featx  # noqa: E402
import featx.glue_proof  # noqa: E402
import featx.verification  # noqa: E402
from featx.files import write_text  # noqa: E402
from featx.numerics import environment  # noqa: E402

MODELS = {
    "torchvision/resnet18": 64,
    "torchvision/resnet50": 64,
    "timm/resnet50": 64,
    "timm/convnext_atto": 64,
    "timm/efficientnet_b0": 64,
    "timm/vit_tiny_patch16_224": 224,
}
DEPTH = 2
GOAL = 1.5
OUT = ROOT / "benchmarks" / "results" / "glue_sweeps.json"


def _per_cut(run: Callable[[], Any]) -> Any:
    """``run()`` with each keep_glue cut proved by its own module (featx's fallback)."""
    made = featx.verification.all_cuts
    featx.verification.all_cuts = lambda *_: None  # type: ignore[assignment]
    try:
        return run()
    finally:
        featx.verification.all_cuts = made


def _split(run: Callable[[], Any]) -> dict[str, float]:
    """CPU seconds of ``run()`` (a keep_glue sweep) in tracing and cutting, recording ``x``, recording the
    fresh input, and running the keep_glue modules; ``other`` the rest (anatomy, reasons, the guard)."""
    spent: dict[str, float] = {"trace_and_cut": 0.0, "record": 0.0, "fresh_record": 0.0, "prove": 0.0}
    v = featx.verification
    names = {
        "trace_root": "trace_and_cut",
        "record": "record",
        "fresh_input": "fresh_record",
        "prove_cuts": "prove",
    }
    saved = {name: getattr(v, name) for name in names}

    def timed(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return saved[name](*args, **kwargs)
            finally:
                spent[names[name]] += time.process_time() - start

        return call

    cut = featx.glue.RootTrace.cut

    def timed_cut(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        try:
            return cut(self, *args, **kwargs)
        finally:
            spent["trace_and_cut"] += time.process_time() - start

    for name in names:
        setattr(v, name, timed(name))
    featx.glue.RootTrace.cut = timed_cut  # type: ignore[method-assign]
    start = time.process_time()
    try:
        run()
    finally:
        for name, f in saved.items():
            setattr(v, name, f)
        featx.glue.RootTrace.cut = cut  # type: ignore[method-assign]
    spent["total"] = time.process_time() - start
    spent["other"] = spent["total"] - sum(spent[k] for k in names.values())
    return {k: round(s, 4) for k, s in spent.items()}


def measure(spec: str, size: int, repeats: int) -> dict[str, Any]:
    built = build(spec, size=size)
    model, x = built.model, built.x
    contenders: dict[str, Callable[[], Any]] = {
        "plain": lambda: featx.sweep(model, x, depth=DEPTH),
        "glue": lambda: featx.sweep(model, x, depth=DEPTH, keep_glue=True),
        "per_cut": lambda: _per_cut(lambda: featx.sweep(model, x, depth=DEPTH, keep_glue=True)),
    }
    for run in contenders.values():  # warm-up: first-call costs are not the sweep's
        run()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    cuts = 0
    for i in range(repeats):
        results = {}
        for name in order[i % 3 :] + order[: i % 3]:
            gc.collect()
            start = time.process_time()
            results[name] = contenders[name]()
            seconds[name].append(time.process_time() - start)
        if results["glue"].to_dict() != results["per_cut"].to_dict():
            raise SystemExit(f"{spec}: the keep_glue sweep differs from the per-cut one")
        cuts = len(results["glue"].cuts)
    ratios = {
        f"{name}_over_plain": round(
            statistics.median(a / b for a, b in zip(seconds[name], seconds["plain"], strict=True)), 2
        )
        for name in ("glue", "per_cut")
    }
    return {
        "model": spec,
        "input_shape": list(x.shape),
        "cuts": cuts,
        "median_s": {name: round(statistics.median(s), 4) for name, s in seconds.items()},
        **ratios,
        "seconds": _split(contenders["glue"]),
        "samples_s": {name: [round(s, 4) for s in samples] for name, samples in seconds.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default=",".join(m.split("/")[-1] for m in MODELS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    wanted = args.models.split(",")
    rows = []
    for spec, size in MODELS.items():
        if spec in wanted or spec.split("/")[-1] in wanted:
            rows.append(measure(spec, size, args.repeats))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "samples_s"}), flush=True)
    glue = statistics.median(r["glue_over_plain"] for r in rows)
    per_cut = statistics.median(r["per_cut_over_plain"] for r in rows)
    result = {
        "environment": environment(),
        "load_average": os.getloadavg(),
        "depth": DEPTH,
        "repeats": args.repeats,
        "median_glue_over_plain": glue,
        "median_per_cut_over_plain": per_cut,
        "goal": {"glue_over_plain": f"<= {GOAL}", "met": glue <= GOAL},
        "models": rows,
    }
    if args.out == OUT:
        OUT.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=1) + "\n")
    print("| model | input | cuts | plain s | keep_glue s | keep_glue / plain | per cut / plain |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        m = r["median_s"]
        print(
            f"| {r['model']} | {'x'.join(map(str, r['input_shape']))} | {r['cuts']} | {m['plain']:.3f} | "
            f"{m['glue']:.3f} | {r['glue_over_plain']:.2f} | {r['per_cut_over_plain']:.2f} |"
        )
    print(f"| **median** | | | | | **{glue:.2f}** | **{per_cut:.2f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
