"""How featx names a line of code in its messages (glue sources, keep_glue and export refusals)."""

from __future__ import annotations

import importlib
import os

import torch
import torchvision

import featx
from featx.code_location import FEATX_DIR, in_torch_or_featx, path_from_cwd, short_path


def test_the_package_root_is_the_featx_directory():
    assert os.path.dirname(os.path.abspath(featx.__file__)) + os.sep == FEATX_DIR


def test_a_module_in_a_featx_subpackage_is_featx_s_own_code():
    assert in_torch_or_featx(importlib.import_module("featx.extraction.run").__file__)


def test_torch_is_skipped_but_torchvision_and_the_tests_are_model_code():
    assert in_torch_or_featx(torch.nn.modules.conv.__file__)
    assert not in_torch_or_featx(torchvision.models.resnet.__file__)
    assert not in_torch_or_featx(__file__)


def test_a_file_is_named_from_the_longest_sys_path_entry_it_is_under(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    assert short_path(str(tmp_path / "pkg" / "model.py")) == "model.py"
    assert short_path(str(tmp_path / "other.py")) == "other.py"


def test_a_file_under_no_sys_path_entry_keeps_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.path", [str(tmp_path / "elsewhere")])
    assert short_path(str(tmp_path / "model.py")) == str(tmp_path / "model.py")


def test_a_name_in_angle_brackets_is_no_file_and_stays_as_it_is(monkeypatch):
    monkeypatch.setattr("sys.path", ["/nowhere"])
    assert short_path("<stdin>") == "<stdin>"


def test_export_names_a_file_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert path_from_cwd(str(tmp_path / "models" / "toy.py")) == "models/toy.py"
    assert path_from_cwd(str(tmp_path.parent / "toy.py")) == "../toy.py"
