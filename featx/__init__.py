"""featx: truncate pretrained vision backbones and prove what the cut keeps.

The public API is imported on first use (``featx.verify``, ``from featx import sweep``), so ``featx --help``
and ``featx --version`` answer without importing torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from featx._version import __version__ as __version__  # featx.__version__

if TYPE_CHECKING:
    from featx.backbone import BackbonePlan, Feature, build_backbone, resolve
    from featx.checks import Check, check
    from featx.errors import FeatxError
    from featx.extract import extract, open_features
    from featx.models import load_model
    from featx.report import Report, Sweep
    from featx.truncate import truncate
    from featx.verify import sweep, verify

# public name -> the module that defines it
_API = {
    "Check": "featx.checks",
    "FeatxError": "featx.errors",
    "Report": "featx.report",
    "Sweep": "featx.report",
    "BackbonePlan": "featx.backbone",
    "Feature": "featx.backbone",
    "build_backbone": "featx.backbone",
    "check": "featx.checks",
    "extract": "featx.extract",
    "open_features": "featx.extract",
    "load_model": "featx.models",
    "resolve": "featx.backbone",
    "sweep": "featx.verify",
    "truncate": "featx.truncate",
    "verify": "featx.verify",
}
__all__ = [
    "BackbonePlan",
    "Check",
    "Feature",
    "FeatxError",
    "Report",
    "Sweep",
    "build_backbone",
    "check",
    "extract",
    "load_model",
    "open_features",
    "resolve",
    "sweep",
    "truncate",
    "verify",
]


def __getattr__(name: str) -> object:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'featx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        # Importing the submodule featx.verify (or featx.truncate) binds it here; the name is the function's.
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
