"""What a sweep costs where the recording's per-call Python matters most: small inputs, many small ops.

Run from the repository root::

    python benchmarks/bench_small.py                 # 7 repetitions
    python benchmarks/bench_small.py --repeats 3     # quicker, noisier

Models (random init, seed 0, CPU, batch 2): timm ``resnet18``, ``resnet50d``, ``convnext_atto``,
``efficientnet_b0`` and ``regnetx_002`` at 64x64, and ``vit_tiny_patch16_224`` at 224x224. Per model,
within each repetition and back to back (the order alternating between repetitions):

- ``plain``: one eval forward plus one train forward of the full model under ``torch.no_grad()``;
- ``sweep``: ``featx.sweep(model, x)`` (both modes: every cut between the root's children);
- ``floor``: the same two plain forwards with what the recording rests on and nothing of featx: an
  ``nn.Module._call_impl`` that only calls torch's own (one Python frame per module call, as the recorder
  sees module calls) and an empty ``TorchFunctionMode`` (a mode that only calls each function).
  ``floor / plain`` is what seeing every module call and every torch call costs before any work is done
  in them: a lower bound for the recorded forwards.

The ratio is sweep / plain per repetition; a model's ratio is the median over repetitions, and the goal
(issue 9 §4) is a median over the six models of at most 1.5. Seconds are process CPU time (the clock that
other load on the machine disturbs least), with wall-clock ratios alongside. Results go to
``benchmarks/results/small.json`` (written atomically) and a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from bench_sweep import Buffers, environment, featx_revision  # same folder: run as python benchmarks/<this>
from torch import nn
from torch.overrides import TorchFunctionMode

import featx
from featx.files import write_text

MODELS = {
    "resnet18": 64,
    "resnet50d": 64,
    "convnext_atto": 64,
    "efficientnet_b0": 64,
    "regnetx_002": 64,
    "vit_tiny_patch16_224": 224,
}
GOAL = 1.5
OUT = Path(__file__).resolve().parent / "results" / "small.json"


def plain(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        for mode in ("eval", "train"):
            model.train(mode == "train")
            model(x)
    model.eval()


class _Empty(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


_CALL_IMPL = nn.Module._call_impl


def _passed_on(module: nn.Module, *args, **kwargs):
    return _CALL_IMPL(module, *args, **kwargs)


def floor(model: nn.Module, x: torch.Tensor) -> None:
    nn.Module._call_impl = _passed_on
    try:
        with _Empty():
            plain(model, x)
    finally:
        nn.Module._call_impl = _CALL_IMPL


def timed(run, buffers: Buffers) -> tuple[float, float]:
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    buffers.restore()
    return cpu, wall


def measure(name: str, size: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, size, size)
    buffers = Buffers(model)
    contenders = {
        "plain": lambda: plain(model, x),
        "floor": lambda: floor(model, x),
        "sweep": lambda: featx.sweep(model, x),
    }
    for run in contenders.values():  # warm-up
        timed(run, buffers)
    samples: dict[str, list[tuple[float, float]]] = {key: [] for key in contenders}
    for rep in range(repeats):
        for key in list(contenders)[:: -1 if rep % 2 else 1]:
            samples[key].append(timed(contenders[key], buffers))
    cpu = [s[0] / p[0] for s, p in zip(samples["sweep"], samples["plain"], strict=True)]
    wall = [s[1] / p[1] for s, p in zip(samples["sweep"], samples["plain"], strict=True)]
    floor_ratio = [f[0] / p[0] for f, p in zip(samples["floor"], samples["plain"], strict=True)]
    return {
        "input": [2, 3, size, size],
        "plain_cpu_s": statistics.median(p[0] for p in samples["plain"]),
        "sweep_cpu_s": statistics.median(s[0] for s in samples["sweep"]),
        "ratio_cpu": statistics.median(cpu),
        "ratio_wall": statistics.median(wall),
        "floor_ratio_cpu": statistics.median(floor_ratio),
        "ratios_cpu": cpu,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {}
    for name, size in MODELS.items():
        rows[name] = measure(name, size, args.repeats)
        print(f"{name}: sweep/plain {rows[name]['ratio_cpu']:.2f} (cpu)", file=sys.stderr)
    median = statistics.median(r["ratio_cpu"] for r in rows.values())
    result = {
        "environment": environment(),
        "featx": featx_revision(),
        "repeats": args.repeats,
        "load_average": os.getloadavg(),
        "models": rows,
        "goal": {"median_sweep_over_plain": f"<= {GOAL}", "median": median, "met": median <= GOAL},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    print("| model | input | plain eval+train (ms) | sweep (ms) | sweep/plain (cpu) | (wall) | floor/plain |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {'x'.join(map(str, r['input']))} | {r['plain_cpu_s'] * 1e3:.1f} | "
            f"{r['sweep_cpu_s'] * 1e3:.1f} | {r['ratio_cpu']:.2f} | {r['ratio_wall']:.2f} | {r['floor_ratio_cpu']:.2f} |"
        )
    verdict = "met" if median <= GOAL else "missed"
    print(f"| **median** | | | | **{median:.2f}** (goal ≤ {GOAL}: {verdict}) | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
