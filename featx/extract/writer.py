"""Shards, done markers and the manifest: the files of an extraction, each whole or absent.

Layout of ``DIR`` (docs/extract.md is the contract):

- ``fingerprint.json``: what the features are a function of; written once, before the first shard.
- safetensors: ``shard-00000.safetensors`` holding one tensor per output (``[rows, ...]``) and
  ``sample_index`` (int64 ``[rows]``, the row's index into the sorted sample keys).
- npy: ``<output>/<output>-00000.npy`` per output (``[rows, ...]``) and ``metadata/metadata-00000.npy``,
  a numpy structured table (``key``, ``sample_index``, ``label``) — the embedding-reader/autofaiss
  layout of one folder of ``.npy`` files per embedding plus a metadata folder of the same order; with
  pyarrow installed, ``metadata/metadata-00000.parquet`` as well (column ``image_path`` = the key).
- ``shard-00000.done``: JSON written after the shard's files, naming the fingerprint, its keys, labels,
  failed samples and timings. A shard counts only when its marker exists with the run's fingerprint.
- ``manifest.json``: written last by rank 0, from the markers, after checking every sample is there once.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from featx.errors import FeatxError, listing, one_line
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


# featx's own files, by name: whatever else a folder holds is someone else's, and never removed.
_TOP = re.compile(r"(fingerprint\.json|manifest\.json|shard-\d{5,}\.(safetensors|done))")
_IN_METADATA = re.compile(rf"{METADATA}-\d{{5,}}\.(npy|parquet)")
# ``replacing`` writes ``.<final name>.<random>`` next to the final name (tempfile.mkstemp's letters)
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]+")
# a folder featx made for an output: ``<name>/<name>-00000.npy``
_OUTPUT = re.compile(r"(?P<folder>.+)-\d{5,}\.npy")


def featx_file(folder: str | None, name: str) -> bool:
    """Whether ``name`` (in the subfolder ``folder`` of an extraction, None at its top) is a file featx
    writes, final or a temporary a killed write left behind."""
    temporary = _TEMPORARY.fullmatch(name)
    final = temporary["name"] if temporary else name
    if folder is None:
        return bool(_TOP.fullmatch(final))
    if folder == METADATA:
        return bool(_IN_METADATA.fullmatch(final))
    output = _OUTPUT.fullmatch(final)
    return output is not None and output["folder"] == folder


def temporary_file(name: str) -> bool:
    """Whether ``name`` is a temporary ``replacing`` names ``.<final name>.<random>``."""
    return bool(_TEMPORARY.fullmatch(name))


def foreign_files(out: Path) -> list[str]:
    """The entries of ``out`` featx did not write (paths relative to ``out``, sorted): its own files and
    temporaries are known by name (``featx_file``), an empty folder holds nothing of anyone's, and a
    symbolic link is never featx's."""
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.is_symlink() or not (entry.is_dir() or entry.is_file()):
            foreign.append(entry.name)
        elif entry.is_file():
            if not featx_file(None, entry.name):
                foreign.append(entry.name)
        else:
            for inner in sorted(entry.iterdir()):
                if inner.is_symlink() or not inner.is_file() or not featx_file(entry.name, inner.name):
                    foreign.append(f"{entry.name}/{inner.name}")
    return foreign


def check_out(out: Path) -> None:
    """Refuse an ``out`` featx cannot write a folder at, before anything is written: a file, a path below a
    file, a pseudo filesystem (``/proc``, ``/sys``), a read-only filesystem, a folder it may not write in.

    Raises:
        FeatxError: one line naming the path that is in the way and what to do.
    """
    existing = out
    try:
        while not os.path.lexists(existing):
            existing = existing.parent
        if existing.is_symlink() and not existing.exists():
            raise FeatxError(f"--out `{out}`: `{existing}` is a broken symbolic link; give a folder")
        if existing != out and not existing.is_dir():
            raise FeatxError(f"--out `{out}`: `{existing}` is a file, not a folder; give a folder path")
        if existing == out and not out.is_dir():
            raise FeatxError(f"--out `{out}` is a file; give a folder (new or empty, or a run to resume)")
        pseudo = _pseudo_filesystem(existing)
        if pseudo:
            raise FeatxError(
                f"--out `{out}` is on `{pseudo[0]}`, a {pseudo[1]} pseudo filesystem that holds no files; "
                "give a folder on a disk"
            )
        if hasattr(os, "statvfs") and os.statvfs(existing).f_flag & os.ST_RDONLY:
            raise FeatxError(
                f"--out `{out}`: `{existing}` is on a read-only filesystem; give a writable folder"
            )
    except OSError as err:
        raise FeatxError(f"--out `{out}` cannot be checked: {err.strerror or err}") from None
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FeatxError(f"--out `{out}`: folder `{existing}` is not writable (permission denied)")


_PSEUDO_FILESYSTEMS = frozenset(
    {"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "configfs", "devpts", "bpf"}
    | {"pstore", "fusectl", "efivarfs", "binfmt_misc", "mqueue"}
)


def _pseudo_filesystem(path: Path) -> tuple[str, str] | None:
    """``(mount point, type)`` when ``path`` is on a kernel pseudo filesystem (Linux; None elsewhere)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fields[2])
    return best if best is not None and best[1] in _PSEUDO_FILESYSTEMS else None


def check_folder(out: Path, fingerprint_id: str, fingerprint: Mapping[str, object], overwrite: bool) -> bool:
    """Whether ``out`` holds a run with this fingerprint to resume (True), or is to be started in (False:
    new, empty, holding only what a killed write left, or ``overwrite`` on a folder featx wrote).

    A folder holding only featx's files (``foreign_files`` is empty) is featx's: the same command resumes it,
    ``overwrite`` starts over (``clear`` removes exactly those files). A missing or unreadable
    ``fingerprint.json`` is rewritten when a shard's done marker or the manifest names this fingerprint.

    Raises:
        FeatxError: ``out`` cannot be written (``check_out``), holds someone else's file (named, with or
            without ``overwrite``), or holds another extraction and no ``overwrite``.
    """
    check_out(out)
    try:
        if not out.exists() or not any(out.iterdir()):
            return False
        foreign = foreign_files(out)
    except OSError as err:
        raise FeatxError(f"--out `{out}` cannot be read: {err.strerror or err}") from None
    if foreign:
        raise FeatxError(
            f"--out `{out}` holds files that are not a featx extraction ({listing(foreign, 4)}); "
            "give a new or empty folder, or move them away"
        )
    if overwrite:
        return False
    theirs, problem = _read_fingerprint(out)
    if theirs is not None and theirs.get("id") == fingerprint_id:
        return True
    if theirs is not None:
        old = theirs.get("fingerprint", {})
        old = old if isinstance(old, dict) else {}
        differs = [k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k)]
        raise FeatxError(
            f"--out `{out}` holds another extraction (its fingerprint differs in {listing(differs, 6)}); "
            "pass --overwrite to start over, or choose another --out"
        )
    named = _named_fingerprints(out)
    if fingerprint_id in named:
        return True  # the run's own shards: fingerprint.json is rewritten and the run resumes
    if not named:
        return False  # nothing finished (a write killed before the first shard): start
    raise FeatxError(
        f"--out `{out}`: {FINGERPRINT} {problem} and its shards are another extraction's; "
        "pass --overwrite to start over, or choose another --out"
    )


def fingerprint_id_of(out: Path) -> str | None:
    """The id ``out/fingerprint.json`` holds, or None when it is missing or unreadable."""
    theirs, _ = _read_fingerprint(out)
    return None if theirs is None else theirs.get("id")


def _read_fingerprint(out: Path) -> tuple[dict | None, str]:
    """``(fingerprint.json's content, "")``, or ``(None, what is wrong with it)``."""
    try:
        theirs = json.loads((out / FINGERPRINT).read_text())
    except FileNotFoundError:
        return None, "is missing"
    except (OSError, ValueError) as err:
        return None, f"cannot be read ({one_line(err)})"
    if not isinstance(theirs, dict) or not isinstance(theirs.get("id"), str):
        return None, "cannot be read (no fingerprint id in it)"
    return theirs, ""


def _named_fingerprints(out: Path) -> set[str]:
    """The fingerprint ids the done markers and the manifest in ``out`` name (unreadable ones skipped)."""
    named = set()
    for path in [*out.glob("shard-*.done"), out / MANIFEST]:
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(content, dict):
            value = content.get("fingerprint_id" if path.name == MANIFEST else "fingerprint")
            if isinstance(value, str):
                named.add(value)
    return named


def clear(out: Path) -> None:
    """Remove exactly featx's files from ``out`` (``featx_file``; what ``--overwrite`` starts over from),
    and the folders this empties. Anyone else's file or folder stays where it is."""
    for entry in list(out.iterdir()):
        if entry.is_symlink():
            continue
        if entry.is_file() and featx_file(None, entry.name):
            entry.unlink()
        elif entry.is_dir():
            removed = False
            for inner in list(entry.iterdir()):
                if not inner.is_symlink() and inner.is_file() and featx_file(entry.name, inner.name):
                    inner.unlink()
                    removed = True
            if removed and not any(entry.iterdir()):
                entry.rmdir()


def remove_temporaries(out: Path) -> None:
    """Remove the temporary files a killed write left (``replacing`` names them ``.<final name>.<random>``),
    at the top of ``out`` and in its output and metadata folders; featx's own names only."""
    if not out.is_dir():
        return
    for folder in [out, *(p for p in out.iterdir() if p.is_dir() and not p.is_symlink())]:
        inside = None if folder == out else folder.name
        for path in folder.glob(".*"):
            if (
                path.is_file()
                and not path.is_symlink()
                and temporary_file(path.name)
                and featx_file(inside, path.name)
            ):
                path.unlink()


def write_fingerprint(out: Path, fingerprint_id: str, fingerprint: Mapping[str, object]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _writing(
        out / FINGERPRINT,
        lambda p: write_text(p, json.dumps({"id": fingerprint_id, "fingerprint": fingerprint}, indent=2)),
    )


def done(out: Path, i: int, fingerprint_id: str, fmt: str, outputs: Sequence[str]) -> dict | None:
    """Shard ``i``'s marker when it exists, names this fingerprint and its files are there; else None."""
    try:
        marker = json.loads(marker_path(out, i).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("fingerprint") != fingerprint_id:
        return None
    if not all((out / f).is_file() for f in shard_files(out, i, fmt, outputs).values()):
        return None
    return marker


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
    tensors: Mapping[str, torch.Tensor],
    index: Sequence[int],
    keys: Sequence[str],
    labels: Sequence[int | None],
    failed: Sequence[Mapping[str, str]],
    seconds: Mapping[str, float],
) -> dict:
    """Write shard ``i``'s files (each to a temporary name, renamed), then its done marker; return it."""
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
    shard_count: int,
) -> dict:
    """Read every shard's marker, check that each sample is in exactly one row or listed as failed, and
    write ``manifest.json``. Raises ``RuntimeError`` when the check fails (a lost or duplicated sample)."""
    shards, failed = [], []
    for i in range(shard_count):
        marker = done(out, i, fingerprint_id, fmt, list(outputs))
        if marker is None:
            raise RuntimeError(f"shard {i} of {shard_count} has no done marker with this run's fingerprint")
        entry = {
            "file": marker["file"],
            "rows": marker["rows"],
            "keys": marker["keys"],
            "index": marker["index"],
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
        # a scheduler's verdict without reading the lists: "complete" (every sample is a row) or
        # "complete_with_failures" (the run finished; the samples in "failed" could not be read)
        "status": "complete_with_failures" if failed else "complete",
        "samples": len(keys),
        "rows": sum(s["rows"] for s in shards),
        "classes": list(classes),
        "shards": shards,
        "failed": failed,
    }
    _writing(out / MANIFEST, lambda p: write_text(p, json.dumps(manifest, indent=1)))
    return manifest
