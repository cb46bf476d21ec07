"""Where code is, as featx's messages name it: ``in_torch_or_featx`` tells torch's and featx's own files
from the model's code; ``short_path`` writes a file the way a reader looks it up by module
(``torchvision/models/resnet.py``: a glue op's ``source``, keep_glue's refusals), ``path_from_cwd`` the way
a shell at the working directory opens it (``tests/toy.py``: export's refusals).
"""

from __future__ import annotations

import functools
import os
import sys

import torch


def _package_root() -> str:
    """featx's own directory (``.../featx/``), found from this module's dotted name: it stays the package
    root wherever this module sits (``featx.code_location``, or one level down in a subpackage)."""
    root = os.path.abspath(__file__)
    for _ in range(__name__.count(".")):
        root = os.path.dirname(root)
    return root + os.sep


FEATX_DIR = _package_root()  # every module of the package is under it, subpackages included
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def in_torch_or_featx(filename: str) -> bool:
    """Whether ``filename`` (a frame's ``co_filename``) is torch's code or featx's own, in any of its
    subpackages: a frame there is never the line of the model's code that a message should name."""
    return filename.startswith((TORCH_DIR, FEATX_DIR))


def short_path(filename: str) -> str:
    """``filename`` as a reader looks it up: relative to the ``sys.path`` entry it is under (the longest),
    with ``/`` (``torchvision/models/resnet.py``, ``tests/toy_models.py``); absolute when under none. A
    name in angle brackets (``<stdin>``, a notebook cell's, fx's generated code) is no file: as it is."""
    if filename.startswith("<"):
        return filename
    # sys.path and the working directory (an entry "") are part of the answer, so of the cache's key
    return _short_path(filename, tuple(sys.path), os.getcwd())


@functools.lru_cache(maxsize=256)  # a recording asks once per torch call, mostly for the same few files
def _short_path(filename: str, entries: tuple[str, ...], cwd: str) -> str:
    path = os.path.abspath(filename)
    for root in sorted((os.path.abspath(entry or cwd) for entry in entries), key=len, reverse=True):
        if path.startswith(root + os.sep):
            return os.path.relpath(path, root).replace(os.sep, "/")
    return path


def path_from_cwd(filename: str) -> str:
    """``filename`` relative to the working directory (``tests/toy.py``, ``../models/toy.py``): what the
    person who ran the command can open from where they are. As it is where no relative path exists
    (another drive on Windows)."""
    try:
        return os.path.relpath(filename)
    except ValueError:
        return filename
