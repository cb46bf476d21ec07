"""The output folder of an extraction: which files are featx's, whether a run may start or resume there.

featx knows its own files by name (``featx_file``): ``fingerprint.json``, ``manifest.json``,
``shard-NNNNN.safetensors`` and ``.done``, ``metadata/metadata-NNNNN.npy|.parquet``,
``<output>/<output>-NNNNN.npy``, and the ``.<name>.<random>`` temporaries a killed write leaves. A folder
holding only those is featx's: a run resumes it (temporaries removed) or, with ``--overwrite``, removes exactly
those files and starts over. Anyone else's file is never removed, and a folder holding one is refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from featx.errors import FeatxError, listing, one_line
from featx.extraction.writer import FINGERPRINT, MANIFEST, METADATA
from featx.files import pseudo_filesystem

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
        pseudo = pseudo_filesystem(existing)
        if pseudo is not None:
            raise FeatxError(f"--out `{out}` is on {pseudo}, which holds no files; give a folder on a disk")
        if hasattr(os, "statvfs") and os.statvfs(existing).f_flag & os.ST_RDONLY:
            raise FeatxError(
                f"--out `{out}`: `{existing}` is on a read-only filesystem; give a writable folder"
            )
    except OSError as err:
        raise FeatxError(f"--out `{out}` cannot be checked: {err.strerror or err}") from None
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FeatxError(f"--out `{out}`: folder `{existing}` is not writable (permission denied)")


def check_folder(
    out: Path,
    fingerprint_id: str,
    fingerprint: Mapping[str, object],
    overwrite: bool,
    environment: Mapping[str, object] | None = None,
) -> bool:
    """Whether ``out`` holds a run with this fingerprint to resume (True), or is to be started in (False:
    new, empty, holding only what a killed write left, or ``overwrite`` on a folder featx wrote).

    A run resumes in another numeric ``environment`` (``featx.numerics.environment``: thread count, device
    name) except where it changes the features and the fingerprint does not hold it: the ``LIBRARIES``
    versions ``fingerprint.json`` records (the fingerprint itself holds featx's and torch's; these are compared
    apart so that stores written before they were recorded keep their fingerprint and resume).

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
        _check_libraries(out, theirs.get("environment"), environment)
        return True
    if theirs is not None:
        old = theirs.get("fingerprint", {})
        old = old if isinstance(old, dict) else {}
        differs = _differences(old, fingerprint)
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


LIBRARIES = (
    "torchvision",
    "timm",
)  # versions outside the fingerprint that change features: models, transforms


def _check_libraries(out: Path, recorded: object, now: Mapping[str, object] | None) -> None:
    """Refuse to resume a store whose ``fingerprint.json`` records other ``LIBRARIES`` versions than this
    run's (a store that records none, written before featx recorded them, resumes)."""
    if not isinstance(recorded, Mapping) or now is None:
        return
    differs = [name for name in LIBRARIES if name in recorded and recorded[name] != now.get(name)]
    if differs:
        was = ", ".join(f"{name} {recorded[name]}" for name in differs)
        is_now = ", ".join(f"{name} {now.get(name)}" for name in differs)
        raise FeatxError(
            f"--out `{out}` was extracted with {was} and this run has {is_now}, which can change the "
            "features; pass --overwrite to start over, choose another --out, or resume with the versions it "
            "was started with"
        )


def _differences(old: Mapping[str, object], new: Mapping[str, object], prefix: str = "") -> list[str]:
    """The keys whose values differ, dotted down to the innermost mapping both sides hold
    (``data.shard_size``, not ``data``)."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found += _differences(a, b, f"{prefix}{key}.")
        else:
            found.append(f"{prefix}{key}")
    return found


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


def temporaries(out: Path) -> list[Path]:
    """The temporary files a killed write left (``replacing`` names them ``.<final name>.<random>``), at the
    top of ``out`` and in its output and metadata folders, sorted; featx's own names only."""
    if not out.is_dir():
        return []
    found = []
    for folder in [out, *sorted(p for p in out.iterdir() if p.is_dir() and not p.is_symlink())]:
        inside = None if folder == out else folder.name
        found += [
            path
            for path in sorted(folder.glob(".*"))
            if path.is_file()
            and not path.is_symlink()
            and temporary_file(path.name)
            and featx_file(inside, path.name)
        ]
    return found


def remove_temporaries(out: Path) -> None:
    """Remove the temporary files a killed write left in ``out`` (``temporaries``)."""
    for path in temporaries(out):
        path.unlink()
