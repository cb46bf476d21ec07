"""Where samples come from: a folder of images, a ``.txt`` list of paths, or WebDataset ``.tar`` shards.

Every source becomes the same thing: a list of ``Sample`` in sorted key order, each knowing how to read its
own bytes. Keys are stable across runs and machines (relative paths with ``/``; ``<tar name>/<sample key>``
in tar shards), so sample ``i`` is the same image on every rank and in every rerun. Nothing is decoded here:
listing a folder or a tar reads names and headers only.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from featx.errors import FeatxError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp", "img")
_TAR_LABEL_EXTENSIONS = ("cls", "label", "cls2")


@dataclass(frozen=True)
class Sample:
    """One input: its key, its label (class index or None) and where its bytes are.

    ``path`` is a file, or a tar file whose bytes ``offset`` .. ``offset + size`` are the image (a tar
    stores members uncompressed and contiguous, so reading one needs no scan of the archive).
    """

    key: str
    label: int | None
    path: str
    offset: int = 0
    size: int = -1  # -1: the whole file

    def read(self) -> bytes:
        """The encoded image, as stored. Raises ``OSError`` when unreadable."""
        with open(self.path, "rb") as f:
            if self.size < 0:
                return f.read()
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"tar member truncated ({len(data)} of {self.size} bytes)")
        return data


@dataclass(frozen=True)
class Dataset:
    """The samples of a source, in sorted key order, and the class names their labels index."""

    source: str  # the --data argument, as given
    kind: str  # "folder" | "list" | "webdataset"
    samples: tuple[Sample, ...]
    classes: tuple[str, ...] = ()

    def shards(self, shard_size: int) -> list[tuple[Sample, ...]]:
        """Consecutive groups of ``shard_size`` samples: the units of work, the same on every rank."""
        return [self.samples[i : i + shard_size] for i in range(0, len(self.samples), shard_size)]


def open_source(
    data: str | os.PathLike[str] | list[str | os.PathLike[str]] | tuple[str | os.PathLike[str], ...],
) -> Dataset:
    """The dataset ``data`` names: a folder of images, a ``.txt`` list of paths, or ``.tar`` shards
    (one file, a folder holding only ``.tar`` files, or a list of them).

    Folder: every image file below it, recursively (hidden files and folders skipped); the key is the
    path relative to the folder with ``/``. When the folder holds more than one first-level subfolder of
    images and no image at its top, each first-level folder is a class, numbered in sorted order as
    torchvision's ``ImageFolder`` does. List: one path per line (relative to the list's folder), with an
    optional ``<TAB>label`` (an int); blank lines and ``#`` comments skipped; the key is the path as
    written. Tar shards: WebDataset's convention, a sample is the members sharing a key; its image is the
    first member with an image extension, its label a ``.cls`` member.

    Raises:
        FeatxError: a missing path, no images found, a key listed twice, a tar that cannot be read.
    """
    if isinstance(data, (list, tuple)):
        paths = [Path(p) for p in data]
        if paths and all(p.suffix == ".tar" for p in paths):
            return _tars(", ".join(map(str, paths)), paths)
        raise FeatxError(f"--data {data!r}: a list of inputs must be .tar shards")
    path = Path(data)
    if not str(data):
        raise FeatxError("--data is empty; give a folder of images, a .txt list of paths, or .tar shards")
    if not path.exists():
        raise FeatxError(
            f"--data `{data}` does not exist; give a folder of images, a .txt list of paths, or .tar shards"
        )
    if path.is_file() and path.suffix == ".tar":
        return _tars(str(data), [path])
    if path.is_file() and path.suffix == ".txt":
        return _listed(str(data), path)
    if path.is_file():
        raise FeatxError(f"--data `{data}` is a file that is neither a .txt list of paths nor a .tar shard")
    tars = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
    if tars and not any(_is_image(p) for p in path.rglob("*")):  # a folder of shards
        return _tars(str(data), tars)
    return _folder(str(data), path)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _folder(source: str, root: Path) -> Dataset:
    found: list[str] = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(folder).relative_to(root)
        found += [
            (rel / f).as_posix()
            for f in files
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
        ]
    if not found:
        raise FeatxError(
            f"--data `{source}` holds no image files (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)"
        )
    found.sort()
    top = {k.split("/")[0] for k in found if "/" in k}
    classes: tuple[str, ...] = ()
    if len(top) > 1 and all("/" in k for k in found):
        classes = tuple(sorted(top))
    index = {c: i for i, c in enumerate(classes)}
    samples = tuple(
        Sample(key, index[key.split("/")[0]] if classes else None, str(root / key)) for key in found
    )
    return Dataset(source, "folder", samples, classes)


def _listed(source: str, path: Path) -> Dataset:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FeatxError(f"--data `{source}` cannot be read: {err}") from None
    entries: dict[str, Sample] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, tab, label_text = line.rstrip("\r\n").partition("\t")
        label = None
        if tab:
            try:
                label = int(label_text)
            except ValueError:
                raise FeatxError(
                    f"--data `{source}` line {number}: label `{label_text}` after the tab is not an int"
                ) from None
        if key in entries:
            raise FeatxError(
                f"--data `{source}` line {number}: `{key}` is listed twice; every sample must be once"
            )
        file = Path(key) if os.path.isabs(key) else path.parent / key
        entries[key] = Sample(key, label, str(file))
    if not entries:
        raise FeatxError(f"--data `{source}` lists no paths (one image path per line)")
    samples = tuple(entries[k] for k in sorted(entries))
    if any(s.label is None for s in samples) and any(s.label is not None for s in samples):
        raise FeatxError(f"--data `{source}`: some lines have a label and some do not; label all or none")
    return Dataset(source, "list", samples)


def _tars(source: str, paths: list[Path]) -> Dataset:
    try:
        from webdataset.tariterators import base_plus_ext
    except ImportError:
        raise FeatxError(
            f"--data `{source}` is WebDataset tar shards, which need the `webdataset` package: "
            "pip install 'featx[data]'"
        ) from None
    names = [p.name for p in paths]
    repeated = next((n for n in names if names.count(n) > 1), None)
    if repeated is not None:
        raise FeatxError(f"--data `{source}` names the shard `{repeated}` twice")
    samples: list[Sample] = []
    for path in paths:
        if not path.is_file():
            raise FeatxError(f"--data: tar shard `{path}` does not exist")
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(path, "r:") as tar:  # uncompressed: members are at fixed offsets
                for info in tar.getmembers():
                    if not info.isfile():
                        continue
                    base, ext = base_plus_ext(info.name)
                    if base is None:
                        continue
                    members.setdefault(base, {})[ext.lower()] = info
                labels = {
                    base: _tar_label(tar, parts) for base, parts in members.items() if _label_member(parts)
                }
        except (tarfile.TarError, OSError) as err:
            raise FeatxError(f"--data: tar shard `{path}` cannot be read: {err}") from None
        for base, parts in members.items():
            image = next((parts[e] for e in _TAR_IMAGE_EXTENSIONS if e in parts), None)
            if image is None:
                continue
            samples.append(
                Sample(f"{path.name}/{base}", labels.get(base), str(path), image.offset_data, image.size)
            )
    if not samples:
        raise FeatxError(
            f"--data `{source}`: the tar shards hold no image members "
            f"({', '.join('.' + e for e in _TAR_IMAGE_EXTENSIONS)})"
        )
    samples.sort(key=lambda s: s.key)
    return Dataset(source, "webdataset", tuple(samples))


def _label_member(parts: dict[str, tarfile.TarInfo]) -> tarfile.TarInfo | None:
    return next((parts[e] for e in _TAR_LABEL_EXTENSIONS if e in parts), None)


def _tar_label(tar: tarfile.TarFile, parts: dict[str, tarfile.TarInfo]) -> int | None:
    member = _label_member(parts)
    handle = tar.extractfile(member) if member is not None else None
    if handle is None:
        return None
    try:
        return int(handle.read().decode().strip())
    except (ValueError, UnicodeDecodeError):
        return None
