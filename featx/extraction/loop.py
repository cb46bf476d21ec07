"""The data loop of an extraction: this rank's shards through one DataLoader and the cut, a shard at a time.

Images are decoded with Pillow and transformed in DataLoader workers; an image that cannot be read, decoded
or transformed comes back with its reason instead of raising, so it is listed and the run goes on. Batches
never cross a shard, so a shard's rows are the same bits on one process or many.
"""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Generator, Mapping, Sequence

import torch

from featx.errors import FeatxError, one_line
from featx.extraction import signals
from featx.extraction.preprocess import Preprocessing
from featx.extraction.sources import Sample
from featx.numerics import DTYPES, Numerics


class Images(torch.utils.data.Dataset):
    """Samples decoded with Pillow and transformed; a failure is returned with its reason, not raised."""

    def __init__(self, samples: Sequence[tuple[int, Sample]], transform) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, j: int) -> tuple[int, torch.Tensor | None, str | None, float, float]:
        index, sample = self.samples[j]
        return (index, *load(sample, self.transform))


def load(sample: Sample, transform) -> tuple[torch.Tensor | None, str | None, float, float]:
    """``(tensor, None, decode s, transform s)``, or ``(None, reason, ...)`` for an unreadable image."""
    from PIL import Image

    t0 = time.perf_counter()
    try:
        with Image.open(io.BytesIO(sample.read())) as image:
            image.load()
            rgb = image.convert("RGB")
    except Exception as err:  # corrupt, truncated, unreadable: listed, never raised
        message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", one_line(err))  # run-specific noise
        return None, f"cannot decode: {type(err).__name__}: {message}", time.perf_counter() - t0, 0.0
    t1 = time.perf_counter()
    try:
        x = transform(rgb)
    except Exception as err:
        return (
            None,
            f"cannot transform: {type(err).__name__}: {one_line(err)}",
            t1 - t0,
            time.perf_counter() - t1,
        )
    return x, None, t1 - t0, time.perf_counter() - t1


def _collate(items: list) -> tuple[list, torch.Tensor | None]:
    good = [it[1] for it in items if it[1] is not None]
    return [(it[0], it[2], it[3], it[4]) for it in items], torch.stack(good) if good else None


class Loop:
    """One DataLoader over this rank's shards, batches never crossing a shard; yields each finished shard."""

    def __init__(self, extractor, dtypes, shapes, prep, dev, batch_size, workers, numerics: Numerics) -> None:
        self.shapes: Mapping[str, Sequence[int]] = shapes  # per output, per sample: an empty shard's shape
        self.extractor, self.dtypes, self.prep, self.dev = extractor, dtypes, prep, dev
        self.batch_size = batch_size
        self.workers = default_workers() if workers is None else workers
        self.numerics = numerics  # autocast and channels-last around the extractor (compiled by the caller)

    def __call__(self, shards, mine, progress) -> Generator[tuple[int, dict], None, None]:
        from tqdm import tqdm

        flat: list[tuple[int, Sample]] = []
        batches: list[list[int]] = []
        plan: list[tuple[int, bool]] = []  # per batch: shard, last batch of it
        offsets = {}
        start = 0
        for i, shard in enumerate(shards):
            offsets[i] = start
            start += len(shard)
        for i in mine:
            base = len(flat)
            flat += [(offsets[i] + r, s) for r, s in enumerate(shards[i])]
            rows = list(range(base, len(flat)))
            chunks = [rows[k : k + self.batch_size] for k in range(0, len(rows), self.batch_size)]
            batches += chunks
            plan += [(i, k == len(chunks) - 1) for k in range(len(chunks))]
        if not batches:
            return
        loader = torch.utils.data.DataLoader(
            Images(flat, self.prep.transform),
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=_collate,
            # pinned pages only where a copy to the device can overlap compute: CUDA (the copy below is non_blocking)
            pin_memory=self.dev.type == "cuda",
            persistent_workers=False,
            worker_init_fn=signals.quiet_worker,
        )
        bar = tqdm(
            total=len(flat), unit="img", disable=None if progress is None else not progress, smoothing=0.1
        )
        samples = dict(flat)  # global index -> sample
        acc = Shard()
        try:
            for (i, last), (meta, x) in zip(plan, loader, strict=True):
                if x is not None:
                    t0 = time.perf_counter()
                    y = self._forward(x, next(samples[m[0]].key for m in meta if m[1] is None))
                    acc.outputs.append({n: t.to("cpu", DTYPES[self.dtypes[n]]) for n, t in y.items()})
                    acc.seconds["model"] += time.perf_counter() - t0
                for index, reason, decode, transform in meta:
                    acc.add(samples[index], index, reason, decode, transform)
                bar.update(len(meta))
                if last:
                    yield i, acc.finish(self.dtypes, self.shapes)
                    acc = Shard()
        finally:
            bar.close()

    def _forward(self, x: torch.Tensor, first: str) -> dict[str, torch.Tensor]:
        """The extractor on one batch in the run's numeric setting; a batch it fails on is one line naming
        its first sample (the first batch passed before the loop: this is a later batch, or --compile)."""
        try:
            with torch.inference_mode(), self.numerics.running(self.dev):
                return self.extractor(self.numerics.input(x.to(self.dev, non_blocking=True)))
        except FeatxError:
            raise
        except Exception as err:
            compiled = " under --compile (torch.compile; run without it)" if self.numerics.compile else ""
            raise FeatxError(
                f"the model fails{compiled} on the batch of {len(x)} images from `{first}`, input "
                f"{list(x.shape)}: {type(err).__name__}: {one_line(err)}; the shards written before it are kept"
            ) from None


class Shard:
    """The rows of one shard as its batches come in."""

    def __init__(self) -> None:
        self.outputs: list[dict[str, torch.Tensor]] = []
        self.index: list[int] = []
        self.keys: list[str] = []
        self.labels: list[int | None] = []
        self.failed: list[dict[str, str]] = []
        self.seconds = {"decode": 0.0, "transform": 0.0, "model": 0.0}

    def add(self, sample: Sample, index: int, reason: str | None, decode: float, transform: float) -> None:
        self.seconds["decode"] += decode
        self.seconds["transform"] += transform
        if reason is not None:
            self.failed.append({"key": sample.key, "reason": reason})
            return
        self.index.append(index)
        self.keys.append(sample.key)
        self.labels.append(sample.label)

    def finish(self, dtypes: Mapping[str, str], shapes: Mapping[str, Sequence[int]]) -> dict:
        if self.outputs:
            tensors = {n: torch.cat([o[n] for o in self.outputs]) for n in self.outputs[0]}
        else:  # every image of the shard failed: zero rows of the outputs' shape, so shards concatenate
            tensors = {n: torch.empty((0, *shapes[n]), dtype=DTYPES[d]) for n, d in dtypes.items()}
        return {
            "tensors": tensors,
            "index": self.index,
            "keys": self.keys,
            "labels": self.labels,
            "failed": self.failed,
            "seconds": self.seconds,
        }


def first_batch(samples: Sequence[Sample], prep: Preprocessing, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` images of the dataset that decode, as one batch, and their keys."""
    xs, keys, reasons = [], [], []
    for sample in samples:
        x, reason, _, _ = load(sample, prep.transform)
        if x is None:
            reasons.append(f"`{sample.key}`: {reason}")
            continue
        xs.append(x)
        keys.append(sample.key)
        if len(xs) == n:
            break
    if not xs:
        raise FeatxError(f"no image of --data decodes ({len(reasons)} tried; first: {reasons[0]})")
    return torch.stack(xs), keys


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return min(4, cores)
