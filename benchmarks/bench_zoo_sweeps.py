"""How long featx takes to sweep the whole ResNet zoo: every cut, eval and train, of all 133 ResNets.

Run from the repository root: ``python benchmarks/bench_zoo_sweeps.py``.

Each model of ``tests/zoo_models.py``'s ResNet zoo (the 123 timm models of the ``resnet``, ``resnetv2``,
``resnest``, ``res2net`` and ``sknet`` modules and the 10 torchvision ResNets; random weights, seed 0, batch 2
at 64 px) is built (not timed), swept once to warm up, then timed over one ``featx.sweep`` of both modes.
The goal (issue 9 §4) is the whole zoo's sweeps in at most 3 minutes on the 2-core machine; building the models
is not part of it. Results: ``benchmarks/results/zoo_sweeps.json``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from zoo_models import build, resnet_zoo  # noqa: E402

import featx  # noqa: E402
from featx.files import write_text  # noqa: E402

GOAL_S = 180.0
OUT = ROOT / "benchmarks" / "results" / "zoo_sweeps.json"


def main() -> int:
    warnings.filterwarnings("ignore")
    rows = []
    for spec in resnet_zoo():
        built = build(spec)
        featx.sweep(built.model, built.x)  # warm-up: first-call costs are not the sweep's
        cpu, wall = time.process_time(), time.perf_counter()
        featx.sweep(built.model, built.x)
        rows.append({"model": spec, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu})
        del built
        gc.collect()
    wall = sum(r["wall_s"] for r in rows)
    result = {
        "models": len(rows),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "sweep_wall_s": wall,
        "sweep_cpu_s": sum(r["cpu_s"] for r in rows),
        "goal": {"sweep_wall_s": f"<= {GOAL_S:.0f}", "met": wall <= GOAL_S},
        "rows": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    write_text(OUT, json.dumps(result, indent=1) + "\n")
    slowest = sorted(rows, key=lambda r: -r["wall_s"])[:3]
    print(
        f"{len(rows)} ResNets swept in {wall:.1f} s (goal <= {GOAL_S:.0f} s: {'met' if wall <= GOAL_S else 'missed'})"
    )
    print("slowest: " + ", ".join(f"{r['model']} {r['wall_s']:.2f} s" for r in slowest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
