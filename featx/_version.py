"""``featx.__version__``, in a module of its own so featx's modules read it without importing the package."""

from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("featx")  # the installed distribution's, from pyproject.toml
except importlib.metadata.PackageNotFoundError:
    # No package metadata: running from a source tree that was never installed (`pip install -e .` writes
    # the metadata). Say so rather than guess a number.
    __version__ = "0+unknown"
