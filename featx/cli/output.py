"""What a verb writes: a document on stdout, a file named by a flag (checked before the work)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from featx.errors import FeatxError


def print_document(document: dict[str, object] | str) -> None:
    """A JSON document or the text for people, on stdout."""
    print(json.dumps(document, indent=2) if isinstance(document, dict) else document, flush=True)


def writable(flag: str, path: str | None) -> None:
    """Refuse an output file that cannot be written before the work, not after it."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise FeatxError(f"{flag} {path} is a folder; give a file name")
    folder = Path(os.path.realpath(target)).parent
    if not folder.is_dir():
        raise FeatxError(f"{flag} {path}: folder `{target.parent}` does not exist")
    if target.exists() and not target.is_file():
        if not os.access(target, os.W_OK):
            raise FeatxError(f"{flag} {path} cannot be written")
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise FeatxError(f"{flag} {path}: folder `{folder}` is not writable")


def write(flag: str, path: str, text: str) -> None:
    from featx.files import write_text

    try:
        write_text(path, text)
    except OSError as err:
        raise FeatxError(f"{flag} {path} cannot be written: {err.strerror or err}") from None
