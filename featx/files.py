"""Files featx writes: whole or not at all."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path


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
