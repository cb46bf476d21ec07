"""YAML read as people write numbers: ``1e-5`` is a float.

PyYAML follows YAML 1.1, whose float pattern needs a dot (``1.0e-5``), so ``atol: 1e-5`` arrives as the
string ``'1e-5'``. ``safe_load`` here is ``yaml.safe_load`` with YAML 1.2's float pattern added, as
ruamel.yaml and most other tools read it; everything else is unchanged.
"""

from __future__ import annotations

import re

import yaml


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2's floats (an exponent without a dot: ``1e-5``, ``5E3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def safe_load(text: str) -> object:
    """``yaml.safe_load(text)``, reading ``1e-5`` as the float it means."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
