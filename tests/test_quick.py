"""The quick loop (``pytest -m quick``) names tests that exist: a renamed test drops out of it loudly."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import QUICK

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("entry", QUICK)
def test_every_quick_entry_names_a_test_file_or_a_test_in_it(entry):
    file, _, test = entry.partition("::")
    assert (ROOT / file).is_file()
    if test:
        tree = ast.parse((ROOT / file).read_text())
        assert test in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
