"""Pretrained weights asked for the ecosystem's way — torchvision weights names, timm tags, ``hf-hub:`` ids,
the constructors' own ``weights=``/``pretrained=`` switches — read from the caches torchvision and timm use.
Nothing is downloaded: each test lays a seeded state dict out where torch's cache (``TORCH_HOME``) or the
Hugging Face hub cache (``HF_HUB_CACHE``) keeps it, and checks the loaded tensors are those."""

from __future__ import annotations

import json
import re
import urllib.error
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import save_file

import featx
from featx import FeatxError
from featx.cli import main

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def caches(tmp_path, monkeypatch) -> Path:
    """Empty torch and hub caches under ``tmp_path``; offline, so a test that reaches for the network fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _seeded(spec: str, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in featx.load_model(spec, **kwargs).state_dict().items()}


def _torchvision_cache(caches: Path, file: str, state: dict[str, torch.Tensor]) -> Path:
    path = caches / "torch" / "hub" / "checkpoints" / file
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)  # a zip checkpoint, as torchvision publishes them
    return path


def _hub_cache(
    caches: Path, repo: str, state: dict[str, torch.Tensor], file: str = "model.safetensors"
) -> Path:
    folder = caches / "hub" / ("models--" + repo.replace("/", "--"))
    path = folder / "snapshots" / REVISION / file
    path.parent.mkdir(parents=True)
    if file.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    # laid out as huggingface_hub itself finds it
    assert try_to_load_from_cache(repo, file, cache_dir=caches / "hub") == str(path)
    return path


def _equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k], v) for k, v in state.items())


@pytest.mark.parametrize("name", ["DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"])
def test_torchvision_weights_names_load_from_torch_hub_checkpoints(caches, name):
    state = _seeded("torchvision/resnet18", 1)
    _torchvision_cache(caches, "resnet18-f37072fd.pth", state)
    assert _equal(featx.load_model("torchvision/resnet18", weights=name), state)


def test_torchvisions_builder_makes_the_model_its_weights_need(caches):
    # inception_v3's weights come with transform_input=True: the model is get_model(name, weights=...)
    state = _seeded("torchvision/inception_v3", 2, transform_input=True, init_weights=False)
    _torchvision_cache(caches, "inception_v3_google-0cc3c7bd.pth", state)
    model = featx.load_model("torchvision/inception_v3", weights="DEFAULT")
    assert model.transform_input is True
    assert _equal(model, state)


def test_densenets_old_keys_are_renamed_and_a_backbone_reads_only_its_children(caches):
    state = _seeded("torchvision/densenet121", 3)
    # torchvision publishes densenet with the old `norm.1` spelling (and no BN step counts); its builder
    # renames the keys
    old = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }
    assert sum(".norm.1." in k for k in old) > 50
    _torchvision_cache(caches, "densenet121-a639ec97.pth", old)
    assert _equal(featx.load_model("torchvision/densenet121", weights="DEFAULT"), state)
    backbone = featx.build_backbone(
        {
            "model": "torchvision/densenet121",
            "weights": "DEFAULT",
            "upto": "features",
            "outputs": ["features"],
        }
    )
    assert all(torch.equal(v, state[k]) for k, v in backbone.state_dict().items())
    assert not any(p.is_meta for p in backbone.parameters())


def test_torchvisions_legacy_switches_mean_what_torchvision_says(caches):
    # torchvision's deprecated pretrained=True / pretrained_backbone=True meant IMAGENET1K_V1, not DEFAULT
    state = _seeded("torchvision/resnet50", 4)
    _torchvision_cache(caches, "resnet50-0676ba61.pth", state)  # ResNet50_Weights.IMAGENET1K_V1
    assert _equal(featx.load_model("torchvision/resnet50", pretrained=True), state)
    for kwargs in ({"weights_backbone": "IMAGENET1K_V1"}, {"pretrained_backbone": True}):
        model = featx.load_model("torchvision/fasterrcnn_resnet50_fpn", **kwargs)
        assert torch.equal(model.backbone.body.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])


def test_timm_tags_and_hub_ids_load_from_the_hub_cache(caches):
    state = _seeded("timm/resnet18", 5)
    _hub_cache(caches, "timm/resnet18.a1_in1k", state)
    for spec, weights in [
        ("timm/resnet18", "a1_in1k"),
        ("timm/resnet18", "resnet18.a1_in1k"),
        ("timm/resnet18", "DEFAULT"),  # timm's default tag for resnet18
        ("timm/resnet18.a1_in1k", "DEFAULT"),
        ("timm/resnet18", "hf-hub:timm/resnet18.a1_in1k"),
    ]:
        assert _equal(featx.load_model(spec, weights=weights), state), (spec, weights)
    assert _equal(featx.load_model("timm/resnet18", pretrained=True), state)


def test_a_hub_repo_with_only_pytorch_model_bin_is_read(caches):
    state = _seeded("timm/resnet18", 6)
    _hub_cache(caches, "timm/resnet18.a2_in1k", state, file="pytorch_model.bin")
    assert _equal(featx.load_model("timm/resnet18", weights="a2_in1k"), state)


def test_offline_and_not_cached_names_the_file_and_where_it_goes(caches):
    with pytest.raises(FeatxError) as err:
        featx.load_model("torchvision/resnet50", weights="IMAGENET1K_V2")
    expected = caches / "torch" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    assert (
        f"put `resnet50-11ad3fa6.pth` (from https://download.pytorch.org/models/resnet50-11ad3fa6.pth) at `{expected}`"
        in str(err.value)
    )
    with pytest.raises(FeatxError) as err:
        featx.load_model("timm/resnet50", weights="a1_in1k")
    folder = caches / "hub" / "models--timm--resnet50.a1_in1k"
    assert "not in the Hugging Face cache and HF_HUB_OFFLINE is set" in str(err.value)
    assert f"`{folder}/snapshots/<commit>/model.safetensors`" in str(err.value)


def test_online_a_missing_torchvision_file_is_downloaded_into_the_cache(caches, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # as read when it was imported
    state = _seeded("torchvision/resnet18", 7)
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):  # stands in for the network
        calls.append((url, dst, hash_prefix))
        torch.save(state, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    assert _equal(featx.load_model("torchvision/resnet18", weights="DEFAULT"), state)
    dst = caches / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", str(dst), "f37072fd")]

    def no_network(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(FeatxError, match=r"cannot be downloaded \(URLError: .*name resolution.*\): put"):
        featx.load_model("torchvision/resnet34", weights="DEFAULT")


def test_cli_model_kwarg_download_switches_are_read_as_weights(caches, capsys):
    state = _seeded("torchvision/resnet18", 8)
    _torchvision_cache(caches, "resnet18-f37072fd.pth", state)
    argv = [
        "verify",
        "torchvision/resnet18",
        "--upto",
        "layer1",
        "--input-shape",
        "1,3,32,32",
        "--mode",
        "eval",
    ]
    for switch in ("weights=DEFAULT", "pretrained=true"):
        assert main([*argv, "--json", "--model-kwarg", switch]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["faithful"]
    assert main([*argv, "--weights", "DEFAULT", "--model-kwarg", "pretrained=true"]) == 2
    assert "--model-kwarg `pretrained` and --weights `DEFAULT` both say" in capsys.readouterr().err
    assert main([*argv, "--weights", "a.pth", "--model-kwarg", "weights=DEFAULT"]) == 2
    assert (
        "--model-kwarg `weights` and --weights `a.pth` both say which weights to load"
        in capsys.readouterr().err
    )


def test_config_weights_names_and_model_kwargs_switches(caches, tmp_path):
    state = _seeded("torchvision/resnet18", 9)
    _torchvision_cache(caches, "resnet18-f37072fd.pth", state)
    config = tmp_path / "c.yaml"
    for lines in ("weights: DEFAULT", "model_kwargs: {pretrained: true}", "model_kwargs: {weights: DEFAULT}"):
        config.write_text(f"model: torchvision/resnet18\n{lines}\nupto: layer2\noutputs: [layer2]\n")
        backbone = featx.build_backbone(config)
        assert all(torch.equal(v, state[k]) for k, v in backbone.state_dict().items()), lines
    config.write_text(
        "model: torchvision/resnet18\nweights: x.pth\nmodel_kwargs: {pretrained: true}\nupto: 1\noutputs: [1]\n"
    )
    with pytest.raises(
        FeatxError, match=r"key `model_kwargs` `pretrained` and key `weights` `.*x\.pth` both"
    ):
        featx.build_backbone(config)
