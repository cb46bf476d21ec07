"""What building a backbone from a weights file costs: featx against the usual way, side by side.

Run from the repository root::

    python benchmarks/bench_build.py            # resnet152 cut at layer2, resnet50 cut at layer3

Each contender runs in a fresh interpreter, after importing torch, torchvision, timm and featx (with
``featx.backbone``, which ``import featx`` leaves until first used); the peak-RSS mark is then reset (``/proc/self/clear_refs``), so what counts is the build alone:

- ``featx``: ``featx.build_backbone(config)`` with ``weights:`` a safetensors file — the model is built with
  its parameters on the meta device and only the kept children's tensors are read;
- ``usual``: build the full model, load the full state dict from the same file, truncate
  (``nn.Sequential(*children[:k])``) — what timm ``features_only`` and most training code do.

Peak RSS above the baseline is compared with the kept weights' bytes (goal: featx <= 1.5x kept bytes,
and >= 3x lower than the usual way). Results go to ``benchmarks/results/build.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from featx.files import write_text

CASES = [("resnet152", "layer2"), ("resnet50", "layer3")]
OUT = Path(__file__).resolve().parent / "results" / "build.json"

CHILD = r"""
import json, sys, time
import torch, torchvision, timm, featx
import featx.backbone  # featx imports its modules when first used: the build's count as imports, not as the build
from safetensors.torch import load_file
name, upto, path, how = sys.argv[1:5]
torch.set_num_threads(1)
def status(key):  # kB
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS mark, so the imports' own peak does not count
base = status("VmRSS")
start = time.perf_counter()
if how == "featx":
    backbone = featx.build_backbone({"model": f"torchvision/{name}", "weights": path, "upto": upto,
                                     "outputs": [upto], "verify": {"input_shape": [1, 3, 32, 32]}})
    kept = sum(t.numel() * t.element_size() for t in backbone.state_dict().values())
else:
    model = torchvision.models.get_model(name)
    model.load_state_dict(load_file(path))
    names = [n for n, _ in model.named_children()]
    backbone = torch.nn.Sequential(*list(model.children())[: names.index(upto) + 1])
    kept = sum(t.numel() * t.element_size() for t in backbone.state_dict().values())
seconds = time.perf_counter() - start
peak = status("VmHWM")
print(json.dumps({"peak_above_baseline_bytes": (peak - base) * 1024, "kept_bytes": kept, "seconds": seconds}))
"""


def run(name: str, upto: str, path: str, how: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, name, upto, path, how], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import torchvision
    from safetensors.torch import save_file

    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cases": []}
    lines = [
        "| model | cut | kept MB | featx peak MB | usual peak MB | featx/kept | usual/featx | featx s | usual s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, upto in CASES:
            path = os.path.join(tmp, f"{name}.safetensors")
            save_file(torchvision.models.get_model(name).state_dict(), path)
            featx_run = min(
                (run(name, upto, path, "featx") for _ in range(3)),
                key=lambda r: r["peak_above_baseline_bytes"],
            )
            usual_run = min(
                (run(name, upto, path, "usual") for _ in range(3)),
                key=lambda r: r["peak_above_baseline_bytes"],
            )
            mb = 1 / 2**20
            case = {
                "model": f"torchvision/{name}",
                "upto": upto,
                "kept_bytes": featx_run["kept_bytes"],
                "featx": featx_run,
                "usual": usual_run,
                "featx_over_kept": featx_run["peak_above_baseline_bytes"] / featx_run["kept_bytes"],
                "usual_over_featx": usual_run["peak_above_baseline_bytes"]
                / featx_run["peak_above_baseline_bytes"],
            }
            results["cases"].append(case)
            lines.append(
                f"| {name} | {upto} | {case['kept_bytes'] * mb:.0f} | {featx_run['peak_above_baseline_bytes'] * mb:.0f} "
                f"| {usual_run['peak_above_baseline_bytes'] * mb:.0f} | {case['featx_over_kept']:.2f} "
                f"| {case['usual_over_featx']:.1f} | {featx_run['seconds']:.2f} | {usual_run['seconds']:.2f} |"
            )
    results["table_markdown"] = "\n".join(lines)
    write_text(OUT, json.dumps(results, indent=2) + "\n")
    print(results["table_markdown"])


if __name__ == "__main__":
    main()
