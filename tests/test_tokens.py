"""Token backbones as NCHW maps (issue 27 §2): a tap on a ViT block or a Swin stage is the map timm's
``forward_intermediates(x, indices=..., output_fmt="NCHW", norm=...)`` returns, bit for bit, on the same
weights; ``final_norm`` applies the model's final norm as ``norm=True`` does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

import featx
from featx.backbone.tokens import TokenGrid, evenly_spaced
from featx.config import load_config
from featx.errors import FeatxError

# tiny variants: few blocks, small inputs (fixed img_size, so keep_glue traces the root's forward)
VIT = {"img_size": 64, "depth": 4}
SWIN = {
    "img_size": 64,
    "window_size": 2,
    "depths": [1, 1, 2, 1],
    "embed_dim": 32,
    "num_heads": [1, 1, 2, 2],
}


def _pinned(model: str, kwargs: dict, blocks: list[int], shape: tuple[int, ...], **config: object) -> None:
    """The built backbone's maps equal timm's ``forward_intermediates`` at ``blocks`` on the same weights."""
    container = "layers" if "swin" in model else "blocks"
    outputs = [f"{container}.{i}" for i in blocks]
    final_norm = bool(config.get("final_norm", False))
    backbone = featx.build_backbone(
        {
            "model": f"timm/{model}",
            "model_kwargs": kwargs,
            "upto": outputs[-1],
            "outputs": outputs,
            "verify": {"input_shape": list(shape)},
            **config,
        }
    )
    torch.manual_seed(1)
    timm_model = timm.create_model(model, **kwargs).eval()
    timm_model.load_state_dict({**timm_model.state_dict(), **backbone.state_dict()})
    x = torch.randn(shape)
    with torch.no_grad():
        got = backbone(x)
        want = timm_model.forward_intermediates(
            x, indices=blocks, output_fmt="NCHW", norm=final_norm, intermediates_only=True
        )
    assert list(got) == outputs
    for (name, value), expected in zip(got.items(), want, strict=True):
        assert value.shape == expected.shape, name
        assert torch.equal(value, expected), name


@pytest.mark.parametrize("final_norm", [False, True])
def test_vit_blocks_are_timms_forward_intermediates_maps(final_norm):
    _pinned("vit_tiny_patch16_224", VIT, [1, 3], (2, 3, 64, 64), keep_glue=True, final_norm=final_norm)


def test_a_non_square_input_gives_a_map_of_its_own_grid():
    _pinned("vit_tiny_patch16_224", {"img_size": (64, 96), "depth": 2}, [1], (1, 3, 64, 96), keep_glue=True)


def test_deit_distilled_drops_both_prefix_tokens():
    kwargs = {"img_size": 64, "depth": 3}
    _pinned(
        "deit_tiny_distilled_patch16_224", kwargs, [0, 2], (1, 3, 64, 64), keep_glue=True, final_norm=True
    )


def test_register_tokens_are_dropped_and_the_stride_is_the_patch_size_14():
    kwargs = {"img_size": 56, "depth": 2, "embed_dim": 64, "num_heads": 2}
    _pinned("vit_small_patch14_reg4_dinov2", kwargs, [0, 1], (1, 3, 56, 56), keep_glue=True)
    backbone = featx.build_backbone(
        {"model": "timm/vit_small_patch14_reg4_dinov2", "model_kwargs": kwargs, "upto": "blocks.1",
         "keep_glue": True, "verify": {"input_shape": [1, 3, 56, 56]}}
    )  # fmt: skip
    assert (backbone.channels, backbone.strides) == ({"blocks.1": 64}, {"blocks.1": 14})


def test_eva02_blocks_are_timms_maps():
    _pinned("eva02_tiny_patch14_224", {"img_size": 56, "depth": 2}, [0, 1], (1, 3, 56, 56), keep_glue=True)


def test_beit_blocks_are_timms_maps():
    kwargs = {"img_size": 64, "depth": 2, "embed_dim": 64, "num_heads": 2}
    _pinned("beit_base_patch16_224", kwargs, [0, 1], (1, 3, 64, 64), keep_glue=True, final_norm=True)


@pytest.mark.parametrize("keep_glue", [False, True])
def test_swin_stages_are_permuted_to_nchw_at_strides_4_to_32(keep_glue):
    _pinned("swin_tiny_patch4_window7_224", SWIN, [0, 1, 2, 3], (1, 3, 64, 64), keep_glue=keep_glue)
    backbone = featx.build_backbone(
        {"model": "timm/swin_tiny_patch4_window7_224", "model_kwargs": SWIN, "upto": "layers.3",
         "outputs": ["layers.0", "layers.1", "layers.2", "layers.3"], "keep_glue": keep_glue,
         "verify": {"input_shape": [1, 3, 64, 64]}}
    )  # fmt: skip
    assert list(backbone.strides.values()) == [4, 8, 16, 32]
    assert list(backbone.out_channels.values()) == [32, 64, 128, 256]


def test_swins_final_norm_applies_to_its_last_stage_only_as_timms():
    _pinned("swin_tiny_patch4_window7_224", SWIN, [1, 2, 3], (1, 3, 64, 64), final_norm=True)


def test_the_final_norm_is_held_under_its_own_name_in_the_state_dict():
    backbone = featx.build_backbone(
        {"model": "timm/vit_tiny_patch16_224", "model_kwargs": VIT, "upto": "blocks.1", "keep_glue": True,
         "final_norm": True, "verify": {"input_shape": [1, 3, 64, 64]}}
    )  # fmt: skip
    keys = set(backbone.state_dict())
    assert {"norm.weight", "norm.bias"} <= keys
    assert keys <= set(timm.create_model("vit_tiny_patch16_224", **VIT).state_dict())
    assert "norm" not in list(backbone.keys())  # held for the maps, not a kept child


def test_final_norm_on_a_model_of_nchw_maps_is_refused():
    with pytest.raises(FeatxError) as raised:
        featx.build_backbone(
            {"model": "torchvision/resnet18", "upto": "layer2", "final_norm": True,
             "verify": {"input_shape": [1, 3, 64, 64]}}
        )  # fmt: skip
    assert str(raised.value) == (
        "<dict>: key `final_norm` is true, and no output is a token map the final norm applies to (every "
        "output is an NCHW map already); set `final_norm: false`"
    )


def test_final_norm_on_swin_stages_before_the_last_is_refused():
    with pytest.raises(FeatxError) as raised:
        featx.build_backbone(
            {"model": "timm/swin_tiny_patch4_window7_224", "model_kwargs": SWIN, "upto": "layers.1",
             "final_norm": True, "verify": {"input_shape": [1, 3, 64, 64]}}
        )  # fmt: skip
    assert str(raised.value) == (
        "<dict>: key `final_norm` is true, and `SwinTransformer` applies its final norm to the last stage "
        "`layers.3` only, which no output taps; tap it or set `final_norm: false`"
    )


def test_final_norm_must_be_a_bool():
    with pytest.raises(FeatxError, match=r"^<dict>: key `final_norm` must be a bool, got 'yes'$"):
        load_config({"model": "timm/vit_tiny_patch16_224", "upto": "blocks", "final_norm": "yes"})


def test_a_token_grid_is_floored_or_padded_as_timms_patch_embed():
    assert TokenGrid(1, (16, 16)).size(70, 100) == (4, 6)
    assert TokenGrid(1, (16, 16), pad=True).size(70, 100) == (5, 7)


@pytest.mark.parametrize(
    "n_blocks, k, indices",
    [
        (12, 4, [2, 5, 8, 11]),
        (24, 4, [5, 11, 17, 23]),
        (12, 3, [3, 7, 11]),
        (4, 4, [0, 1, 2, 3]),
        (12, 1, [11]),
    ],
)
def test_evenly_spaced_blocks_end_at_the_last(n_blocks, k, indices):
    assert evenly_spaced(n_blocks, k) == indices


def test_evenly_spaced_refuses_more_blocks_than_there_are():
    with pytest.raises(FeatxError, match=r"^5 evenly spaced blocks of 4: accepted 1 to 4$"):
        evenly_spaced(4, 5)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parent.parent
    env = {"PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "featx", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )


@pytest.fixture
def vit_config(tmp_path: Path) -> Path:
    config = tmp_path / "vit.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "timm/vit_tiny_patch16_224",
                "model_kwargs": {"img_size": 64, "depth": 2},
                "upto": "blocks.1",
                "outputs": ["blocks.0", "blocks.1"],
                "keep_glue": True,
                "final_norm": True,
                "verify": {"input_shape": [1, 3, 64, 64]},
            }
        )
    )
    return config


def test_featx_check_proves_vit_maps_against_hooks_and_the_same_reshape(vit_config: Path):
    done = _cli("check", str(vit_config), "--json", cwd=vit_config.parent)
    assert done.returncode == 0, done.stderr
    (checked,) = json.loads(done.stdout)["configs"]
    assert {mode: built["faithful"] for mode, built in checked["built"].items()} == {
        "eval": True,
        "train": True,
    }


def test_featx_export_pt2_of_vit_maps_matches_the_backbone(vit_config: Path):
    out = vit_config.parent / "vit.pt2"
    done = _cli(
        "export",
        str(vit_config),
        "--format",
        "pt2",
        "--out",
        str(out),
        "--random-weights",
        cwd=vit_config.parent,
    )
    assert done.returncode == 0, done.stderr
    program = torch.export.load(str(out))
    shapes = [list(t.shape) for t in program.module()(torch.randn(1, 3, 64, 64))]
    assert shapes == [[1, 192, 4, 4], [1, 192, 4, 4]]


# -- the ecosystem's shorthand: out_indices and strides, resolved to module names ---------------------
SMALL_VIT = {"model": "timm/vit_tiny_patch16_224", "model_kwargs": {"img_size": 64, "depth": 12}}
SHAPE = {"verify": {"input_shape": [1, 3, 64, 64]}}


def test_out_indices_are_timms_feature_info_indices():
    plan = featx.resolve({"model": "timm/resnet18", "out_indices": [1, 2, 3, 4], **SHAPE})
    assert (plan.cut.upto, plan.outputs) == (
        "layer4",
        (("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3"), ("layer4", "layer4")),
    )


def test_strides_name_the_last_module_at_each_stride():
    backbone = featx.build_backbone({"model": "timm/resnet18", "strides": [8, 16, 32], **SHAPE})
    assert backbone.strides == {"layer2": 8, "layer3": 16, "layer4": 32}


def test_out_indices_of_a_vit_are_block_indices_and_keep_the_glue():
    plan = featx.resolve({**SMALL_VIT, "out_indices": evenly_spaced(12, 4), **SHAPE})
    assert [child for _, child in plan.outputs] == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]
    assert (plan.cut.upto, plan.keep_glue) == ("blocks.11", True)
    assert plan.config.raw["outputs"] == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]
    assert "out_indices" not in plan.config.raw


def test_swin_strides_name_its_stages():
    plan = featx.resolve(
        {"model": "timm/swin_tiny_patch4_window7_224", "model_kwargs": SWIN, "strides": [8, 16, 32], **SHAPE}
    )
    assert [child for _, child in plan.outputs] == ["layers.1", "layers.2", "layers.3"]


def test_an_index_past_feature_info_is_refused_naming_the_key_and_the_indices():
    with pytest.raises(FeatxError) as raised:
        featx.resolve({"model": "timm/resnet18", "out_indices": [1, 7]})
    assert str(raised.value) == (
        "<dict>: key `out_indices[1]` is 7; `timm/resnet18` has feature_info indices 0 to 4 "
        "(`act1`, `layer1`, `layer2`, `layer3`, `layer4`)"
    )


def test_a_stride_the_model_has_not_is_refused_naming_its_strides():
    with pytest.raises(FeatxError) as raised:
        featx.resolve({"model": "timm/resnet18", "strides": [8, 64]})
    assert str(raised.value) == (
        "<dict>: key `strides[1]` is 64; `timm/resnet18` has strides 2, 4, 8, 16, 32 (timm feature_info)"
    )


def test_shorthand_on_a_model_without_feature_info_is_refused():
    with pytest.raises(FeatxError) as raised:
        featx.resolve({"model": "torchvision/resnet18", "strides": [8]})
    assert str(raised.value) == (
        "<dict>: key `strides`: `torchvision/resnet18` has no timm `feature_info` to read strides from "
        "(featx reads them from timm models for now); name the modules to tap in `outputs`"
    )


def test_outputs_and_a_shorthand_together_are_refused():
    with pytest.raises(
        FeatxError, match=r"^<dict>: keys `outputs`, `strides` all say what to tap; keep one$"
    ):
        load_config({"model": "timm/resnet18", "outputs": ["layer1"], "strides": [8]})


@pytest.mark.parametrize(
    "value, message",
    [
        ([], "must be a list of positive integers (e.g. [8, 16, 32]), got []"),
        ([8, 0], "must be a list of positive integers (e.g. [8, 16, 32]), got [8, 0]"),
        ([8, 8], "lists 8 twice; each tap once"),
    ],
)
def test_bad_strides_are_refused_in_one_line(value, message):
    with pytest.raises(FeatxError) as raised:
        load_config({"model": "timm/resnet18", "strides": value})
    assert str(raised.value) == f"<dict>: key `strides` {message}"


def test_featx_build_json_shows_the_outputs_a_shorthand_resolved_to(tmp_path: Path):
    config = tmp_path / "vit.yaml"
    config.write_text(yaml.safe_dump({**SMALL_VIT, "out_indices": [5, 11], **SHAPE}))
    done = _cli("build", str(config), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    outputs = json.loads(done.stdout)["outputs"]
    assert [(o["child"], o["channels"], o["stride"], o["shape"]) for o in outputs] == [
        ("blocks.5", 192, 16, [1, 192, 4, 4]),
        ("blocks.11", 192, 16, [1, 192, 4, 4]),
    ]


def test_the_final_norm_is_read_from_the_weights_file(tmp_path: Path):
    from safetensors.torch import save_file

    state = {
        k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224", **VIT).state_dict().items()
    }
    state["norm.weight"] = torch.full_like(state["norm.weight"], 2.0)
    save_file(state, tmp_path / "vit.safetensors")
    backbone = featx.build_backbone(
        {"model": "timm/vit_tiny_patch16_224", "model_kwargs": VIT, "weights": str(tmp_path / "vit.safetensors"),
         "upto": "blocks.1", "keep_glue": True, "final_norm": True, "verify": {"input_shape": [1, 3, 64, 64]}}
    )  # fmt: skip
    assert torch.equal(backbone.get_submodule("norm").weight, state["norm.weight"])


def test_a_shorthand_config_gets_the_same_init_as_its_written_outputs():
    by_index = featx.build_backbone({"model": "timm/resnet18", "out_indices": [2, 3], **SHAPE})
    by_name = featx.build_backbone(
        {"model": "timm/resnet18", "upto": "layer3", "outputs": ["layer2", "layer3"], **SHAPE}
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(by_index.state_dict().values(), by_name.state_dict().values(), strict=True)
    )


def test_torchscript_of_token_maps_is_refused_not_run_as_tokens():
    backbone = featx.build_backbone(
        {"model": "timm/swin_tiny_patch4_window7_224", "model_kwargs": SWIN, "upto": "layers.1", **SHAPE}
    )
    with pytest.raises(
        FeatxError, match=r"^outputs `layers.1` are tokens made into NCHW maps, which TorchScript"
    ):
        torch.jit.script(backbone)


def test_featx_extract_of_a_config_stores_vit_maps(tmp_path: Path):
    import numpy as np
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
    config = {"model": "timm/vit_tiny_patch16_224", "model_kwargs": {"img_size": 64, "depth": 2},
              "upto": "blocks.1", "outputs": ["blocks.0", "blocks.1"], "keep_glue": True}  # fmt: skip
    featx.extract(config, tmp_path / "images", tmp_path / "out", random_weights=True)
    features = featx.open_features(tmp_path / "out")
    assert {name: list(t.shape) for name, t in features.row(0).items()} == {
        "blocks.0": [192, 4, 4],
        "blocks.1": [192, 4, 4],
    }
