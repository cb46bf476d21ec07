"""featx: truncate pretrained vision backbones and prove what the cut keeps."""

from featx.backbone import build_backbone
from featx.checks import check
from featx.errors import FeatxError
from featx.extract import extract, open_features
from featx.models import load_model
from featx.report import Report, Sweep
from featx.truncate import truncate
from featx.verify import sweep, verify

__all__ = [
    "FeatxError",
    "Report",
    "Sweep",
    "build_backbone",
    "check",
    "extract",
    "load_model",
    "open_features",
    "sweep",
    "truncate",
    "verify",
]
__version__ = "0.1.0"
