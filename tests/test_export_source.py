"""``featx export SPEC`` takes the model, weights and cut as ``featx verify`` does: pretrained weights names,
``--weights-prefix``, ``--keep-glue``, ``--device``; a model without weights only with ``--random-weights``
(seeded, recorded); a fixed-size model checked at its own size."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import featx
from featx import FeatxError
from featx.cli import main
from featx.errors import FeatxWarning
from featx.export import TOLERANCES, export

SMALL = {"input_shape": [1, 3, 64, 64], "modes": ["eval"]}
R18_LAYER1 = ["export", "torchvision/resnet18", "--upto", "layer1", "--input-shape", "1,3,64,64"]
VIT = "timm/vit_tiny_patch16_224"
TINY_VIT = ["--model-kwarg", "img_size=32", "--model-kwarg", "depth=1"]  # fixed at 32x32, one block


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def r18_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in torchvision.models.resnet18().state_dict().items()}


def test_a_spec_without_weights_is_refused_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    code, _, err = run(capsys, *R18_LAYER1, "--out", out)
    assert code == 2
    assert err == (
        "featx: error: `torchvision/resnet18` has no --weights, so the export would hold its random init; "
        "give --weights (a .safetensors file or torch checkpoint, DEFAULT, IMAGENET1K_V1, a timm tag, "
        "hf-hub:org/name) or pass --random-weights (seeded by --seed)\n"
    )
    assert not list(tmp_path.iterdir())


def test_a_config_with_weights_null_is_refused_naming_the_key(tmp_path):
    config = {"model": "torchvision/resnet18", "weights": None, "upto": "layer1", "outputs": ["layer1"]}
    with pytest.raises(FeatxError, match=r"^<dict>: key `weights` is null, so the export would hold "):
        export(config, tmp_path / "r.safetensors")
    assert not list(tmp_path.iterdir())


def test_random_weights_are_seeded_by_seed_recorded_and_leave_the_callers_rng_alone(tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    before = torch.random.get_rng_state()
    code, _, err = run(capsys, *R18_LAYER1, "--random-weights", "--seed", "3", "--out", out)
    assert code == 0, err
    assert torch.equal(torch.random.get_rng_state(), before)
    assert (metadata(out)["random_weights"], metadata(out)["seed"]) == ("true", "3")
    expected = r18_state(3)  # torch.manual_seed(3), then the constructor: what load_model(seed=3) builds
    written = load_file(str(out))
    assert written.keys() == {k for k in expected if k.startswith(("conv1.", "bn1.", "layer1."))}
    assert all(torch.equal(t, expected[k]) for k, t in written.items())


def test_exported_weights_record_no_seed(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    save_file(r18_state(1), str(weights))
    out = tmp_path / "r.safetensors"
    code, _, err = run(capsys, *R18_LAYER1, "--weights", weights, "--out", out)
    assert code == 0, err
    assert (metadata(out)["random_weights"], metadata(out)["seed"]) == ("false", "null")


def test_weights_takes_a_torchvision_weights_name_from_the_torch_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    state = r18_state(2)
    torch.save(state, cached)
    out = tmp_path / "r.safetensors"
    code, _, err = run(capsys, *R18_LAYER1, "--weights", "IMAGENET1K_V1", "--out", out)
    assert code == 0, err
    assert torch.equal(load_file(str(out))["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    assert metadata(out)["random_weights"] == "false"


def test_a_config_whose_model_kwargs_load_pretrained_weights_is_not_random(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    state = r18_state(2)
    torch.save(state, cached)
    config = {
        "model": "torchvision/resnet18",
        "model_kwargs": {"pretrained": True},
        "upto": "layer1",
        "outputs": ["layer1"],
        "verify": SMALL,
    }
    out = tmp_path / "r.safetensors"
    export(config, out)  # not refused as `weights: null`
    assert torch.equal(load_file(str(out))["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    assert metadata(out)["random_weights"] == "false"


def test_weights_prefix_is_stripped_from_the_checkpoints_keys(tmp_path, capsys):
    state = r18_state(4)
    weights = tmp_path / "ddp.safetensors"
    save_file({f"module.{k}": v for k, v in state.items()}, str(weights))
    out = tmp_path / "r.safetensors"
    argv = [*R18_LAYER1, "--weights", weights, "--weights-prefix", "module.", "--out", out]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert torch.equal(load_file(str(out))["layer1.1.bn2.running_mean"], state["layer1.1.bn2.running_mean"])


def test_device_is_checked_before_the_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(
        capsys, *R18_LAYER1, "--random-weights", "--device", "cuda", "--out", tmp_path / "r.pt2"
    )
    assert code == 2
    assert err == "featx: error: --device `cuda`: CUDA is not available on this machine; use --device cpu\n"


def test_help_gives_each_formats_default_tolerance(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for which in (0, 1):  # --atol's defaults, then --rtol's
        expected = ", ".join(f"{fmt} {pair[which]:g}" for fmt, pair in TOLERANCES.items())
        assert re.sub(r" \(exact\)", "", text).count(f"(default per format: {expected})") == 1
    assert "0: exact" not in text


@pytest.mark.parametrize("fmt", ["pt2", "safetensors"])
def test_a_fixed_size_vit_is_checked_at_its_own_size_and_its_keep_glue_export_rebuilds(tmp_path, capsys, fmt):
    out = tmp_path / f"vit.{fmt}"
    argv = ["export", VIT, *TINY_VIT, "--upto", "patch_embed.proj", "--keep-glue", "--random-weights"]
    code, stdout, err = run(capsys, *argv, "--out", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["ok"]
    assert sorted({tuple(d["input_shape"]) for d in result["diffs"]}) == [(1, 3, 32, 32), (3, 3, 32, 32)]
    if fmt == "safetensors":
        assert json.loads(metadata(out)["dynamic_axes"]) == {"0": "batch"}
        rebuilt = featx.build_backbone(out)  # the root's cls_token and pos_embed are in the file
        assert list(rebuilt(torch.randn(2, 3, 32, 32))) == ["patch_embed.proj"]
    else:
        program = torch.export.load(str(out))
        (got,) = program.module()(torch.randn(3, 3, 32, 32))
        assert tuple(got.shape) == (3, 192, 2, 2)


def test_an_fpn_at_random_init_says_so_in_one_warning(tmp_path):
    config = {
        "model": "torchvision/resnet18",
        "upto": "layer2",
        "outputs": ["layer1", "layer2"],
        "fpn": {"out_channels": 16},
        "verify": SMALL,
    }
    with pytest.warns(FeatxWarning) as caught:
        export(config, tmp_path / "fpn.safetensors", random_weights=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, FeatxWarning)]
    assert messages == ["<dict>: the FPN stays at random init: `weights: null`"]
