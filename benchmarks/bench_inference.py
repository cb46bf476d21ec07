"""Inference of a featx multi-output backbone against the anchors with the same taps, side by side.

Run from the repository root: ``python benchmarks/bench_inference.py [--repeats 15]``.

ResNet-50 (torchvision and timm), taps layer1..layer4, 2x3x224x224, eval mode, ``torch.no_grad()``, CPU.
Contenders: ``featx.build_backbone``; torchvision ``IntermediateLayerGetter`` and
``create_feature_extractor``; timm ``features_only=True``. All share the same weights and their outputs
are checked equal before timing. Contenders are interleaved within each repetition (order rotating) and
the median is reported; goal: featx <= 1.02x the fastest anchor. Results: ``benchmarks/results/inference.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
import torchvision
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.feature_extraction import create_feature_extractor

import featx
from featx.files import write_text

OUT = Path(__file__).resolve().parent / "results" / "inference.json"
TAPS = ["layer1", "layer2", "layer3", "layer4"]


def contenders(source: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    if source == "torchvision":
        model = torchvision.models.resnet50().eval()
        anchors = {
            "IntermediateLayerGetter": IntermediateLayerGetter(model, {t: t for t in TAPS}),
            "create_feature_extractor": create_feature_extractor(model, {t: t for t in TAPS}),
        }
    else:
        model = timm.create_model("resnet50").eval()
        features = timm.create_model("resnet50", features_only=True, out_indices=(1, 2, 3, 4)).eval()
        features.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")})
        anchors = {"timm features_only": features}
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        path = os.path.join(tmp, "w.safetensors")
        save_file(model.state_dict(), path)
        ours = featx.build_backbone(
            {"model": f"{source}/resnet50", "weights": path, "upto": "layer4", "outputs": TAPS}
        )
    return {"featx": ours.eval(), **anchors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    x = torch.randn(2, 3, 224, 224)
    report: dict[str, object] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "models": {},
    }
    lines = ["| model | contender | median ms | featx / this |", "|---|---|---:|---:|"]
    for source in ("torchvision", "timm"):
        models = contenders(source)
        with torch.no_grad():
            ref = list(models["featx"](x).values())
            for name, m in models.items():
                out = m(x)
                out = list(out.values()) if isinstance(out, dict) else list(out)
                assert all(torch.equal(a, b) for a, b in zip(ref, out, strict=True)), name
            samples: dict[str, list[float]] = {name: [] for name in models}
            names = list(models)
            for rep in range(args.repeats):
                for name in names[rep % len(names) :] + names[: rep % len(names)]:
                    start = time.perf_counter()
                    models[name](x)
                    samples[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(s) for name, s in samples.items()}
        report["models"][source] = {"median_s": medians, "samples_s": samples}
        for name, median in medians.items():
            ratio = medians["featx"] / median
            lines.append(f"| {source}/resnet50 | {name} | {median * 1000:.1f} | {ratio:.3f} |")
    report["table_markdown"] = "\n".join(lines)
    write_text(OUT, json.dumps(report, indent=2) + "\n")
    print(report["table_markdown"])


if __name__ == "__main__":
    main()
