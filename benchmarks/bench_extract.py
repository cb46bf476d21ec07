"""featx extract against the plain loop a user writes, resume after a kill, and torchrun ranks.

Run from the repository root: ``python benchmarks/bench_extract.py [--images 2000] [--batch-size 32]``.

The benchmark makes its own dataset: ``--images`` random-texture JPEGs at 256x256 in two class folders.
Model: torchvision ResNet-50 with seeded random weights saved to a safetensors file, cut at ``layer4``,
average-pooled, float32, CPU. Every contender is a fresh process timed end to end (imports, model build,
the whole dataset), with the same DataLoader workers and torch threads:

- ``plain``: ``ImageFolder`` + ``DataLoader`` + ``nn.Sequential(*children[:-2])`` + avg pool, collected
  and written once at the end with ``torch.save``; the transform is the one featx resolves (ImageNet
  default eval transform), so both decode and preprocess the same way;
- ``featx``: ``featx extract torchvision/resnet50 --upto layer4 --pool avg`` (verification, fingerprint,
  shards and manifest included);
- ``resume``: ``featx extract`` killed (fault injection) after half its shards, then rerun; the rerun is
  compared with a fresh ``featx extract`` of the remaining half only (a list of those images);
- ``torchrun2``: ``torchrun --nproc-per-node 2 -m featx extract`` (1 torch thread per rank) against
  ``featx`` (one process);
- ``verify``: ``featx.open_features(DIR).verify()`` on the finished ``featx`` store (the manifest checked,
  every shard file read and its sha256 compared), in this process, 3 times; the slowest (the first, paying
  lazy imports) against the ``featx`` extraction of that store.

Goals: featx >= 0.95x the plain loop's images/s; the resumed rerun <= 1.1x the fresh run of the remaining
half; opening and verifying a store <= 5% of extracting it. Results: ``benchmarks/results/extract.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from featx.files import write_text

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "results" / "extract.json"

PLAIN = """
import sys, time, torch, torchvision
from torch import nn
from safetensors.torch import load_file
from featx.extraction.preprocess import resolve_preprocessing
from featx.models import ModelSource
data, weights, out, batch, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
model = torchvision.models.resnet50()
model.load_state_dict(load_file(weights))
model.eval()
source = ModelSource.parse("torchvision/resnet50", weights)
transform = resolve_preprocessing(model, source).transform  # the same as featx's
body = nn.Sequential(*list(model.children())[:-2])
dataset = torchvision.datasets.ImageFolder(data, transform=transform)
loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)
features, labels = [], []
with torch.inference_mode():
    for x, y in loader:
        features.append(torch.flatten(nn.functional.adaptive_avg_pool2d(body(x), 1), 1))
        labels.append(y)
torch.save({"features": torch.cat(features), "labels": torch.cat(labels)}, out)
"""


def make_images(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        # smooth noise: a JPEG of ~20 KB, closer to a photo's decode cost than white noise
        small = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((256, 256), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)


def timed(command: list[str], env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,)) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        command, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode not in ok:
        raise SystemExit(f"{command[:6]} exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="plain/featx pairs, interleaved; best is kept")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        make_images(data, args.images)
        torch.manual_seed(0)
        weights = tmp / "resnet50.safetensors"
        from safetensors.torch import save_file

        save_file(torchvision.models.resnet50().state_dict(), weights)
        shard = max(1, args.images // 8)

        def featx(out: Path, source: Path = data, *extra: str) -> list[str]:
            return [
                "-m",
                "featx",
                "extract",
                "torchvision/resnet50",
                "--weights",
                str(weights),
                "--data",
                str(source),
                "--out",
                str(out),
                "--upto",
                "layer4",
                "--pool",
                "avg",
                "--batch-size",
                str(args.batch_size),
                "--shard-size",
                str(shard),
                "--workers",
                str(args.workers),
                "--no-progress",
                *extra,
            ]

        plain_s, featx_s = [], []
        for r in range(args.repeats):
            plain_s.append(
                timed(
                    [
                        sys.executable,
                        "-c",
                        PLAIN,
                        str(data),
                        str(weights),
                        str(tmp / f"plain{r}.pt"),
                        str(args.batch_size),
                        str(args.workers),
                    ]
                )
            )
            featx_s.append(timed([sys.executable, *featx(tmp / f"featx{r}")]))
        plain, ours = min(plain_s), min(featx_s)

        half = 4
        killed = timed(
            [sys.executable, *featx(tmp / "resume")], {"FEATX_EXTRACT_EXIT_AFTER": str(half)}, ok=(17,)
        )
        resumed = timed([sys.executable, *featx(tmp / "resume")])
        keys = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.jpg"))
        listing = tmp / "rest.txt"
        listing.write_text("".join(f"{data / k}\n" for k in keys[half * shard :]))
        rest = timed([sys.executable, *featx(tmp / "rest", listing)])

        torchrun = timed(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *featx(tmp / "ranks")],
            {"OMP_NUM_THREADS": "1"},
        )
        import featx

        verify_s = []
        for _ in range(3):
            started = time.perf_counter()
            featx.open_features(tmp / "featx0").verify()
            verify_s.append(time.perf_counter() - started)
        store_bytes = sum(p.stat().st_size for p in (tmp / "featx0").rglob("*") if p.is_file())
        one = featx.open_features(tmp / "featx0").tensor("layer4")
        ranks = featx.open_features(tmp / "ranks").tensor("layer4")
        ranks_diff = float((one - ranks).abs().max())  # 1 thread per rank vs 2 threads: other float rounding
        plain_features = torch.load(tmp / "plain0.pt")["features"]
    result = {
        "machine": {"cores": os.cpu_count(), "torch_threads": threads, "load_average": os.getloadavg()},
        "setup": {
            "images": args.images,
            "size": 256,
            "model": "torchvision/resnet50",
            "cut": "layer4",
            "pool": "avg",
            "batch_size": args.batch_size,
            "workers": args.workers,
            "shard_size": shard,
            "repeats": args.repeats,
        },
        "seconds": {
            "plain": plain_s,
            "featx": featx_s,
            "killed_at_half": killed,
            "resumed": resumed,
            "fresh_remaining_half": rest,
            "torchrun_2_ranks": torchrun,
            "open_and_verify": verify_s,
        },
        "store_bytes": store_bytes,
        "images_per_second": {
            "plain": args.images / plain,
            "featx": args.images / ours,
            "torchrun_2_ranks": args.images / torchrun,
        },
        "ratios": {
            "featx_vs_plain_images_per_second": plain / ours,
            "resume_vs_fresh_remaining_half": resumed / rest,
            "torchrun_2_ranks_vs_1_process_speedup": ours / torchrun,
            "open_and_verify_vs_extract": max(verify_s) / featx_s[0],  # the first: it pays lazy imports
        },
        "goals": {
            "featx_vs_plain_images_per_second": ">= 0.95",
            "resume_vs_fresh_remaining_half": "<= 1.1",
            "open_and_verify_vs_extract": "<= 0.05",
        },
        "features": {
            "featx_equal_to_plain": torch.equal(plain_features, one),
            "torchrun_vs_one_process_max_abs_diff": ranks_diff,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
