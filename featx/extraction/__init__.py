"""Dataset extraction: sources (folders, lists, tar shards) -> a verified cut -> shards and a manifest.

``featx.extract`` runs it; ``featx.open_features`` reads the result back. The file layout is the contract
in docs/extract.md.
"""

from featx.errors import Interrupted
from featx.extraction.features import Features, StoreCheck, check_store, open_features
from featx.extraction.run import ExtractResult, extract

__all__ = [
    "ExtractResult",
    "Features",
    "Interrupted",
    "StoreCheck",
    "check_store",
    "extract",
    "open_features",
]
