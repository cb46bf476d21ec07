"""Where samples come from: a folder of images, a ``.txt`` list of paths, or WebDataset ``.tar`` shards.

Every source becomes the same thing: a list of ``Sample`` in sorted key order, each knowing how to read its
own bytes. Keys are stable across runs and machines (relative paths with ``/``; ``<tar name>/<sample key>``
in tar shards), so sample ``i`` is the same image on every rank and in every rerun. Nothing is decoded here:
listing a folder or a tar reads names and headers only.

Each sample carries a ``Stamp`` taken while listing (its file's size, modification time in ns, and whether
it can be opened for reading): ``signature(samples)`` hashes keys and stamps, so a resumed run can tell a
shard whose images changed since it was written. A stamp is not a content hash: a rewrite that keeps both
size and mtime (a tool restoring the mtime, or a filesystem with coarse timestamps) goes unseen.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from featx.errors import FeatxError
from featx.files import pseudo_filesystem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp", "img")
_TAR_LABEL_EXTENSIONS = ("cls", "label", "cls2")
ACCEPTED = "give a folder of images, a .txt list of paths, or .tar shards"


@dataclass(frozen=True)
class Stamp:
    """What a sample's file looked like when it was listed: size in bytes, modification time in ns, and
    whether this process could open it for reading (``os.access``). ``MISSING``: it did not exist."""

    size: int
    mtime_ns: int
    readable: bool

    @classmethod
    def of(cls, path: str, st: os.stat_result | None = None) -> Stamp:
        """The stamp of ``path`` (``st``: its ``os.stat``, when already taken). A file that is not a
        regular file (a fifo, a device) is stamped unreadable: ``Sample.read`` refuses it."""
        try:
            st = os.stat(path) if st is None else st
        except OSError:
            return MISSING
        readable = stat.S_ISREG(st.st_mode) and os.access(path, os.R_OK)
        return cls(st.st_size, st.st_mtime_ns, readable)


MISSING = Stamp(-1, -1, False)


@dataclass(frozen=True)
class Sample:
    """One input: its key, its label (class index or None), where its bytes are, and its file's stamp.

    ``path`` is a file, or a tar file whose bytes ``offset`` .. ``offset + size`` are the image (a tar
    stores members uncompressed and contiguous, so reading one needs no scan of the archive). ``stamp`` is
    the file's (for a tar member: the tar file's), taken when the source was listed.
    """

    key: str
    label: int | None
    path: str
    offset: int = 0
    size: int = -1  # -1: the whole file
    stamp: Stamp = MISSING

    def read(self) -> bytes:
        """The encoded image, as stored. Raises ``OSError`` when unreadable or not a regular file (a fifo
        would block the reader, a device never end)."""
        # O_NONBLOCK: opening a fifo returns at once (and is then refused) instead of waiting for a writer
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise OSError(f"`{self.path}` is {_kind(mode)}, not a regular file")
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


def signature(samples: Iterable[Sample]) -> str:
    """The sha256 (hex) of the samples' keys, labels, tar offsets and sizes, and stamps, in order: equal
    when a shard's inputs look as they did, different when an image was rewritten, replaced, relabelled,
    removed or made unreadable since."""
    digest = hashlib.sha256()
    for s in samples:
        t = s.stamp
        # json.dumps: an unambiguous, ASCII spelling of any key (undecodable file names included)
        line = f"{json.dumps(s.key)} {s.label} {s.offset} {s.size} {t.size} {t.mtime_ns} {t.readable:d}\n"
        digest.update(line.encode())
    return digest.hexdigest()


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

    The folder walk follows a symlinked folder once, by what it points to: never into the folder itself,
    one of its parents, or a folder already walked; real folders first, so a folder reached both ways keeps
    its real key and class (a symlink loop gives each image once). A symlinked image file is a sample; special files (fifos, sockets, devices) and
    broken symlinks are skipped. Every image costs one ``stat`` and one ``access`` call (its ``Stamp``).

    Raises:
        FeatxError: a missing path, a path that is neither a folder, a .txt list nor .tar shards (a device,
            a fifo, anything under /proc, /sys or /dev), a folder that cannot be listed, no images found, a
            key listed twice, a tar that cannot be read.
    """
    if isinstance(data, (list, tuple)):
        paths = [Path(p) for p in data]
        if paths and all(p.suffix == ".tar" for p in paths):
            return _tars(", ".join(map(str, paths)), paths)
        raise FeatxError(f"--data {data!r}: a list of inputs must be .tar shards")
    path = Path(data)
    if not str(data):
        raise FeatxError(f"--data is empty; {ACCEPTED}")
    if not path.exists():
        raise FeatxError(f"--data `{data}` does not exist; {ACCEPTED}")
    try:
        st = path.stat()
    except OSError as err:
        raise FeatxError(f"--data `{data}` cannot be read: {err.strerror or err}; {ACCEPTED}") from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise FeatxError(f"--data `{data}` is {_kind(st.st_mode)}; {ACCEPTED}")
    pseudo = pseudo_filesystem(str(path), st)
    if pseudo is not None:
        raise FeatxError(f"--data `{data}` is on {pseudo}, which holds no data; {ACCEPTED}")
    if path.is_file() and path.suffix == ".tar":
        return _tars(str(data), [path])
    if path.is_file() and path.suffix == ".txt":
        return _listed(str(data), path)
    if path.is_file():
        raise FeatxError(
            f"--data `{data}` is a file that is neither a .txt list of paths nor a .tar shard; {ACCEPTED}"
        )
    found = _walk(str(data), path, st)
    if not found:
        tars = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
        if tars:  # a folder of shards
            return _tars(str(data), tars)
        raise FeatxError(
            f"--data `{data}` holds no image files (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)"
        )
    return _folder(str(data), path, found)


def _folder(source: str, root: Path, found: list[tuple[str, Stamp]]) -> Dataset:
    found.sort(key=lambda item: item[0])
    top = {k.split("/")[0] for k, _ in found if "/" in k}
    classes: tuple[str, ...] = ()
    if len(top) > 1 and all("/" in k for k, _ in found):
        classes = tuple(sorted(top))
    index = {c: i for i, c in enumerate(classes)}
    samples = tuple(
        Sample(key, index[key.split("/")[0]] if classes else None, str(root / key), stamp=stamp)
        for key, stamp in found
    )
    return Dataset(source, "folder", samples, classes)


def _walk(source: str, root: Path, root_stat: os.stat_result) -> list[tuple[str, Stamp]]:
    """``(key, stamp)`` of every image file below ``root``.

    A folder is known by its ``(st_dev, st_ino)``: one already walked, ``root`` or a parent of it is not
    entered again, whatever path (symlink, bind mount) leads there. Real folders are walked first, then
    the symlinked ones (in key order) that lead somewhere not walked yet: a folder reached both ways keeps
    its real path as its key, so a link to a sibling class (``animals -> dog``) neither renames nor
    relabels it. A folder on another filesystem than its parent is refused when that filesystem is a
    pseudo one (a link to /proc). Regular files cost one ``stat`` (the ``DirEntry``'s) and one ``access``;
    files without an image extension cost nothing.
    """
    parents = set()
    for parent in Path(os.path.realpath(root)).parents:
        try:
            parents.add(_identity(os.stat(parent)))
        except OSError:  # a parent we cannot stat cannot be reached through a symlink either
            continue
    walked = {_identity(root_stat)}
    found: list[tuple[str, Stamp]] = []
    linked: list[
        tuple[str, str, int]
    ] = []  # symlinked folders: key, path, the device of the folder holding it
    # one iterator per open folder; symlinked folders wait until every real folder is walked
    stack = [("", _entries(source, str(root), ""), root_stat.st_dev)]
    while stack or linked:
        if not stack:
            linked.sort()
            key, path, device = linked.pop(0)
            try:
                st = os.stat(path)
            except OSError:  # gone since it was listed
                continue
            if _identity(st) in walked or _identity(st) in parents:
                continue
            _refuse_pseudo(source, key, path, st, device)
            walked.add(_identity(st))
            stack.append((key + "/", _entries(source, path, key), st.st_dev))
            continue
        prefix, entries, device = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        key = prefix + entry.name
        if _is_folder(entry):
            if entry.is_symlink():
                linked.append((key, entry.path, device))
                continue
            try:
                st = entry.stat()
            except OSError:  # gone since it was listed
                continue
            if _identity(st) in walked or _identity(st) in parents:
                continue  # a bind mount of a folder walked already
            _refuse_pseudo(source, key, entry.path, st, device)
            walked.add(_identity(st))
            stack.append((key + "/", _entries(source, entry.path, key), st.st_dev))
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            try:
                st = entry.stat()
            except OSError:  # a broken symlink, a symlink loop
                continue
            if stat.S_ISREG(st.st_mode):  # not a fifo, socket or device, which a reader would hang on
                found.append((key, Stamp.of(entry.path, st)))
    return found


def _refuse_pseudo(source: str, key: str, path: str, st: os.stat_result, device: int) -> None:
    """Refuse folder ``key`` when it leads (off its parent's ``device``) onto a pseudo filesystem."""
    pseudo = pseudo_filesystem(path, st) if st.st_dev != device else None
    if pseudo is not None:
        raise FeatxError(
            f"--data `{source}`: folder `{key}` leads to {pseudo}, which holds no data; "
            "remove the link or give another folder"
        )


def _entries(source: str, folder: str, key: str) -> Iterator[os.DirEntry[str]]:
    """The visible entries of ``folder`` in key order (a folder sorts as its name plus ``/``)."""
    try:
        with os.scandir(folder) as listing:
            entries = [e for e in listing if not e.name.startswith(".")]
    except OSError as err:
        where = f"`{source}`" if not key else f"`{source}`: folder `{key}`"
        raise FeatxError(
            f"--data {where} cannot be listed: {err.strerror or err}; give this process read access to it"
        ) from None
    return iter(sorted(entries, key=lambda e: e.name + "/" if _is_folder(e) else e.name))


def _is_folder(entry: os.DirEntry[str]) -> bool:
    """Whether ``entry`` is a folder or a symlink to one (a symlink costs one ``stat``, then cached)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISREG, "a file"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


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
        entries[key] = Sample(key, label, str(file), stamp=Stamp.of(str(file)))
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
        stamp = Stamp.of(str(path))  # a member is stamped by its tar: rewriting the tar restamps them all
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
                Sample(
                    f"{path.name}/{base}", labels.get(base), str(path), image.offset_data, image.size, stamp
                )
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
