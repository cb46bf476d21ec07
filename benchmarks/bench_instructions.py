"""What a sweep costs in instructions, which, unlike seconds, other load on the machine does not move.

Run from the repository root (needs valgrind; each count runs the model under callgrind, a few minutes)::

    python benchmarks/bench_instructions.py                          # efficientnet_b0, convnext_atto
    python benchmarks/bench_instructions.py --models resnet18 regnetx_002 --jobs 2

Per model (timm, random init, seed 0, CPU, one thread, batch 2 at 64x64 as in ``bench_small.py``), two
processes run under ``valgrind --tool=callgrind`` with instrumentation off until the measured part:

- ``plain``: twice one eval plus one train forward of the full model under ``torch.no_grad()``;
- ``sweep``: twice ``featx.sweep(model, x)`` (both modes: every cut between the root's children).

Each first runs its part twice uninstrumented (imports, allocator and kernel caches warm), then switches
instrumentation on (``callgrind_control --instr=on``), zeroes the counters, runs its part twice and dumps.
The ratio is sweep instructions over plain instructions. Counts repeat to 0.1% between runs; they weigh a
cache miss as one instruction, so they rank changes to featx's Python well and time memory traffic badly.
Results go to ``benchmarks/results/instructions.json`` (written atomically) and a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench_sweep import environment  # same folder: run as python benchmarks/<this>

from featx.files import write_text

OUT = Path(__file__).resolve().parent / "results" / "instructions.json"
SIZE = 64

# The measured process: argv = model, size, part. Runs its part twice, then counts two more.
CHILD = """
import os, subprocess, sys
import timm, torch
import featx
torch.set_num_threads(1)
name, size, part = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model = timm.create_model(name, pretrained=False).eval()
x = torch.randn(2, 3, size, size)
def plain():
    with torch.no_grad():
        for mode in (False, True):
            model.train(mode)
            model(x)
    model.eval()
run = {"plain": plain, "sweep": lambda: featx.sweep(model, x)}[part]
run(); run()
def control(*flags):
    subprocess.run(["callgrind_control", *flags, str(os.getpid())], check=True, capture_output=True)
control("--instr=on"); control("--zero")
run(); run()
control("--dump")
"""


def count(model: str, part: str, folder: Path) -> int:
    """Instructions of two runs of ``part`` on ``model``, from callgrind's dump of the measured part."""
    out = folder / f"{model}.{part}.cg"
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-c",
            CHILD,
            model,
            str(SIZE),
            part,
        ],
        check=True,
        capture_output=True,
    )
    dumps = sorted(folder.glob(f"{out.name}.*"))  # the dump callgrind_control asked for: <out>.1
    if not dumps:
        raise RuntimeError(f"callgrind wrote no dump for {model} {part} in {folder}")
    for line in dumps[0].read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no summary line in {dumps[0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_b0", "convnext_atto"])
    parser.add_argument("--jobs", type=int, default=2, help="valgrind processes at once (default 2)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench_instructions: valgrind (with callgrind_control) is not on PATH", file=sys.stderr)
        return 2
    jobs = [(model, part) for model in args.models for part in ("plain", "sweep")]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        counts = dict(zip(jobs, pool.map(lambda job: count(*job, Path(tmp)), jobs), strict=True))
    rows: dict[str, Any] = {
        model: {
            "input": [2, 3, SIZE, SIZE],
            "plain_instructions": counts[model, "plain"],
            "sweep_instructions": counts[model, "sweep"],
            "ratio": counts[model, "sweep"] / counts[model, "plain"],
        }
        for model in args.models
    }
    result = {"environment": environment(), "load_average": os.getloadavg(), "models": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    print("| model | input | plain eval+train (M instructions) | sweep (M) | sweep/plain |")
    print("|---|---|---:|---:|---:|")
    for model, r in rows.items():
        print(
            f"| {model} | 2x3x{SIZE}x{SIZE} | {r['plain_instructions'] / 2e6:.1f} | "
            f"{r['sweep_instructions'] / 2e6:.1f} | {r['ratio']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
