"""A model source (spec, weights, weights prefix, model kwargs, seed) is parsed once into one value that says
what the weights are, and every consumer takes that value."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import save_file

import featx
from featx import FeatxError
from featx.cli import main
from featx.config import load_config
from featx.models import ModelSource, download_switches, source_of
from featx.weights import WeightsSource

R18 = "torchvision/resnet18"


@contextmanager
def calls_of(function: Callable[..., object]) -> Iterator[list[str]]:
    """The calls of ``function`` made inside the block, however it is reached (by any module's reference)."""
    code, seen = function.__code__, []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is code:
            seen.append(frame.f_back.f_code.co_name if frame.f_back else "")

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(previous)


@pytest.mark.parametrize(
    ("spec", "text", "kind"),
    [
        (R18, "weights.safetensors", "file"),
        (R18, "ckpt/last", "file"),
        (R18, "DEFAULT", "torchvision"),
        (R18, "ResNet18_Weights.IMAGENET1K_V1", "torchvision"),
        ("timm/resnet18", "a1_in1k", "timm"),
        ("timm/resnet18", "hf-hub:timm/resnet18.a1_in1k", "hf-hub"),
        ("timm/resnet18", None, "random"),
    ],
)
def test_the_weights_text_is_parsed_once_into_what_the_weights_are(spec, text, kind):
    source = ModelSource.parse(spec, text, seed=4)
    assert source.weights.kind == kind
    assert source.weights.text == text
    assert source.weights.seed == (4 if kind == "random" else None)


def test_a_download_switch_becomes_the_weights_and_leaves_the_constructors_kwargs():
    source = ModelSource.parse("timm/resnet18", model_kwargs={"pretrained": True, "drop_rate": 0.1})
    assert (source.library, source.name, dict(source.model_kwargs)) == (
        "timm",
        "resnet18",
        {"drop_rate": 0.1},
    )
    assert (source.weights.kind, source.weights.text) == ("timm", "DEFAULT")


def test_a_weights_name_for_an_imported_model_is_refused_when_parsed():
    with pytest.raises(
        FeatxError, match=r"^weights file `DEFAULT` does not exist \(a pretrained weights name"
    ):
        ModelSource.parse("examples.seed_toy:ResN", "DEFAULT")


def test_a_config_relative_weights_file_is_beside_the_config_and_a_name_stays_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "w.pth").write_bytes(b"")
    path = tmp_path / "cfg" / "b.yaml"
    path.write_text(f"model: {R18}\nweights: w.pth\nupto: layer1\n")
    assert load_config("cfg/b.yaml").model_source.weights.file == Path("cfg") / "w.pth"
    path.write_text(f"model: {R18}\nweights: IMAGENET1K_V1\nupto: layer1\n")
    weights = load_config("cfg/b.yaml").model_source.weights
    assert (weights.kind, weights.text, weights.file) == ("torchvision", "IMAGENET1K_V1", None)


def test_a_weights_file_is_fingerprinted_by_its_name_and_sha256(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    fingerprint = WeightsSource.parse(str(path), R18).fingerprint()
    assert fingerprint == {"file": "w.safetensors", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert WeightsSource.parse(None, R18, seed=3).fingerprint() == {"random": True, "seed": 3}


def test_load_model_reads_the_download_switches_once(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with calls_of(download_switches) as calls:
        model = featx.load_model(R18, path)
    assert calls == ["parse"]
    assert source_of(model).weights.file == path


def test_a_config_build_reads_the_download_switches_once(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    config = {"model": R18, "model_kwargs": {"weights": str(path)}, "upto": "layer1"}
    with calls_of(download_switches) as calls:
        featx.build_backbone({**config, "verify": {"input_shape": [1, 3, 64, 64]}})
    assert calls == ["parse"]


def test_an_export_records_a_weights_name_as_a_name_with_its_cache_files_sha256(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cached)
    out = tmp_path / "r.safetensors"
    argv = ["export", R18, "--upto", "layer1", "--input-shape", "1,3,64,64", "--weights", "IMAGENET1K_V1"]
    assert main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    with safe_open(str(out), "pt") as f:
        recorded = json.loads(f.metadata()["weights"])
    assert recorded == {
        "name": "ResNet18_Weights.IMAGENET1K_V1",
        "file": "resnet18-f37072fd.pth",
        "sha256": hashlib.sha256(cached.read_bytes()).hexdigest(),
    }


def test_a_weights_override_replaces_the_configs_weights_and_keeps_its_kwargs(tmp_path):
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "a.pth")
    torch.manual_seed(2)
    other = torchvision.models.resnet18(zero_init_residual=True).state_dict()
    torch.save(other, tmp_path / "b.pth")
    config = load_config(
        {
            "model": R18,
            "model_kwargs": {"zero_init_residual": True},
            "weights": str(tmp_path / "a.pth"),
            "upto": "layer1",
        }
    )
    source = config.model_source.with_overrides(weights=str(tmp_path / "b.pth"))
    assert (source.weights.file, dict(source.model_kwargs)) == (
        tmp_path / "b.pth",
        {"zero_init_residual": True},
    )
    model = config.with_source(source).model_source.load()
    assert torch.equal(model.conv1.weight, other["conv1.weight"])
