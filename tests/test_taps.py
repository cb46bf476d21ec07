"""`featx taps`: every tap candidate measured, the trunk's pyramid equal to timm's `feature_info` and torchvision's
feature extractors on the same weights, the written config built and proved, and bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import featx
from featx import FeatxError
from featx.cli import main

# timm families with their input (a multiple of 32 their forward takes) and kwargs that keep them small
TIMM = {
    "resnet50d": {},
    "regnety_002": {},
    "efficientnet_b0": {},
    "mobilenetv3_large_100": {},
    "convnext_atto": {},
    "cspresnet50": {},
    "densenet121": {},
    "davit_tiny": {},  # stages of one block beside stages of three
    "starnet_s050": {},  # Sequential stages of one block and of four
    "fastvit_t8": {},  # stages the root iterates without calling their Sequential
    "ese_vovnet19b_slim_dw": {},
}


def _timm_levels(model: nn.Module) -> list[tuple[str, int, int]]:
    """timm's feature_info at strides 4-32: (module, channels, stride)."""
    return [
        (f["module"], f["num_chs"], f["reduction"]) for f in model.feature_info if 4 <= f["reduction"] <= 32
    ]


def _weights(tmp_path: Path, model: nn.Module) -> Path:
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("name", sorted(TIMM))
def test_the_pyramid_is_timms_feature_info_at_strides_4_to_32(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **TIMM[name])
    found = featx.taps(model, (1, 3, 64, 64), check=False, label=f"timm/{name}")
    ours = [(level.name, level.channels, level.stride) for level in found.pyramid if 4 <= level.stride <= 32]
    assert ours == _timm_levels(model)
    assert found.differences == ()


@pytest.mark.parametrize("name", ["resnet50d", "efficientnet_b0", "convnext_atto", "densenet121"])
def test_the_written_config_taps_what_timm_forward_intermediates_returns(name, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    found = featx.taps(model, (1, 3, 64, 64), check="pyramid", label=f"timm/{name}")
    cfg = {"model": f"timm/{name}", "weights": str(_weights(tmp_path, model)), **found.config()}
    backbone = featx.build_backbone(cfg).eval()
    indices = [i for i, f in enumerate(model.feature_info) if 4 <= f["reduction"] <= 32]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = list(backbone(x).values())  # one per level, the stride-2 one (timm's too) left out below
        ours = [m for m, level in zip(maps, found.pyramid, strict=True) if 4 <= level.stride <= 32]
        theirs = model.forward_intermediates(x, indices=indices, intermediates_only=True)
    assert len(ours) == len(theirs) == len(indices)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


TORCHVISION = {  # the stage outputs torchvision's own detection backbones tap
    "resnet50": ["layer1", "layer2", "layer3", "layer4"],
    "mobilenet_v3_large": ["features.3", "features.6", "features.12", "features.16"],
    "efficientnet_b0": ["features.2", "features.3", "features.5", "features.7"],
    "convnext_tiny": ["features.1", "features.3", "features.5", "features.7"],
    "regnet_y_400mf": [f"trunk_output.block{i}" for i in range(1, 5)],
    "densenet121": [
        "features.denseblock1",
        "features.denseblock2",
        "features.denseblock3",
        "features.norm5",
    ],
}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_the_pyramid_equals_create_feature_extractor_on_the_same_weights(name, tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    found = featx.taps(model, (1, 3, 64, 64), check="pyramid", label=f"torchvision/{name}")
    levels = [level for level in found.pyramid if 4 <= level.stride <= 32]
    assert [level.name for level in levels] == TORCHVISION[name]
    assert [level.stride for level in levels] == [4, 8, 16, 32]
    cfg = {"model": f"torchvision/{name}", "weights": str(_weights(tmp_path, model)), **found.config()}
    cfg["outputs"] = {level.name: level.name for level in levels}
    backbone = featx.build_backbone(cfg).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = backbone(x)
        theirs = create_feature_extractor(model, {n: n for n in TORCHVISION[name]})(x)
    assert list(ours) == TORCHVISION[name]
    assert all(torch.equal(ours[n], theirs[n]) for n in TORCHVISION[name])
    assert [level.channels for level in levels] == [theirs[n].shape[1] for n in TORCHVISION[name]]


@pytest.mark.parametrize(
    ("name", "pyramid"),
    [
        (
            "vit_tiny_patch16_224",
            [("blocks.2", 192, 16), ("blocks.5", 192, 16), ("blocks.8", 192, 16), ("blocks.11", 192, 16)],
        ),
        (
            "swin_tiny_patch4_window7_224",
            [("layers.0", 96, 4), ("layers.1", 192, 8), ("layers.2", 384, 16), ("layers.3", 768, 32)],
        ),
    ],
)
def test_token_backbones_get_evenly_spaced_blocks_or_their_stages(name, pyramid):
    model = timm.create_model(name)
    found = featx.taps(model, check=False, label=f"timm/{name}")
    assert [(level.name, level.channels, level.stride) for level in found.pyramid] == pyramid
    layouts = {found[level.name].layout for level in found.pyramid}
    assert layouts == ({"tokens"} if name.startswith("vit") else {"NHWC"})


def test_every_candidate_is_measured_in_execution_order_with_its_verdict():
    torch.manual_seed(0)
    found = featx.taps(torchvision.models.resnet18(), (1, 3, 64, 64), label="torchvision/resnet18")
    names = [tap.name for tap in found.taps]
    assert names[:5] == ["conv1", "bn1", "relu", "maxpool", "layer1.0"]
    assert names.index("layer1.1") < names.index("layer1") < names.index("layer2.0")
    maxpool, avgpool, fc = found["maxpool"], found["avgpool"], found["fc"]
    assert (maxpool.shape, maxpool.channels, maxpool.stride, maxpool.layout) == (
        (1, 64, 16, 16),
        64,
        4,
        "NCHW",
    )
    assert (maxpool.faithful, maxpool.keep_glue) == (True, False)
    # adaptive pooling: 1x1 at every input size, so no stride is claimed
    assert (avgpool.stride, avgpool.layout) == (None, "other")
    # the plain cut loses torch.flatten before fc; keep_glue keeps it
    assert (fc.layout, fc.faithful, fc.keep_glue, fc.verdict) == ("vector", True, True, "keep_glue")
    assert not found.keep_glue  # the pyramid itself is plain


def test_the_seed_toys_glue_makes_its_child_a_keep_glue_cut():
    from examples.seed_toy import ResN

    class Maps(nn.Module):  # the seed toy's +5 glue around a conv, so the output is a map
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.toy = ResN()
            self.blocks = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))

        def forward(self, x):
            return self.blocks(self.toy(self.stem(x) + 5))

    found = featx.taps(Maps(), (1, 3, 32, 32))
    assert found["stem"].verdict == "plain"
    assert found["toy"].verdict == "keep_glue"
    assert found["toy"].stride == 2


def test_a_stride_is_measured_never_rounded():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(
                nn.Sequential(nn.Conv2d(3, 4, 3, stride=3, padding=1)), nn.Sequential(nn.Conv2d(4, 4, 1))
            )

        def forward(self, x):
            return self.blocks(x)

    found = featx.taps(Odd(), (1, 3, 96, 96), check=False)
    assert found["blocks.0"].stride == 3


def test_a_model_without_maps_is_refused_in_one_line():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(FeatxError, match=r"returns no map of the input at any module") as err:
        featx.taps(mlp, (1, 3, 8, 8), check=False)
    assert "\n" not in str(err.value)


def test_an_input_too_small_is_refused_in_one_line():
    vit = timm.create_model("vit_tiny_patch16_224", depth=2)  # a fixed 224x224 input
    with pytest.raises(
        FeatxError,
        match=r"`timm/vit_tiny_patch16_224` does not run on an input of shape \[1, 3, 64, 64\]: AssertionError: Input height \(64\)",
    ) as err:
        featx.taps(vit, (1, 3, 64, 64), check=False, label="timm/vit_tiny_patch16_224")
    assert "\n" not in str(err.value)
    assert str(err.value).endswith(
        "(it was built for 224x224 only; for another size build it with --model-kwarg img_size=N)"
    )


def test_the_cli_writes_a_config_that_build_builds_and_check_proves(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(
        ["taps", "torchvision/resnet18", "--input-shape", "1,3,64,64", "--json", "--config", "r18.yaml"]
    )
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    assert set(document) >= {"model", "taps", "pyramid"}
    assert set(document["taps"][0]) == {
        "name",
        "channels",
        "stride",
        "shape",
        "layout",
        "faithful",
        "keep_glue",
        "reason",
    }
    plain = {"faithful": True, "keep_glue": False, "reason": None}
    assert document["pyramid"] == [
        {"name": "layer1", "channels": 64, "stride": 4, **plain},
        {"name": "layer2", "channels": 128, "stride": 8, **plain},
        {"name": "layer3", "channels": 256, "stride": 16, **plain},
        {"name": "layer4", "channels": 512, "stride": 32, **plain},
    ]
    assert main(["check", "r18.yaml"]) == 0
    assert "faithful" in capsys.readouterr().out


def test_a_vit_pyramid_config_keeps_the_glue():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4)
    found = featx.taps(model, (1, 3, 64, 64), label="timm/vit_tiny_patch16_224")
    assert [level.name for level in found.pyramid] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert all(found[level.name].verdict == "keep_glue" for level in found.pyramid)
    assert found.config()["keep_glue"] is True


def test_a_config_gives_its_model_weights_and_input_shape(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    _weights(tmp_path, torchvision.models.resnet18())
    (tmp_path / "r18.yaml").write_text(
        "model: torchvision/resnet18\nweights: weights.safetensors\nupto: layer3\n"
        "verify: {input_shape: [1, 3, 96, 96]}\n"
    )
    assert main(["taps", "r18.yaml", "--depth", "1", "--no-check", "--json", "--config", "new.yaml"]) == 0
    assert "weights: weights.safetensors\n" in (tmp_path / "new.yaml").read_text()  # a new file beside it
    document = json.loads(capsys.readouterr().out)
    assert (document["model"], document["input_shape"], document["checked"]) == (
        "torchvision/resnet18",
        [1, 3, 96, 96],
        False,
    )
    assert {t["name"]: t["shape"] for t in document["taps"]}["layer4"] == [1, 512, 3, 3]
    levels = {level["name"] for level in document["pyramid"]}  # checked, for the config written
    assert all(t["faithful"] is None for t in document["taps"] if t["name"] not in levels)
    assert all(level["faithful"] for level in document["pyramid"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--depth", "0"], "--depth"),
        (["--config", "missing/out.yaml"], "--config missing/out.yaml: folder `missing` does not exist"),
    ],
)
def test_bad_flags_exit_2_in_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["taps", "torchvision/resnet18", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_tokens_without_the_class_token_are_the_patch_grid():
    # CaiT appends its class token after the blocks: the blocks' 16 tokens are the 4x4 grid of 16 px patches
    torch.manual_seed(0)
    model = timm.create_model("cait_xxs24_224", img_size=64, depth=4, embed_dim=32, num_heads=2)
    found = featx.taps(model, (1, 3, 64, 64), check=False, label="timm/cait")
    assert [(level.name, level.channels, level.stride) for level in found.pyramid] == [
        ("blocks.0", 32, 16),
        ("blocks.1", 32, 16),
        ("blocks.2", 32, 16),
        ("blocks.3", 32, 16),
    ]
    assert found.differences == ()


def test_discovery_prints_nothing_where_meta_tensors_cannot_run_the_model(capfd):
    model = timm.create_model("levit_128s")  # attention biases sized for 224 px: meta fails at 64, then real
    featx.taps(model, (1, 3, 224, 224), check=False, label="timm/levit_128s")
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [
        ("vit_tiny_patch16_224", {"img_size": 64, "depth": 4}, (1, 3, 64, 64)),
        ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1)}, (1, 3, 224, 224)),
    ],
)
def test_a_token_backbones_written_config_equals_forward_intermediates(name, kwargs, shape, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    found = featx.taps(model, shape, check="pyramid", label=f"timm/{name}")
    cfg = {"model": f"timm/{name}", "model_kwargs": kwargs, "weights": str(_weights(tmp_path, model))}
    backbone = featx.build_backbone({**cfg, **found.config()}).eval()
    blocks = [int(level.name.rpartition(".")[2]) for level in found.pyramid]
    x = torch.randn(*shape)
    with torch.no_grad():
        ours = list(backbone(x).values())
        theirs = model.forward_intermediates(
            x, indices=blocks, output_fmt="NCHW", norm=False, intermediates_only=True
        )
    assert len(ours) == len(theirs) == 4
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_a_config_of_an_unchecked_pyramid_is_refused():
    found = featx.taps(torchvision.models.resnet18(), (1, 3, 64, 64), check=False)
    assert all(level.faithful is None and level.keep_glue is None for level in found.pyramid)
    with pytest.raises(FeatxError, match=r"was not checked \(check=False\).*check='pyramid'"):
        found.config()


def test_no_check_still_checks_the_levels_a_written_config_taps(tmp_path, monkeypatch, capsys):
    """The root normalises its input and scales a stage: plain cuts at the levels lose it, so the config
    keeps the glue, and `featx check` proves the backbone it builds."""
    monkeypatch.chdir(tmp_path)
    spec = "tests.toy_models:GlueBetweenStages"
    argv = ["taps", spec, "--input-shape", "1,3,64,64", "--no-check", "--depth", "1", "--config", "g.yaml"]
    assert main([*argv, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    levels = {"stage1", "stage2", "stage3"}  # checked; the other candidates not
    assert document["checked"] is False
    assert all(
        t["faithful"] is None and t["keep_glue"] is None for t in document["taps"] if t["name"] not in levels
    )
    # the normalisation runs before the stem, so every level needs the glue
    assert [(p["name"], p["keep_glue"]) for p in document["pyramid"]] == [
        ("stage1", True),
        ("stage2", True),
        ("stage3", True),
    ]
    assert "keep_glue: true" in (tmp_path / "g.yaml").read_text()
    assert main(["check", "g.yaml"]) == 0


def test_the_written_config_keeps_the_weights_prefix_and_names_the_seed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    save_file({f"backbone.body.{k}": v.contiguous() for k, v in model.state_dict().items()}, "p.safetensors")
    argv = ["taps", "torchvision/resnet18", "--input-shape", "1,3,64,64", "--depth", "1", "--no-check"]
    assert (
        main(
            [*argv, "--weights", "p.safetensors", "--weights-prefix", "backbone.body.", "--config", "p.yaml"]
        )
        == 0
    )
    written = (tmp_path / "p.yaml").read_text()
    assert "weights: p.safetensors\nweights_prefix: backbone.body.\n" in written
    assert main(["check", "p.yaml"]) == 0
    assert main([*argv, "--seed", "7", "--config", "r.yaml"]) == 0
    assert "--seed 7" in (tmp_path / "r.yaml").read_text()


def test_the_config_read_is_not_overwritten(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text(
        "model: torchvision/resnet18\nupto: layer3\nverify: {input_shape: [1, 3, 64, 64]}\n"
    )
    assert main(["taps", "mine.yaml", "--config", "mine.yaml"]) == 2
    assert "--config mine.yaml is the config read" in capsys.readouterr().err
    assert "upto: layer3" in (tmp_path / "mine.yaml").read_text()


def test_an_input_the_pyramids_largest_stride_does_not_divide_writes_no_config():
    found = featx.taps(torchvision.models.resnet18(), (1, 3, 100, 100), check="pyramid")
    with pytest.raises(FeatxError, match=r"input 100x100 is not a multiple of 32.*such as 128x128"):
        found.config()
