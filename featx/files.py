"""Files featx writes: whole or not at all; and what a file holds, by its sha256."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

_BLOCK = 1 << 20  # bytes hashed per read


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str], *, suffix: str = "") -> Iterator[str]:
    """Yield a temporary name next to ``path`` (ending in ``suffix``, for readers that go by it); when the
    block finishes, sync it and rename it to ``path``.

    A reader sees the old file or the new one, never half of one; if the block raises, ``path`` is left
    as it was and the temporary file is removed. A symlink is followed (its target is replaced), and an
    existing file keeps its permissions.
    """
    path = Path(os.path.realpath(path))
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path``: atomically for a regular file, straight through for a device or
    pipe (``/dev/stdout``). Characters UTF-8 cannot hold (undecodable file names) become U+FFFD."""
    data = text.encode("utf-8", "replace")
    if os.path.exists(path) and not os.path.isfile(path):
        with open(path, "wb") as f:
            f.write(data)
        return Path(path)
    with replacing(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


# Filesystems whose files are the kernel's views, not data: walking them never ends (/proc/self/root) or
# reads devices. /proc and /sys are refused by path as well, where the mount table cannot be read.
_PSEUDO_FILESYSTEMS = frozenset(
    {
        "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
        "configfs", "bpf", "pstore", "efivarfs", "binfmt_misc", "fusectl", "mqueue", "nsfs", "rpc_pipefs",
        "selinuxfs", "autofs",
    }
)  # fmt: skip


def pseudo_filesystem(path: str | os.PathLike[str], st: os.stat_result | None = None) -> str | None:
    """``/proc``, ``/sys`` or ``/dev`` (``/dev/shm`` excepted), or ``a <type> filesystem``, when ``path``
    (``st``: its stat, taken when not given) is on a filesystem of the kernel's views rather than files; else
    None. Walking such a folder never ends (``/proc/self/root``) or reads devices; writing there fails."""
    real = os.path.realpath(path)
    for top in ("/proc", "/sys", "/dev"):
        shm = real == "/dev/shm" or real.startswith("/dev/shm/")  # a tmpfs of real files
        if (real == top or real.startswith(top + "/")) and not shm:
            return top
    kind = _filesystem_type((st or os.stat(path)).st_dev)
    return f"a {kind} filesystem" if kind in _PSEUDO_FILESYSTEMS else None


def _filesystem_type(device: int) -> str | None:
    """The type of the mounted filesystem with device number ``device``, from /proc/self/mountinfo
    (Linux); None when it cannot be told."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(device)}:{os.minor(device)}"
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) > 2 and parts[2] == wanted and rest:
            return rest.split()[0]
    return None


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    block = bytearray(_BLOCK)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(block):
            h.update(view[:n])
    return h.hexdigest()
