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
  inputs (``inputs``: its samples' keys, labels and file stamps, ``sources.signature``), its keys, labels,
  failed samples, timings and ``digests`` (``{path relative to DIR: {"sha256", "bytes"}}`` of every data
  file). A shard counts only when its marker names the run's fingerprint and the inputs as listed now (a
  shard whose images changed since is computed again), and every file matches its digest.
- ``manifest.json``: written last by rank 0, from the markers, after checking every sample is there once;
  it exists only while the store is complete (a run with shards to compute removes it first) and carries
  ``digest``, the sha256 of its own content without that key.

Every file is serialised in memory, then written by ``_put``: to a temporary name, synced, renamed; its
sha256 is taken from the bytes written, so checking a shard later is one read of each file.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch

from featx.errors import FeatxError, Unfinished, listing
from featx.files import replacing, sha256_of

FINGERPRINT = "fingerprint.json"
MANIFEST = "manifest.json"
# Why a done shard is computed again when its samples' signature differs from the one its marker records.
CHANGED = "its images changed since it was written"
INDEX = "sample_index"
METADATA = "metadata"
# A fault-injection hook for tests and the resume benchmark: exit hard after writing this many shards.
EXIT_AFTER_ENV = "FEATX_EXTRACT_EXIT_AFTER"
# Fault injection at one write: ``<point>[:<k>]`` exits hard (17) while writing the k-th file of that kind
# (default the first), its temporary file written and not yet renamed, as a SIGKILL there would leave it.
# ``shard`` counts data files (one per shard in safetensors; each output's .npy and the metadata in npy).
FAULT_ENV = "FEATX_EXTRACT_FAULT"
FAULT_POINTS = ("fingerprint", "shard", "marker", "manifest")
_written: Counter[str] = Counter()  # files written by this process, per fault point


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


def write_fingerprint(
    out: Path,
    fingerprint_id: str,
    fingerprint: Mapping[str, object],
    environment: Mapping[str, object] | None = None,
) -> None:
    """``fingerprint.json``: the id, the fingerprint, and the numeric environment of the run that started the
    store (``featx.numerics.environment``), which a resume compares with its own (``folder.check_folder``)."""
    out.mkdir(parents=True, exist_ok=True)
    document: dict[str, object] = {"id": fingerprint_id, "fingerprint": dict(fingerprint)}
    if environment is not None:
        document["environment"] = dict(environment)
    text = json.dumps(document, indent=2)
    _put(out / FINGERPRINT, text.encode(), "fingerprint")


def retract_manifest(out: Path) -> None:
    """Remove ``manifest.json`` before a shard is (re)written: a manifest never describes files that
    changed under it."""
    try:
        (out / MANIFEST).unlink()
    except FileNotFoundError:
        pass
    except OSError as err:
        raise FeatxError(f"--out: cannot remove `{out / MANIFEST}`: {err.strerror or err}") from None


def done(
    out: Path,
    i: int,
    fingerprint_id: str,
    fmt: str,
    outputs: Sequence[str],
    inputs: str,
    *,
    verify: bool = True,
) -> dict | None:
    """Shard ``i``'s marker when it names this fingerprint and these ``inputs`` (the signature of the
    shard's samples as listed now) and its files match its digests; else None.

    ``verify=False`` trusts the marker's digests without reading the files (for a shard this run has
    already checked or written)."""
    return shard_state(out, i, fingerprint_id, fmt, outputs, inputs, verify=verify)[0]


def shard_state(
    out: Path,
    i: int,
    fingerprint_id: str,
    fmt: str,
    outputs: Sequence[str],
    inputs: str,
    *,
    verify: bool = True,
    keys: Sequence[str] | None = None,
) -> tuple[dict | None, str | None]:
    """``(marker, None)`` when shard ``i`` is done and intact; ``(None, None)`` when it has no marker;
    ``(None, CHANGED)`` when its marker records other ``inputs`` (its images were rewritten, relabelled or
    made unreadable since); ``(None, why)`` when its marker exists but is not trusted (unreadable, another
    fingerprint, no digests or inputs as written before featx checked shards, a file that does not match,
    or — given the run's sorted sample ``keys`` — marker keys that are not the keys its index names). In
    every case but the first the shard is to be recomputed."""
    path = marker_path(out, i)
    try:
        marker = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):
        return None, f"{path.name} cannot be read"
    if not isinstance(marker, dict) or "digest" not in marker:
        return None, f"{path.name} has no digest (written before featx checked shards)"
    if marker["digest"] != content_digest(marker):
        return None, f"{path.name} differs from its own sha256 (edited or damaged)"
    if marker.get("fingerprint") != fingerprint_id:
        return None, f"{path.name} names another fingerprint"
    if marker.get("inputs") != inputs:
        return None, CHANGED
    digests = marker.get("digests")
    if not isinstance(digests, dict):
        return None, f"{path.name} has no digests"
    absent = [f for f in shard_files(out, i, fmt, outputs).values() if f not in digests]
    if absent:
        return None, f"{path.name} has no digest for `{absent[0]}`"
    if keys is not None:
        try:
            named = [keys[j] for j in marker["index"]]
        except (KeyError, IndexError, TypeError):
            named = None
        if named != marker.get("keys"):
            return None, f"{path.name}: its keys are not the samples its index names"
    if verify:
        problem = shard_problem(out, fmt, marker, "marker")
        if problem is not None:
            return None, problem
    return marker, None


def shard_problem(out: Path, fmt: str, entry: Mapping, recorded_in: str) -> str | None:
    """What is wrong with a shard's files against ``entry`` (a marker or a manifest shard entry: ``file``,
    ``keys``, ``index``, ``digests``), or None when every file has its recorded size and sha256 and the
    shard's own index (safetensors ``sample_index``, the npy metadata table) equals the entry's."""
    try:
        for rel, digest in entry["digests"].items():
            problem = file_problem(out / rel, digest, recorded_in)
            if problem is not None:
                return f"{rel}: {problem}"
        path = out / entry["file"]
        if fmt == "safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                if f.get_tensor(INDEX).tolist() != list(entry["index"]):
                    return f"{entry['file']}: {INDEX} differs from the {recorded_in}'s index"
        else:
            table = np.load(path, allow_pickle=False)
            if table["key"].tolist() != list(entry["keys"]):
                return f"{entry['file']}: keys differ from the {recorded_in}'s keys"
            if table["sample_index"].tolist() != list(entry["index"]):
                return f"{entry['file']}: {INDEX} differs from the {recorded_in}'s index"
    except Exception as err:  # a file that passed its digest but cannot be read: still not served
        return f"{entry.get('file')}: cannot be read ({type(err).__name__}: {err})"
    return None


def file_problem(path: Path, digest: Mapping, recorded_in: str) -> str | None:
    """``missing``, ``size N, expected M: truncated``, or ``content differs from the <recorded_in>'s
    sha256``; None when ``path`` holds the bytes ``digest`` (``sha256``, ``bytes``) describes."""
    try:
        size = path.stat().st_size if path.is_file() else None
    except OSError:
        size = None
    if size is None:
        return "missing"
    expected = digest["bytes"]
    if size != expected:
        return f"size {size}, expected {expected}: " + (
            "truncated" if size < expected else "longer than written"
        )
    if sha256_of(path) != digest["sha256"]:
        return f"content differs from the {recorded_in}'s sha256"
    return None


def finished_shards(out: Path, fingerprint_id: str, shard_count: int) -> int:
    """How many of the run's shards have a done marker naming its fingerprint (files not checked)."""
    count = 0
    for i in range(shard_count):
        try:
            count += json.loads(marker_path(out, i).read_text()).get("fingerprint") == fingerprint_id
        except (OSError, ValueError, AttributeError):
            continue
    return count


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
    repaired: str | None = None,
    environment: Mapping[str, object] | None = None,
) -> dict:
    """Write shard ``i``'s files (each to a temporary name, renamed), then its done marker with their
    digests; return it. ``inputs``: the signature of the shard's samples as they were listed
    (``sources.signature``); ``repaired``: why a previous marker of this shard was not trusted, kept in it;
    ``environment``: the numeric environment that computed the shard (a resumed store may mix them)."""
    started = time.perf_counter()
    files = shard_files(out, i, fmt, list(tensors))
    index_tensor = torch.tensor(list(index), dtype=torch.int64)
    blobs: dict[str, bytes] = {}  # path relative to out -> the file's bytes
    if fmt == "safetensors":
        from safetensors.torch import save

        blob = {name: t.contiguous() for name, t in tensors.items()}
        blob[INDEX] = index_tensor
        blobs[files["file"]] = save(blob)
    else:
        for name, t in tensors.items():
            blobs[files[name]] = _npy_bytes(t.numpy())
        blobs[files["file"]] = _npy_bytes(metadata_table(keys, index, labels))
        parquet = _parquet_bytes(keys, index, labels)
        if parquet is not None:
            blobs[Path(files["file"]).with_suffix(".parquet").as_posix()] = parquet
    digests = {}
    for rel, data in blobs.items():
        (out / rel).parent.mkdir(exist_ok=True)
        digests[rel] = _put(out / rel, data, "shard")
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
        "digests": digests,
    }
    if repaired is not None:
        marker["repaired"] = repaired
    if environment is not None:
        marker["environment"] = dict(environment)
    marker["digest"] = content_digest(marker)  # a marker edited or damaged later is not trusted
    _put(marker_path(out, i), json.dumps(marker).encode(), "marker")
    return marker


class Behind:
    """Shards written in one background thread, in order, one at a time, while the loop computes the next:
    ``submit`` first waits for the write before it (raising its error here, in the caller's thread), so at
    most one shard waits in memory; leaving the block waits for the last one, also when the block raised.
    Writing (serialising, sha256, fsync, rename) releases the GIL for most of its time."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featx-writer")
        self._pending: Future | None = None

    def submit(self, fn: Callable[..., object], *args: object, **kwargs: object) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args, **kwargs)

    def wait(self) -> None:
        """Until the pending write is done; its error, if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> Behind:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        try:
            if kind is None:
                self.wait()
            elif self._pending is not None:  # the block's own error wins; the write still ends whole
                futures.wait([self._pending])
        finally:
            self._pool.shutdown(wait=True)


def metadata_table(keys: Sequence[str], index: Sequence[int], labels: Sequence[int | None]) -> np.ndarray:
    """The npy metadata of a shard: a structured array (``key`` unicode, ``sample_index``, ``label``; -1 when
    there is none), readable with ``numpy.load`` alone (no pickle)."""
    width = max((len(k) for k in keys), default=1)
    table = np.zeros(len(keys), dtype=[("key", f"<U{width}"), ("sample_index", "<i8"), ("label", "<i8")])
    table["key"] = list(keys)
    table["sample_index"] = list(index)
    table["label"] = [-1 if label is None else label for label in labels]
    return table


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _parquet_bytes(keys: Sequence[str], index: Sequence[int], labels: Sequence[int | None]) -> bytes | None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # optional: the .npy table carries the same columns
        return None
    table = pa.table({"image_path": list(keys), "sample_index": list(index), "label": list(labels)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue().to_pybytes())


def _put(path: Path, data: bytes, point: str) -> dict[str, object]:
    """Write ``data`` to ``path`` whole (a temporary name, synced, renamed) and return its digest
    (``sha256``, ``bytes``). A full disk or a refused write is the run's one-line error, and whatever was
    half-written is gone (``replacing`` removes its temporary file). ``point`` names the file's kind for
    ``FEATX_EXTRACT_FAULT``."""
    digest: dict[str, object] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    try:
        with replacing(path) as tmp:
            _store(tmp, data)
            _written[point] += 1
            if _fault() == (point, _written[point]):
                sys.stderr.flush()
                os._exit(17)  # fault injection: killed after the temporary file, before the rename
    except OSError as err:
        if err.errno in _STOPPED_BY:  # not the user's input: the same command resumes once it is fixed
            reason = _STOPPED_BY[err.errno]
            raise Unfinished(
                f"--out: cannot write `{path}`: {reason}; the shards written before it are kept, "
                "and the same command resumes once there is room"
            ) from None
        raise FeatxError(
            f"--out: cannot write `{path}`: {err.strerror or err}; the shards written before it are kept"
        ) from None
    return digest


_STOPPED_BY = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than the filesystem allows",
}


def _store(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _fault() -> tuple[str, int] | None:
    """``FEATX_EXTRACT_FAULT`` as ``(point, k)``, None when unset."""
    value = os.environ.get(FAULT_ENV, "")
    if not value:
        return None
    point, _, k = value.partition(":")
    if point not in FAULT_POINTS or not (k or "1").isdigit():
        raise FeatxError(
            f"{FAULT_ENV}=`{value}` is not accepted; give <point>[:<k>], point one of {listing(FAULT_POINTS)}"
        )
    return point, int(k or 1)


def assemble(
    out: Path,
    fmt: str,
    fingerprint_id: str,
    fingerprint: Mapping[str, object],
    outputs: Mapping[str, Mapping[str, object]],
    keys: Sequence[str],
    classes: Sequence[str],
    inputs: Sequence[str],
    environment: Mapping[str, object] | None = None,
) -> dict:
    """Read every shard's marker, check that each sample is in exactly one row or listed as failed, and
    write ``manifest.json``. ``inputs``: each shard's signature, one per shard; ``environment``: the numeric
    environment of the run writing it (each shard's own is in its marker). Raises ``RuntimeError``
    when the check fails (a lost or duplicated sample).

    The markers' digests are copied, not checked again: every shard was verified or written by this run."""
    shards, failed = [], []
    for i, signature in enumerate(inputs):
        marker = done(out, i, fingerprint_id, fmt, list(outputs), signature, verify=False)
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
        entry["digests"] = marker["digests"]
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
        # a scheduler's verdict without reading the lists: "complete" (every sample is a row) or
        # "complete_with_failures" (the run finished; the samples in "failed" could not be read)
        "status": "complete_with_failures" if failed else "complete",
        "samples": len(keys),
        "rows": sum(s["rows"] for s in shards),
        "classes": list(classes),
        "shards": shards,
        "failed": failed,
    }
    if environment is not None:
        manifest["environment"] = dict(environment)
    manifest["digest"] = content_digest(manifest)
    _put(out / MANIFEST, json.dumps(manifest, indent=1).encode(), "manifest")
    return manifest


def content_digest(document: Mapping[str, object]) -> str:
    """The sha256 of a manifest's or done marker's content without its ``digest`` key (canonical JSON: sorted
    keys), which it carries: a byte changed in it later (a label, a row count) is seen."""
    content = {k: v for k, v in document.items() if k != "digest"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
