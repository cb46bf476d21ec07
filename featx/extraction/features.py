"""``featx.open_features(DIR)``: an extraction read back lazily, by sample key or by row.

Nothing is read until asked for: a row is sliced out of its shard (safetensors through ``safe_open``'s
memory map, npy through ``numpy.load(mmap_mode="r")``). Rows are in the manifest's order — shards in
order, rows within a shard in sorted key order — so ``keys`` is sorted.

What is checked (``verify=True``, the default): the manifest when it is opened (its own sha256, its shard
entries against each other, fingerprint.json), and each shard the first time a row of it is read, once per
``Features``: every file's size and sha256 against the manifest, and the shard's own index (safetensors
``sample_index``, the npy metadata table) against the manifest's keys and index. The cost is one read of
each shard's files.
"""

from __future__ import annotations

import bisect
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from featx.errors import FeatxError, did_you_mean, listing
from featx.extraction import folder as out_folder
from featx.extraction import writer

if TYPE_CHECKING:
    from safetensors import safe_open


RERUN = "rerun the same featx extract to recompute it"


@dataclass(frozen=True)
class StoreCheck:
    """What checking a whole store found: ``problems`` (one line each, naming the file), ``temporaries``
    (files an interrupted write left: not damage, a rerun removes them), ``finished`` (a manifest exists)."""

    folder: Path
    shards: int = 0
    rows: int = 0
    finished: bool = True
    problems: list[str] = field(default_factory=list)
    temporaries: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return self.finished and not self.problems

    @property
    def exit_code(self) -> int:
        """``featx extract --verify``: 0 intact, 1 damaged, 3 not finished."""
        return 0 if self.intact else 1 if self.problems else 3

    def summary(self) -> str:
        if not self.finished:
            return f"{self.folder}: not finished (no {writer.MANIFEST}); rerun the same featx extract to resume it"
        if self.problems and not self.shards:  # the manifest itself: no shard was checked against it
            return f"{self.folder}: damaged: {self.problems[0]}; rerun the same featx extract to rewrite it"
        head = f"{self.folder}: {self.shards} shards, {self.rows} rows checked (sha256)"
        if self.problems:
            return f"{head}, {len(self.problems)} damaged: {self.problems[0]}; {RERUN}"
        return f"{head}, intact"

    def lines(self) -> list[str]:
        """One line per problem, one per leftover temporary file, then the summary."""
        notes = [
            f"{t}: a temporary file of an interrupted write; a rerun removes it" for t in self.temporaries
        ]
        return [*self.problems, *notes, self.summary()]

    def to_dict(self) -> dict[str, object]:
        return {
            "folder": str(self.folder),
            "shards": self.shards,
            "rows": self.rows,
            "finished": self.finished,
            "intact": self.intact,
            "problems": self.problems,
            "temporaries": self.temporaries,
            "exit_code": self.exit_code,
        }


class Features:
    """The features of one extraction. ``[key]`` and ``row(i)`` give ``{output name: tensor}``."""

    def __init__(self, folder: Path, manifest: dict, verify: bool = True) -> None:
        self.folder = folder
        self.manifest = manifest
        self._verify = verify
        self._verified: set[int] = set()  # shards whose files matched the manifest
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
        self._checked(shard)
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
        for i in range(len(self._starts)):
            self._checked(i)
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
        for i in range(len(self._starts)):
            self._checked(i)
        parts = [self._safetensors(i).get_tensor(name) for i in range(len(self._starts))]
        return torch.cat(parts) if parts else torch.empty(0)

    def verify(self) -> StoreCheck:
        """Check every shard now (size, sha256, its own index against the manifest), whatever was read
        before, and list leftover temporary files of an interrupted write (not damage: a rerun removes them).

        Returns the check when every shard is intact. Raises ``FeatxError`` naming the first damaged file
        and how many shards are damaged; ``check_store(folder)`` returns every problem instead. The
        manifest is checked as well, also when the store was opened with ``verify=False``."""
        problem = manifest_problem(self.folder, self.manifest)
        if problem is not None:
            raise FeatxError(
                f"`{self.folder / writer.MANIFEST}`: {problem}; rerun the same featx extract to rewrite it"
            )
        check = self._check_all()
        if check.problems:
            more = f" ({len(check.problems)} shards damaged)" if len(check.problems) > 1 else ""
            raise FeatxError(f"`{self.folder}`: {check.problems[0]}{more}; {RERUN}")
        return check

    def _check_all(self) -> StoreCheck:
        problems = []
        for i, entry in enumerate(self.manifest["shards"]):
            problem = writer.shard_problem(self.folder, self.format, entry, "manifest")
            if problem is None:
                self._verified.add(i)
            else:
                problems.append(problem)
        return StoreCheck(
            self.folder,
            shards=len(self.manifest["shards"]),
            rows=len(self.keys),
            problems=problems,
            temporaries=temporaries(self.folder),
        )

    def _checked(self, shard: int) -> None:
        """Verify ``shard`` before its first row is served (once per Features; skipped with verify=False)."""
        if not self._verify or shard in self._verified:
            return
        problem = writer.shard_problem(self.folder, self.format, self.manifest["shards"][shard], "manifest")
        if problem is not None:
            raise FeatxError(f"`{self.folder}`: {problem}; {RERUN}")
        self._verified.add(shard)

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


def open_features(folder: str | os.PathLike[str], verify: bool = True) -> Features:
    """The features ``featx extract`` wrote to ``folder``.

    With ``verify=True`` (the default) nothing wrong is served silently: the manifest is checked here (its
    own sha256, shard entries consistent with each other, fingerprint.json naming the same fingerprint),
    and each shard the first time one of its rows is read (``row``, ``[key]``, ``numpy``, ``tensor``):
    its files' sizes and sha256 and its own index against the manifest, once per ``Features``.
    ``verify=False`` skips every check, including the manifest's: for a store checked already (e.g. by
    ``featx extract --verify``) on a reader that cannot afford one read of each shard; a damaged file
    then gives wrong rows or a reader's error. ``Features.verify()`` checks every shard at once.

    Raises:
        FeatxError: no ``manifest.json`` there (not an extraction, or one that has not finished: rerun
            the same ``featx extract`` to resume it); with ``verify``, a manifest that cannot be read or
            does not check out, or (on reading) a shard whose files differ from it: one line naming the
            file and what is wrong, and "rerun the same featx extract to recompute it".
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
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise FeatxError(
            f"`{path}` cannot be read ({err}); rerun the same featx extract to rewrite it"
        ) from None
    if verify:
        problem = manifest_problem(folder, manifest)
        if problem is not None:
            raise FeatxError(f"`{path}`: {problem}; rerun the same featx extract to rewrite it")
    return Features(folder, manifest, verify)


def manifest_problem(folder: Path, manifest: object) -> str | None:
    """What is wrong with a manifest on its own (no shard file read), or None."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    required = ("format", "fingerprint_id", "outputs", "samples", "rows", "shards", "failed", "digest")
    absent = [k for k in required if k not in manifest]
    if absent:
        if absent == ["digest"]:
            return "has no digest (written before featx checked its stores)"
        return f"lacks {', '.join(absent)}"
    if manifest["digest"] != writer.content_digest(manifest):
        return "content differs from its own sha256 (edited or damaged)"
    try:
        keys: Counter[str] = Counter()
        for n, s in enumerate(manifest["shards"]):
            if not s["rows"] == len(s["keys"]) == len(s["index"]) == len(s["labels"]):
                return f"shard {n} (`{s['file']}`): rows {s['rows']}, but {len(s['keys'])} keys and {len(s['index'])} index entries"
            if not isinstance(s.get("digests"), dict) or s["file"] not in s["digests"]:
                return f"shard {n} (`{s['file']}`) has no digests"
            keys.update(s["keys"])
        twice = [k for k, c in keys.items() if c > 1]
        if twice:
            return f"key `{twice[0]}` is in {keys[twice[0]]} rows"
        rows = sum(s["rows"] for s in manifest["shards"])
        if rows != manifest["rows"] or rows + len(manifest["failed"]) != manifest["samples"]:
            return f"shards hold {rows} rows, but it says {manifest['rows']} rows of {manifest['samples']} samples with {len(manifest['failed'])} failed"
    except (KeyError, TypeError) as err:
        return f"a shard entry is malformed ({type(err).__name__}: {err})"
    fingerprint = folder / writer.FINGERPRINT
    if fingerprint.exists():
        try:
            theirs = json.loads(fingerprint.read_bytes()).get("id")
        except (OSError, ValueError, AttributeError):
            theirs = None
        if theirs != manifest["fingerprint_id"]:
            return f"fingerprint `{manifest['fingerprint_id']}` is not {writer.FINGERPRINT}'s (`{theirs}`)"
    return None


def temporaries(folder: Path) -> list[str]:
    """The temporary files an interrupted write left in ``folder``, relative to it (``folder.temporaries``)."""
    return [p.relative_to(folder).as_posix() for p in out_folder.temporaries(folder)]


def check_store(folder: str | os.PathLike[str]) -> StoreCheck:
    """Check the store in ``folder`` without serving it or computing anything: the manifest, then every
    shard (size, sha256, own index). Every problem is listed; nothing is raised for damage.

    Raises:
        FeatxError: ``folder`` is not a featx extraction: missing, or without a manifest and holding
            nothing featx writes (a folder of featx's files alone is an extraction that did not finish).
    """
    folder = Path(folder)
    path = folder / writer.MANIFEST
    if not path.is_file():
        try:
            ours = folder.is_dir() and any(folder.iterdir()) and not out_folder.foreign_files(folder)
        except OSError:
            ours = False
        if not ours:
            raise FeatxError(f"`{folder}` is not a featx extraction folder (no {writer.MANIFEST})")
        return StoreCheck(folder, finished=False, temporaries=temporaries(folder))
    try:
        manifest = json.loads(path.read_bytes())
        problem = manifest_problem(folder, manifest)
    except (OSError, ValueError) as err:
        problem = f"cannot be read ({err})"
    if problem is not None:
        return StoreCheck(folder, problems=[f"{writer.MANIFEST}: {problem}"], temporaries=temporaries(folder))
    return Features(folder, manifest)._check_all()


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array))  # a copy: the memory map is read-only
