"""Exporting the Faster R-CNN ResNet-50 FPN backbone, and running the artifacts against PyTorch.

Run from the repository root: ``python benchmarks/bench_export.py [--repeats 3] [--size 800]``.

The backbone is ``configs/fasterrcnn_resnet50_fpn.yaml`` (torchvision ResNet-50, taps layer1..layer4,
FrozenBatchNorm2d, 256-channel FPN with the ``pool`` level) with seeded weights. Timed: ``featx.export``
to safetensors, pt2 and ONNX (each includes its check against the PyTorch backbone at 1x3x97x131 and
3x3x160x128), then inference at 1x3xSIZExSIZE on the CPU: the PyTorch backbone under ``torch.no_grad()``,
the ONNX model in onnxruntime (CPUExecutionProvider, default session options) and the reloaded pt2
``ExportedProgram``. Contenders are interleaved within each repetition (order rotating); the median is
reported, with the ratio to PyTorch. Nothing is asserted. Results: ``benchmarks/results/export.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
import yaml
from bench_sweep import environment  # same folder: run as python benchmarks/<this file>
from safetensors.torch import save_file

import featx
from featx.export import export
from featx.files import write_text

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "results" / "export.json"
CONFIG = ROOT / "configs" / "fasterrcnn_resnet50_fpn.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=800)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    import onnxruntime

    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        save_file(torchvision.models.resnet50().state_dict(), str(tmp / "resnet50.safetensors"))
        config = {**yaml.safe_load(CONFIG.read_text()), "weights": "resnet50.safetensors"}
        (tmp / "frcnn.yaml").write_text(yaml.safe_dump(config))
        exports = {}
        for fmt in ("safetensors", "pt2", "onnx"):
            start = time.perf_counter()
            # pt2 and ONNX from the safetensors export: the same FPN weights (a config's FPN without
            # weights is a new random init on every build)
            source = tmp / ("frcnn.yaml" if fmt == "safetensors" else "frcnn.safetensors")
            check = export(source, tmp / f"frcnn.{fmt}")
            exports[fmt] = {
                "seconds_total": time.perf_counter() - start,  # build + export + check + write
                "seconds_export": check.seconds,  # the exporter alone (trace, serialise)
                "bytes": check.size,
                "atol": check.atol,
                "rtol": check.rtol,
                "max_abs_diff": check.max_abs_diff,
                "max_rel_diff": check.max_rel_diff,
            }
            print(f"exported {fmt} in {exports[fmt]['seconds_total']:.1f} s", file=sys.stderr)

        backbone = featx.build_backbone(tmp / "frcnn.safetensors").eval()
        session = onnxruntime.InferenceSession(str(tmp / "frcnn.onnx"), providers=["CPUExecutionProvider"])
        program = torch.export.load(str(tmp / "frcnn.pt2")).module()
        x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        feed = {"input": x.numpy()}

        def run_torch() -> list[torch.Tensor]:
            with torch.no_grad():
                return list(backbone(x).values())

        def run_pt2() -> list[torch.Tensor]:
            with torch.no_grad():
                return list(program(x))

        def run_onnx() -> list[torch.Tensor]:
            return [torch.from_numpy(a) for a in session.run(None, feed)]

        contenders = {"pytorch": run_torch, "onnxruntime": run_onnx, "pt2": run_pt2}
        reference = run_torch()
        diffs = {
            name: max(float((a - b).abs().max()) for a, b in zip(fn(), reference, strict=True))
            for name, fn in contenders.items()
        }  # also the warm-up
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        names = list(contenders)
        for rep in range(args.repeats):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                start = time.perf_counter()
                contenders[name]()
                samples[name].append(time.perf_counter() - start)
            print(f"repetition {rep + 1}/{args.repeats}", file=sys.stderr)
    median = {name: statistics.median(s) for name, s in samples.items()}
    result = {
        "benchmark": "export",
        "config": str(CONFIG.relative_to(ROOT)),
        "input_shape": list(x.shape),
        "repeats": args.repeats,
        "exports": exports,
        "inference": {
            name: {
                "seconds": median[name],
                "samples_s": samples[name],
                "ratio_to_pytorch": median[name] / median["pytorch"],
                "max_abs_diff_at_input": diffs[name],
            }
            for name in contenders
        },
        "onnxruntime_version": onnxruntime.__version__,
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        **environment(),
    }
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"| contender | {'x'.join(map(str, x.shape))} median s | ratio to PyTorch | max abs diff |")
    print("|---|---:|---:|---:|")
    for name in contenders:
        r = result["inference"][name]
        print(
            f"| {name} | {r['seconds']:.3f} | {r['ratio_to_pytorch']:.2f} | {r['max_abs_diff_at_input']:.3g} |"
        )
    print()
    print("| format | export s (exporter) | total s (build+export+check) | MB | max abs diff at check |")
    print("|---|---:|---:|---:|---:|")
    for fmt, e in exports.items():
        print(
            f"| {fmt} | {e['seconds_export']:.1f} | {e['seconds_total']:.1f} | {e['bytes'] / 1e6:.0f} "
            f"| {e['max_abs_diff']:.3g} |"
        )


if __name__ == "__main__":
    main()
