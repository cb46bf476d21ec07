"""featx: truncate pretrained vision backbones and prove what the cut keeps.

The public API is imported on first use (``featx.verify``, ``from featx import sweep``), so ``featx --help``
and ``featx --version`` answer without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from featx._version import __version__ as __version__  # featx.__version__

if TYPE_CHECKING:
    from featx.backbone import build_backbone
    from featx.backbone.plan import BackbonePlan, resolve
    from featx.backbone.taps import Feature
    from featx.checks import Check, check
    from featx.discovery import Taps, taps
    from featx.errors import FeatxError
    from featx.extraction import extract, open_features
    from featx.model_sources import ModelSource
    from featx.models import load_model
    from featx.report import Report, Sweep
    from featx.truncated_model import TruncatedModel
    from featx.truncation import truncate
    from featx.verification import sweep, verify

# public name -> the module that defines it
_API = {
    "Check": "featx.checks",
    "FeatxError": "featx.errors",
    "ModelSource": "featx.model_sources",
    "Report": "featx.report",
    "Sweep": "featx.report",
    "Taps": "featx.discovery",
    "TruncatedModel": "featx.truncated_model",
    "BackbonePlan": "featx.backbone.plan",
    "Feature": "featx.backbone.taps",
    "build_backbone": "featx.backbone",
    "check": "featx.checks",
    "extract": "featx.extraction",
    "open_features": "featx.extraction",
    "load_model": "featx.models",
    "resolve": "featx.backbone.plan",
    "sweep": "featx.verification",
    "taps": "featx.discovery",
    "truncate": "featx.truncation",
    "verify": "featx.verification",
}
__all__ = [
    "BackbonePlan",
    "Check",
    "Feature",
    "FeatxError",
    "ModelSource",
    "Report",
    "Sweep",
    "Taps",
    "TruncatedModel",
    "build_backbone",
    "check",
    "extract",
    "load_model",
    "open_features",
    "resolve",
    "sweep",
    "taps",
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
