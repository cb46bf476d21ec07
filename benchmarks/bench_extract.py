"""featx extract against the plain loop a user writes, in three numeric settings; resume after a kill, torchrun ranks.

Run from the repository root: ``python benchmarks/bench_extract.py [--images 2000] [--model resnet50]``
(``--images 384 --model resnet18 --parts throughput`` on a busy machine).

The benchmark makes its own dataset: ``--images`` random-texture JPEGs at 256x256 in two class folders.
Model: a torchvision ResNet (``--model``, default resnet50) with seeded random weights saved to a safetensors
file, cut at ``layer4``, average-pooled, CPU. Every contender is a fresh process timed end to end (imports,
model build, the whole dataset), with the same DataLoader (workers, batch size; pinned memory on CUDA only)
and torch threads:

- ``throughput``, in each setting of ``--settings`` (``float32``; ``autocast_channels_last``: ``--autocast
  --channels-last``; ``compile``: ``--compile``), ``--repeats`` interleaved pairs (the order alternates), the
  median kept:
  - ``plain``: ``ImageFolder`` + ``DataLoader`` + ``nn.Sequential(*children[:-2])`` + avg pool in the same
    setting (``torch.autocast``, ``channels_last`` model and input, ``torch.compile``), collected and written
    once at the end with ``torch.save``; the transform is the one featx resolves, so both decode and
    preprocess the same way;
  - ``featx``: ``featx extract torchvision/<model> --upto layer4 --pool avg`` with the setting's flags
    (verification, fingerprint, shards, manifest included).
  Besides wall time: the CPU time of each process and its workers (``getrusage``, less sensitive to other
  work on the machine than wall time) and the loop alone (from the first batch to the end: the plain loop's
  own timer, featx's ``seconds.wall``). Each setting's features are compared with the plain float32 loop's:
  the lowest cosine similarity of a row (featx and plain), and whether featx's float32 features are bit-equal.
  Shards hold whole batches (``--shard-size`` a multiple of ``--batch-size``), so ``--compile`` compiles once;
  before its timed runs, one untimed run of each contender fills torch's compile cache, as any run after a
  first one finds it.
- ``resume``: ``featx extract`` killed (fault injection) after half its shards, then rerun; the rerun is
  compared with a fresh ``featx extract`` of the remaining half only (a list of those images);
- ``torchrun``: ``torchrun --nproc-per-node 2 -m featx extract`` (1 torch thread per rank) against
  ``featx`` (one process);
- ``verify``: ``featx.open_features(DIR).verify()`` on a finished float32 store (the manifest checked,
  every shard file read and its sha256 compared), in this process, 3 times; the slowest (the first, paying
  lazy imports) against that extraction.

Goals: featx >= 1.0x the plain loop's images/s in every setting, features at cosine >= 0.999 against float32;
the resumed rerun <= 1.1x the fresh run of the remaining half; opening and verifying a store <= 5% of
extracting it. Results, with the numeric environment (``featx.numerics.environment``):
``benchmarks/results/extract.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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
SETTINGS = {
    "float32": [],
    "autocast_channels_last": ["--autocast", "--channels-last"],
    "compile": ["--compile"],
}
PARTS = ("throughput", "resume", "torchrun", "verify")

PLAIN = """
import json, sys, time, torch, torchvision
from torch import nn
from safetensors.torch import load_file
from featx.extraction.preprocess import resolve_preprocessing
from featx.models import ModelSource
data, weights, out, batch, workers, name = sys.argv[1:4] + [int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]]
flags = set(sys.argv[7:])
model = getattr(torchvision.models, name)()
model.load_state_dict(load_file(weights))
model.eval()
source = ModelSource.parse(f"torchvision/{name}", weights)
transform = resolve_preprocessing(model, source).transform  # the same as featx's


class Features(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*list(model.children())[:-2])

    def forward(self, x):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.body(x), 1), 1)


net = Features()
if "--channels-last" in flags:
    net = net.to(memory_format=torch.channels_last)
if "--compile" in flags:
    net = torch.compile(net)
dataset = torchvision.datasets.ImageFolder(data, transform=transform)
loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)
features, labels = [], []
started = None
with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled="--autocast" in flags):
    for x, y in loader:
        started = started or time.perf_counter()
        if "--channels-last" in flags:
            x = x.contiguous(memory_format=torch.channels_last)
        features.append(net(x).float())
        labels.append(y)
loop = time.perf_counter() - started
torch.save({"features": torch.cat(features), "labels": torch.cat(labels)}, out)
print(json.dumps({"loop_seconds": loop}))
"""


def make_images(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        # smooth noise: a JPEG of ~20 KB, closer to a photo's decode cost than white noise
        small = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((256, 256), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)


def timed(
    command: list[str], env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,)
) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the process and its children, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        command, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode not in ok:
        raise SystemExit(f"{command[:6]} exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds, cpu, done.stdout


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The lowest cosine similarity of a row of ``a`` with the same row of ``b``."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--model", default="resnet50", help="a torchvision ResNet (default: resnet50)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="plain/featx pairs per setting, interleaved")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"of {', '.join(SETTINGS)}")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"of {', '.join(PARTS)}")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    settings = [s for s in args.settings.split(",") if s]
    parts = [p for p in args.parts.split(",") if p]
    threads = torch.get_num_threads()
    # whole batches per shard, 8 shards (or more when a batch does not divide the data into 8)
    shard = max(args.batch_size, args.images // 8 // args.batch_size * args.batch_size)
    result: dict = {
        "machine": {"cores": os.cpu_count(), "torch_threads": threads, "load_average": os.getloadavg()},
        "setup": {
            "images": args.images,
            "size": 256,
            "model": f"torchvision/{args.model}",
            "cut": "layer4",
            "pool": "avg",
            "batch_size": args.batch_size,
            "workers": args.workers,
            "shard_size": shard,
            "repeats": args.repeats,
            "settings": {name: SETTINGS[name] for name in settings},
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        make_images(data, args.images)
        torch.manual_seed(0)
        weights = tmp / f"{args.model}.safetensors"
        from safetensors.torch import save_file

        save_file(getattr(torchvision.models, args.model)().state_dict(), weights)

        def extract(out: Path, source: Path = data, *extra: str) -> list[str]:
            return [
                "-m",
                "featx",
                "extract",
                f"torchvision/{args.model}",
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

        def plain_command(out: Path, flags: list[str]) -> list[str]:
            command = [sys.executable, "-c", PLAIN, str(data), str(weights), str(out), str(args.batch_size)]
            return [*command, str(args.workers), args.model, *flags]

        import featx

        reference = None  # the plain float32 loop's features
        first_store = None
        if "throughput" in parts:
            result["throughput"] = {}
            for name in settings:
                flags = SETTINGS[name]
                runs: dict[str, dict[str, list[float]]] = {
                    c: {"wall": [], "cpu": [], "loop": []} for c in ("plain", "featx")
                }
                if "--compile" in flags:  # torch's compile cache filled, as on any run after the first
                    timed(plain_command(tmp / "warm.pt", flags))
                    timed([sys.executable, *extract(tmp / f"warm-{name}", data, *flags)])
                for r in range(args.repeats):
                    order = ("plain", "featx") if r % 2 == 0 else ("featx", "plain")
                    for contender in order:
                        if contender == "plain":
                            wall, cpu, stdout = timed(plain_command(tmp / f"plain-{name}-{r}.pt", flags))
                            loop = json.loads(stdout.strip().splitlines()[-1])["loop_seconds"]
                        else:
                            store = tmp / f"featx-{name}-{r}"
                            wall, cpu, stdout = timed(
                                [sys.executable, *extract(store, data, *flags, "--json")]
                            )
                            loop = json.loads(stdout)["seconds"]["wall"]
                        for key, value in (("wall", wall), ("cpu", cpu), ("loop", loop)):
                            runs[contender][key].append(value)
                        print(name, r, contender, round(wall, 2), round(cpu, 2), round(loop, 2), flush=True)
                plain_features = torch.load(tmp / f"plain-{name}-0.pt")["features"]
                store = tmp / f"featx-{name}-0"
                ours = featx.open_features(store).tensor("layer4").float()
                if name == "float32":
                    reference, first_store = plain_features, store
                median = {c: {k: statistics.median(v) for k, v in m.items()} for c, m in runs.items()}
                entry: dict = {
                    "seconds": runs,
                    "median": median,
                    "images_per_second": {c: args.images / median[c]["wall"] for c in runs},
                    "ratios": {  # featx over plain, in images/s (or plain's cost over featx's)
                        "featx_vs_plain_images_per_second": median["plain"]["wall"] / median["featx"]["wall"],
                        "featx_vs_plain_cpu": median["plain"]["cpu"] / median["featx"]["cpu"],
                        "featx_vs_plain_loop": median["plain"]["loop"] / median["featx"]["loop"],
                        "per_repeat": [
                            p / f for p, f in zip(runs["plain"]["wall"], runs["featx"]["wall"], strict=True)
                        ],
                    },
                    "environment": json.loads((store / "manifest.json").read_text())["environment"],
                }
                if reference is not None:
                    entry["features"] = {
                        "featx_min_cosine_vs_float32": cosine(ours, reference),
                        "plain_min_cosine_vs_float32": cosine(plain_features, reference),
                        "featx_equal_to_plain": torch.equal(ours, plain_features),
                        "featx_max_abs_diff_vs_plain": float((ours - plain_features).abs().max()),
                    }
                result["throughput"][name] = entry

        if "resume" in parts:
            half = 4
            killed, _, _ = timed(
                [sys.executable, *extract(tmp / "resume")], {"FEATX_EXTRACT_EXIT_AFTER": str(half)}, ok=(17,)
            )
            resumed, _, _ = timed([sys.executable, *extract(tmp / "resume")])
            keys = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.jpg"))
            listing = tmp / "rest.txt"
            listing.write_text("".join(f"{data / k}\n" for k in keys[half * shard :]))
            rest, _, _ = timed([sys.executable, *extract(tmp / "rest", listing)])
            result["resume"] = {
                "seconds": {"killed_at_half": killed, "resumed": resumed, "fresh_remaining_half": rest},
                "resume_vs_fresh_remaining_half": resumed / rest,
                "goal": "<= 1.1",
            }
        if first_store is None and ("torchrun" in parts or "verify" in parts):
            first_store = tmp / "featx"
            timed([sys.executable, *extract(first_store)])
        if "torchrun" in parts:
            assert first_store is not None
            one_s = timed([sys.executable, *extract(tmp / "one")])[0]
            torchrun, _, _ = timed(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc-per-node",
                    "2",
                    *extract(tmp / "ranks"),
                ],
                {"OMP_NUM_THREADS": "1"},
            )
            one = featx.open_features(tmp / "one").tensor("layer4")
            ranks = featx.open_features(tmp / "ranks").tensor("layer4")
            result["torchrun"] = {
                "seconds": {"one_process": one_s, "torchrun_2_ranks": torchrun},
                "speedup": one_s / torchrun,
                # 1 thread per rank vs 2 threads: other float rounding
                "max_abs_diff_vs_one_process": float((one - ranks).abs().max()),
            }
        if "verify" in parts:
            assert first_store is not None
            verify_s = []
            for _ in range(3):
                started = time.perf_counter()
                featx.open_features(first_store).verify()
                verify_s.append(time.perf_counter() - started)
            extract_s = (
                result["throughput"]["float32"]["seconds"]["featx"]["wall"][0]
                if "float32" in result.get("throughput", {})
                else timed([sys.executable, *extract(tmp / "timed")])[0]
            )
            result["verify"] = {
                "seconds": verify_s,
                "store_bytes": sum(p.stat().st_size for p in first_store.rglob("*") if p.is_file()),
                "open_and_verify_vs_extract": max(verify_s) / extract_s,  # the first pays lazy imports
                "goal": "<= 0.05",
            }
    skipped = [part for part in PARTS if part not in parts]
    if skipped and args.out.exists():  # what this run did not measure: the last run that did, as it was
        previous = json.loads(args.out.read_text())
        result["earlier_run"] = (
            previous.get("earlier_run", previous) if "throughput" in previous else previous
        )
        result["earlier_run_note"] = f"not rerun here: {', '.join(skipped)}; see earlier_run"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
