"""Shards, done markers and the manifest: the files of an extraction, each whole or absent.

Layout of ``DIR`` (docs/extract.md is the contract):

- ``fingerprint.json``: what the features are a function of; written once, before the first shard.
- safetensors: ``shard-00000.safetensors`` holding one tensor per output (``[rows, ...]``) and
  ``sample_index`` (int64 ``[rows]``, the row's index into the sorted sample keys).
- npy: ``<output>/<output>-00000.npy`` per output (``[rows, ...]``) and ``metadata/metadata-00000.npy``,
  a numpy structured table (``key``, ``sample_index``, ``label``) — the embedding-reader/autofaiss
  layout of one folder of ``.npy`` files per embedding plus a metadata folder of the same order; with
  pyarrow installed, ``metadata/metadata-00000.parquet`` as well (column ``image_path`` = the key).
- ``shard-00000.done``: JSON written after the shard's files, naming the fingerprint, the signature of its
  inputs (``inputs``: its samples' keys and file stamps, ``sources.signature``), its keys, labels, failed
  samples and timings. A shard counts only when its marker exists with the run's fingerprint and the
  signature of the inputs as they are listed now: a shard whose images changed since is computed again.
- ``manifest.json``: written last by rank 0, from the markers, after checking every sample is there once.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from featx.errors import FeatxError, listing
from featx.files import replacing, write_text

FINGERPRINT = "fingerprint.json"
MANIFEST = "manifest.json"
INDEX = "sample_index"
METADATA = "metadata"
# A fault-injection hook for tests and the resume benchmark: exit hard after writing this many shards.
EXIT_AFTER_ENV = "FEATX_EXTRACT_EXIT_AFTER"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def marker_path(out: Path, i: int) -> Path:
    return out / f"{shard_name(i)}.done"


def shard_files(out: Path, i: int, fmt: str, outputs: Sequence[str]) -> dict[str, str]:
    """The data files of shard ``i``, relative to ``out``: ``{"file": ...}`` or per output plus metadata."""
    if fmt == "safetensors":
        return {"file": f"{shard_name(i)}.safetensors"}
    return {
        "file": f"{METADATA}/{METADATA}-{i:05d}.npy",
        **{name: f"{name}/{name}-{i:05d}.npy" for name in outputs},
    }


def check_folder(out: Path, fingerprint_id: str, fingerprint: Mapping[str, object], overwrite: bool) -> bool:
    """Whether ``out`` holds a run with this fingerprint (True: resume), is new or empty (False).

    Raises:
        FeatxError: ``out`` is a file, not writable, holds files that are no featx extraction, or holds an
            extraction with another fingerprint (unless ``overwrite``).
    """
    if out.exists() and not out.is_dir():
        raise FeatxError(f"--out `{out}` is a file; give a folder (new or empty, or a run to resume)")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FeatxError(f"--out `{out}`: folder `{existing}` is not writable")
    if not out.exists() or not any(out.iterdir()):
        return False
    marker = out / FINGERPRINT
    if not marker.is_file():
        entries = sorted(p.name for p in out.iterdir())
        raise FeatxError(
            f"--out `{out}` holds files that are not a featx extraction ({listing(entries, 4)}); "
            "give a new or empty folder"
        )
    try:
        theirs = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        raise FeatxError(f"--out `{out}`: {FINGERPRINT} cannot be read ({err}); pass --overwrite") from None
    if theirs.get("id") == fingerprint_id:
        return True
    if overwrite:
        return False
    old = theirs.get("fingerprint", {})
    differs = [k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k)]
    raise FeatxError(
        f"--out `{out}` holds another extraction (its fingerprint differs in {listing(differs, 6)}); "
        "pass --overwrite to start over, or choose another --out"
    )


def clear(out: Path) -> None:
    """Remove a previous extraction's own files from ``out`` (what ``--overwrite`` starts over from)."""
    try:
        old = json.loads((out / FINGERPRINT).read_text())
    except (OSError, ValueError):
        old = {}
    folders = [METADATA, *old.get("fingerprint", {}).get("taps", {})]
    for name in folders:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
    for path in out.iterdir():
        if path.name in (FINGERPRINT, MANIFEST) or (path.name.startswith("shard-") and path.is_file()):
            path.unlink()


def remove_temporaries(out: Path) -> None:
    """Remove the temporary files a killed run left (``replacing`` names them ``.<final name>.<random>``)."""
    if not out.is_dir():
        return
    for folder in [out, *(p for p in out.iterdir() if p.is_dir() and not p.is_symlink())]:
        prefixes = (
            (".shard-", f".{FINGERPRINT}.", f".{MANIFEST}.") if folder == out else (f".{folder.name}-",)
        )
        for path in folder.glob(".*"):
            if path.is_file() and path.name.startswith(prefixes):
                path.unlink()


def write_fingerprint(out: Path, fingerprint_id: str, fingerprint: Mapping[str, object]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _writing(
        out / FINGERPRINT,
        lambda p: write_text(p, json.dumps({"id": fingerprint_id, "fingerprint": fingerprint}, indent=2)),
    )


def done(
    out: Path, i: int, fingerprint_id: str, fmt: str, outputs: Sequence[str], inputs: str
) -> dict | None:
    """Shard ``i``'s marker when it exists, names this fingerprint and these ``inputs`` (the signature of
    the shard's samples as listed now) and its files are there; else None. A marker without ``inputs``
    (written before featx recorded them) does not count: what its rows were computed from is unknown."""
    marker = _marker(out, i)
    if marker is None or marker.get("fingerprint") != fingerprint_id or marker.get("inputs") != inputs:
        return None
    if not all((out / f).is_file() for f in shard_files(out, i, fmt, outputs).values()):
        return None
    return marker


def changed(out: Path, i: int, fingerprint_id: str, inputs: str) -> bool:
    """Whether shard ``i`` has a marker of this fingerprint recording other ``inputs``: its images changed
    (rewritten, relabelled, made unreadable) since it was written, so it is computed again."""
    marker = _marker(out, i)
    if marker is None or marker.get("fingerprint") != fingerprint_id:
        return False
    return marker.get("inputs") not in (None, inputs)


def _marker(out: Path, i: int) -> dict | None:
    try:
        marker = json.loads(marker_path(out, i).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def write_shard(
    out: Path,
    i: int,
    fmt: str,
    fingerprint_id: str,
    run_id: str,
    rank: int,
    *,
    inputs: str,
    tensors: Mapping[str, torch.Tensor],
    index: Sequence[int],
    keys: Sequence[str],
    labels: Sequence[int | None],
    failed: Sequence[Mapping[str, str]],
    seconds: Mapping[str, float],
) -> dict:
    """Write shard ``i``'s files (each to a temporary name, renamed), then its done marker; return it.
    ``inputs``: the signature of the shard's samples as they were listed (``sources.signature``)."""
    started = time.perf_counter()
    files = shard_files(out, i, fmt, list(tensors))
    index_tensor = torch.tensor(list(index), dtype=torch.int64)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        blob = {name: t.contiguous() for name, t in tensors.items()}
        blob[INDEX] = index_tensor
        _writing(out / files["file"], lambda p: _replace(p, lambda tmp: save_file(blob, tmp)))
    else:
        for name, t in tensors.items():
            path = out / files[name]
            path.parent.mkdir(exist_ok=True)
            array = t.numpy()
            _writing(path, lambda p, a=array: _replace(p, lambda tmp: _save_npy(tmp, a)))
        table = metadata_table(keys, index, labels)
        meta = out / files["file"]
        meta.parent.mkdir(exist_ok=True)
        _writing(meta, lambda p: _replace(p, lambda tmp: _save_npy(tmp, table)))
        _parquet(meta.with_suffix(".parquet"), keys, index, labels)
    seconds = {**seconds, "write": time.perf_counter() - started}
    marker = {
        "fingerprint": fingerprint_id,
        "inputs": inputs,
        "run": run_id,
        "shard": i,
        **files,
        "rows": len(index),
        "keys": list(keys),
        "index": list(index),
        "labels": list(labels),
        "failed": list(failed),
        "seconds": dict(seconds),
        "rank": rank,
    }
    _writing(marker_path(out, i), lambda p: write_text(p, json.dumps(marker)))
    return marker


def metadata_table(keys: Sequence[str], index: Sequence[int], labels: Sequence[int | None]) -> np.ndarray:
    """The npy metadata of a shard: a structured array (``key`` unicode, ``sample_index``, ``label``; -1 when
    there is none), readable with ``numpy.load`` alone (no pickle)."""
    width = max((len(k) for k in keys), default=1)
    table = np.zeros(len(keys), dtype=[("key", f"<U{width}"), ("sample_index", "<i8"), ("label", "<i8")])
    table["key"] = list(keys)
    table["sample_index"] = list(index)
    table["label"] = [-1 if label is None else label for label in labels]
    return table


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _parquet(path: Path, keys: Sequence[str], index: Sequence[int], labels: Sequence[int | None]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # optional: the .npy table carries the same columns
        return
    table = pa.table({"image_path": list(keys), "sample_index": list(index), "label": list(labels)})
    _writing(path, lambda p: _replace(p, lambda tmp: pq.write_table(table, tmp)))


def _replace(path: Path, write) -> None:
    with replacing(path) as tmp:
        write(tmp)


def _writing(path: Path, write) -> None:
    """Run ``write(path)``; a full disk or a refused write is the run's one-line error, and whatever was
    half-written is gone (``replacing`` removes its temporary file)."""
    try:
        write(path)
    except OSError as err:
        reason = "no space left on the device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise FeatxError(
            f"--out: cannot write `{path}`: {reason}; the shards written before it are kept"
        ) from None


def assemble(
    out: Path,
    fmt: str,
    fingerprint_id: str,
    fingerprint: Mapping[str, object],
    outputs: Mapping[str, Mapping[str, object]],
    keys: Sequence[str],
    classes: Sequence[str],
    inputs: Sequence[str],
) -> dict:
    """Read every shard's marker, check that each sample is in exactly one row or listed as failed, and
    write ``manifest.json``. ``inputs``: each shard's signature, one per shard. Raises ``RuntimeError``
    when the check fails (a lost or duplicated sample)."""
    shards, failed = [], []
    for i, signature in enumerate(inputs):
        marker = done(out, i, fingerprint_id, fmt, list(outputs), signature)
        if marker is None:
            raise RuntimeError(
                f"shard {i} of {len(inputs)} has no done marker with this run's fingerprint and inputs"
            )
        entry = {
            "file": marker["file"],
            "rows": marker["rows"],
            "keys": marker["keys"],
            "index": marker["index"],
            "inputs": marker["inputs"],
        }
        entry["labels"] = marker["labels"]
        if fmt == "npy":
            entry["files"] = {name: marker[name] for name in outputs}
        shards.append(entry)
        failed += marker["failed"]
    seen = Counter(k for s in shards for k in s["keys"]) + Counter(f["key"] for f in failed)
    twice = [k for k, n in seen.items() if n > 1]
    missing = [k for k in keys if k not in seen]
    extra = [k for k in seen if k not in set(keys)]
    if twice or missing or extra:
        raise RuntimeError(
            f"manifest check failed: {len(missing)} samples missing ({listing(missing, 3)}), "
            f"{len(twice)} twice ({listing(twice, 3)}), {len(extra)} unknown ({listing(extra, 3)})"
        )
    manifest = {
        "format": fmt,
        "fingerprint_id": fingerprint_id,
        "fingerprint": dict(fingerprint),
        "outputs": dict(outputs),
        "samples": len(keys),
        "rows": sum(s["rows"] for s in shards),
        "classes": list(classes),
        "shards": shards,
        "failed": failed,
    }
    _writing(out / MANIFEST, lambda p: write_text(p, json.dumps(manifest, indent=1)))
    return manifest
