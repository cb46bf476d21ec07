"""``featx.open_features(DIR)``: an extraction read back lazily, by sample key or by row.

Nothing is read until asked for: a row is sliced out of its shard (safetensors through ``safe_open``'s
memory map, npy through ``numpy.load(mmap_mode="r")``). Rows are in the manifest's order — shards in
order, rows within a shard in sorted key order — so ``keys`` is sorted.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from featx.errors import FeatxError, did_you_mean, listing
from featx.extract import writer

if TYPE_CHECKING:
    from safetensors import safe_open


class Features:
    """The features of one extraction. ``[key]`` and ``row(i)`` give ``{output name: tensor}``."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.folder = folder
        self.manifest = manifest
        self.format: str = manifest["format"]
        self.outputs: dict[str, dict] = manifest["outputs"]
        self.keys: list[str] = [k for s in manifest["shards"] for k in s["keys"]]
        self.classes: list[str] = manifest.get("classes", [])
        self.failed: list[dict[str, str]] = manifest["failed"]
        labels = [label for s in manifest["shards"] for label in s["labels"]]
        self.labels: list[int] | None = labels if labels and all(x is not None for x in labels) else None
        self._starts = []
        start = 0
        for s in manifest["shards"]:
            self._starts.append(start)
            start += s["rows"]
        self._rows = {k: i for i, k in enumerate(self.keys)}
        self._handles: dict[int, safe_open] = {}  # shard -> its open safetensors file
        self._arrays: dict[tuple[int, str], np.ndarray] = {}  # (shard, output) -> its memory-mapped .npy

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys)

    def __getitem__(self, key: str) -> dict[str, torch.Tensor]:
        if key not in self._rows:
            failed = next((f for f in self.failed if f["key"] == key), None)
            if failed is not None:
                raise KeyError(f"sample `{key}` failed during extraction: {failed['reason']}")
            raise KeyError(f"no sample `{key}` in {self.folder}{did_you_mean(key, self.keys)}")
        return self.row(self._rows[key])

    def row(self, i: int) -> dict[str, torch.Tensor]:
        """Row ``i`` (0-based, negative from the end) as ``{output name: tensor}``, one sample without a batch dim."""
        n = len(self.keys)
        if not -n <= i < n:
            raise IndexError(f"row {i} is out of range for {n} rows")
        i %= n
        shard = bisect.bisect_right(self._starts, i) - 1
        r = i - self._starts[shard]
        if self.format == "safetensors":
            handle = self._safetensors(shard)
            return {name: handle.get_slice(name)[r : r + 1][0] for name in self.outputs}
        return {name: _tensor(self._npy(shard, name)[r]) for name in self.outputs}

    def numpy(self, name: str) -> np.ndarray:
        """Output ``name`` for every row, ``[rows, ...]``: memory-mapped when it is one npy shard, else
        concatenated in memory. bfloat16 has no numpy type: use ``tensor(name)``."""
        self._check(name)
        if self.outputs[name]["dtype"] == "bfloat16":
            raise FeatxError(
                f"output `{name}` is bfloat16, which numpy has no type for; use .tensor({name!r})"
            )
        parts = [
            self._npy(i, name) if self.format == "npy" else self._safetensors(i).get_tensor(name).numpy()
            for i in range(len(self._starts))
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def tensor(self, name: str) -> torch.Tensor:
        """Output ``name`` for every row as one torch tensor ``[rows, ...]``."""
        self._check(name)
        if self.format == "npy":
            return torch.from_numpy(np.ascontiguousarray(self.numpy(name)))
        parts = [self._safetensors(i).get_tensor(name) for i in range(len(self._starts))]
        return torch.cat(parts) if parts else torch.empty(0)

    def _check(self, name: str) -> None:
        if name not in self.outputs:
            raise FeatxError(
                f"no output `{name}` in {self.folder}{did_you_mean(name, self.outputs)}; outputs: {listing(self.outputs)}"
            )

    def _safetensors(self, shard: int) -> safe_open:
        if shard not in self._handles:
            from safetensors import safe_open

            self._handles[shard] = safe_open(
                self.folder / self.manifest["shards"][shard]["file"], framework="pt"
            )
        return self._handles[shard]

    def _npy(self, shard: int, name: str) -> np.ndarray:
        key = (shard, name)
        if key not in self._arrays:
            path = self.folder / self.manifest["shards"][shard]["files"][name]
            self._arrays[key] = np.load(path, mmap_mode="r", allow_pickle=False)
        return self._arrays[key]

    def __repr__(self) -> str:
        return f"Features({str(self.folder)!r}, rows={len(self)}, outputs={list(self.outputs)}, format={self.format!r})"


def open_features(folder: str | os.PathLike[str]) -> Features:
    """The features ``featx extract`` wrote to ``folder``.

    Raises:
        FeatxError: no ``manifest.json`` there (not an extraction, or one that has not finished: rerun
            the same ``featx extract`` to resume it).
    """
    folder = Path(folder)
    path = folder / writer.MANIFEST
    if not path.is_file():
        hint = (
            "the extraction has not finished; rerun the same featx extract to resume it"
            if (folder / writer.FINGERPRINT).is_file()
            else "not a featx extraction folder"
        )
        raise FeatxError(f"`{folder}` has no {writer.MANIFEST}: {hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FeatxError(f"`{path}` cannot be read: {err}") from None
    return Features(folder, manifest)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array))  # a copy: the memory map is read-only
