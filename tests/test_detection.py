"""The detection vocabulary on featx backbones (issue 27 §3): FPN extra levels as torchvision builds them
(`extra_blocks: pool | p6p7 | p6p7_c5 | none`) with the anchor generator that matches, torchvision's
RetinaNet weights read bit-equal, and a one-output (C4) backbone with the integer `out_channels`
torchvision's heads expect."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import (
    _default_anchorgen,
    retinanet_resnet50_fpn,
    retinanet_resnet50_fpn_v2,
)
from torchvision.ops import MultiScaleRoIAlign

import featx
from featx import FeatxError
from featx.config import load_config
from featx.errors import FeatxWarning

SMALL = {"input_shape": [1, 3, 64, 64]}
R18_C3_C5 = {
    "model": "torchvision/resnet18",
    "upto": "layer4",
    "outputs": ["layer2", "layer3", "layer4"],
    "verify": SMALL,
}
R18_C4 = {"model": "torchvision/resnet18", "upto": "layer3", "outputs": {"res4": "layer3"}, "verify": SMALL}
TARGETS = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])}]


def _one_train_step(detector: torch.nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    losses = detector.train()([torch.rand(3, 64, 64)], TARGETS)
    sum(losses.values()).backward()
    return losses


def test_p6p7_adds_maps_p6_and_p7_at_two_and_four_times_the_last_stride():
    backbone = featx.build_backbone({**R18_C3_C5, "fpn": {"out_channels": 32, "extra_blocks": "p6p7"}})
    assert backbone.strides == {"0": 8, "1": 16, "2": 32, "p6": 64, "p7": 128}
    maps = backbone(torch.randn(1, 3, 64, 64))
    assert {name: list(m.shape) for name, m in maps.items()} == {
        "0": [1, 32, 8, 8],
        "1": [1, 32, 4, 4],
        "2": [1, 32, 2, 2],
        "p6": [1, 32, 1, 1],
        "p7": [1, 32, 1, 1],
    }


def test_extra_blocks_none_returns_the_tapped_levels_only():
    backbone = featx.build_backbone({**R18_C3_C5, "fpn": {"out_channels": 32, "extra_blocks": "none"}})
    assert backbone.strides == {"0": 8, "1": 16, "2": 32}


def test_the_p6p7_anchor_generator_is_torchvisions_retinanet_default_for_taps_at_8_16_32():
    backbone = featx.build_backbone({**R18_C3_C5, "fpn": {"out_channels": 32, "extra_blocks": "p6p7"}})
    theirs = _default_anchorgen()
    ours = backbone.anchor_generator()
    assert ours.sizes == theirs.sizes
    assert ours.aspect_ratios == theirs.aspect_ratios


def test_anchor_sizes_given_per_map_are_used_and_a_wrong_count_is_refused():
    backbone = featx.build_backbone({**R18_C3_C5, "fpn": {"out_channels": 32, "extra_blocks": "none"}})
    assert backbone.anchor_generator(sizes=((16,), (32,), (64,))).sizes == ((16,), (32,), (64,))
    with pytest.raises(FeatxError, match=r"has 2 tuples of sizes; the backbone has 3 maps \(`0`, `1`, `2`\)"):
        backbone.anchor_generator(sizes=((16,), (32,)))


def test_retinanet_trains_one_step_on_a_p6p7_backbone_with_its_anchor_generator():
    backbone = featx.build_backbone({**R18_C3_C5, "fpn": {"out_channels": 32, "extra_blocks": "p6p7"}})
    detector = RetinaNet(
        backbone, num_classes=3, anchor_generator=backbone.anchor_generator(), min_size=64, max_size=64
    )
    losses = _one_train_step(detector)
    assert set(losses) == {"classification", "bbox_regression"}
    assert all(torch.isfinite(loss) for loss in losses.values())


def _retinanet_checkpoint(tmp_path: Path, builder) -> tuple[Path, torch.nn.Module]:
    """torchvision's RetinaNet as ``builder`` makes it (seeded random; the FPN's and P6/P7's zero biases made
    non-zero so an FPN at its init cannot pass for it), saved as its ``state_dict()``; and its backbone."""
    torch.manual_seed(0)
    model = builder(weights=None, weights_backbone=None)
    with torch.no_grad():
        for param in model.backbone.fpn.parameters():
            param.add_(torch.rand_like(param) * 0.1)
    path = tmp_path / "retinanet.pth"
    torch.save(model.state_dict(), path)
    return path, model.backbone.eval()


@pytest.mark.parametrize(
    ("builder", "extra_blocks"), [(retinanet_resnet50_fpn, "p6p7"), (retinanet_resnet50_fpn_v2, "p6p7_c5")]
)
def test_torchvisions_retinanet_weights_load_and_give_bit_equal_maps(tmp_path, builder, extra_blocks):
    path, theirs = _retinanet_checkpoint(tmp_path, builder)
    config = {
        "model": "torchvision/resnet50",
        "upto": "layer4",
        "outputs": ["layer2", "layer3", "layer4"],
        "weights": str(path),
        "weights_prefix": "backbone.body.",
        "fpn": {"out_channels": 256, "extra_blocks": extra_blocks},
        "verify": SMALL,
    }
    plan = featx.resolve(config)
    assert plan.fpn == "loaded"
    ours = plan.build()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected = ours(x), theirs(x)
    assert list(got) == list(expected) == ["0", "1", "2", "p6", "p7"]
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_p6p7_reads_p6_from_where_the_config_says_even_when_channels_would_say_otherwise():
    # torchvision's LastLevelP6P7 takes P5 when its in and out channels are equal; layer4 of resnet18 has
    # 512 channels, as the FPN here: `p6p7_c5` still feeds P6 from C5
    config = {**R18_C3_C5, "fpn": {"out_channels": 512, "extra_blocks": "p6p7_c5"}}
    assert featx.build_backbone(config).fpn.extra_blocks.use_P5 is False


def test_extra_pool_is_the_old_spelling_of_extra_blocks_pool_and_none_and_warns():
    with pytest.warns(
        FeatxWarning, match=r"`fpn.extra_pool: false` is the old spelling of `fpn.extra_blocks: none`"
    ):
        cfg = load_config({**R18_C3_C5, "fpn": {"extra_pool": False}})
    assert cfg.fpn is not None and cfg.fpn.extra_blocks == "none"
    with pytest.warns(
        FeatxWarning, match=r"`fpn.extra_pool: true` is the old spelling of `fpn.extra_blocks: pool`"
    ):
        cfg = load_config({**R18_C3_C5, "fpn": {"extra_pool": True}})
    assert cfg.fpn is not None and cfg.fpn.extra_blocks == "pool"


def test_an_unknown_extra_block_is_refused_naming_the_accepted_ones():
    with pytest.raises(
        FeatxError,
        match=r"<dict>: key `fpn.extra_blocks` is 'p6'; accepted: `pool`, `p6p7`, `p6p7_c5`, `none`",
    ):
        load_config({**R18_C3_C5, "fpn": {"extra_blocks": "p6"}})


def test_extra_blocks_and_extra_pool_together_are_refused():
    with pytest.raises(FeatxError, match=r"keys `fpn.extra_blocks` and `fpn.extra_pool` both say"):
        load_config({**R18_C3_C5, "fpn": {"extra_blocks": "p6p7", "extra_pool": True}})


# -- a one-output (C4) backbone ------------------------------------------------------------------------
def test_a_one_output_backbone_has_an_integer_out_channels():
    backbone = featx.build_backbone(R18_C4)
    assert backbone.out_channels == 256
    assert isinstance(backbone.out_channels, int)
    assert backbone.channels == {"res4": 256}


def test_a_backbone_with_several_outputs_keeps_the_mapping():
    backbone = featx.build_backbone({**R18_C3_C5, "upto": "layer3", "outputs": ["layer2", "layer3"]})
    assert backbone.out_channels == {"layer2": 128, "layer3": 256}


def test_reading_the_one_output_channels_as_a_mapping_still_works_and_warns():
    backbone = featx.build_backbone(R18_C4)
    with pytest.warns(FutureWarning, match=r"use `backbone.channels\['res4'\]`"):
        assert backbone.out_channels["res4"] == 256
    with pytest.warns(FutureWarning):
        assert dict(backbone.out_channels.items()) == {"res4": 256}


def test_faster_rcnn_trains_one_step_on_a_c4_backbone():
    backbone = featx.build_backbone(R18_C4)
    detector = FasterRCNN(
        backbone,
        num_classes=3,
        min_size=64,
        max_size=64,
        rpn_anchor_generator=AnchorGenerator(((32, 64, 128),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["res4"], output_size=7, sampling_ratio=2),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # torchvision reads it as the int, not the mapping
        losses = _one_train_step(detector)
    assert all(torch.isfinite(loss) for loss in losses.values())


# -- norm: frozen / eval on a backbone without BatchNorm -------------------------------------------------
CONVNEXT = {
    "model": "timm/convnext_atto",
    "upto": "stages.3",
    "outputs": ["stages.1", "stages.3"],
    "verify": SMALL,
}


@pytest.mark.parametrize("norm", ["frozen", "eval"])
def test_a_norm_setting_on_a_backbone_without_batch_norm_warns_that_it_does_nothing(norm):
    with pytest.warns(
        FeatxWarning,
        match=rf"<dict>: norm: {norm} does nothing: `timm/convnext_atto` has no BatchNorm \(it uses `LayerNorm2d`\)",
    ):
        featx.build_backbone({**CONVNEXT, "norm": norm})


def test_norm_frozen_on_a_backbone_with_batch_norm_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FeatxWarning)
        featx.build_backbone({**R18_C4, "norm": "frozen"})


# -- frozen_stages / freeze_at / trainable_layers count the model's stages --------------------------------
def _frozen(model: str, upto: str, **spelling) -> list[str]:
    return featx.build_backbone({"model": model, "upto": upto, "verify": SMALL, **spelling}).frozen


@pytest.mark.parametrize(
    ("spelling", "frozen"),
    [
        ({"frozen_stages": -1}, []),
        ({"frozen_stages": 1}, ["stem", "stages.0"]),
        ({"frozen_stages": 4}, ["stem", "stages.0", "stages.1", "stages.2", "stages.3"]),
        ({"freeze_at": 1}, ["stem"]),
        ({"freeze_at": 3}, ["stem", "stages.0", "stages.1"]),
        ({"trainable_layers": 5}, []),
        ({"trainable_layers": 1}, ["stem", "stages.0", "stages.1", "stages.2"]),
        ({"trainable_layers": 0}, ["stem", "stages.0", "stages.1", "stages.2", "stages.3"]),
    ],
)
def test_the_stage_spellings_count_convnexts_stages(spelling, frozen):
    assert _frozen("timm/convnext_atto", "stages", **spelling) == frozen


def test_frozen_stages_on_regnet_freezes_the_stem_and_its_first_stages():
    # mmdetection's RegNet is its ResNet: stem, then s1.. as layer1..
    assert _frozen("timm/regnetx_002", "s4", frozen_stages=2) == ["stem", "s1", "s2"]


def test_efficientnet_stages_start_where_the_stride_changes():
    # timm's blocks.3 and blocks.4 run at stride 16, blocks.5 and blocks.6 at 32: five stages from blocks.0
    assert _frozen("timm/efficientnet_b0", "blocks", frozen_stages=4) == [
        "conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4",
    ]  # fmt: skip


def test_torchvisions_stem_inside_features_is_the_stem():
    assert _frozen("torchvision/mobilenet_v3_large", "features", frozen_stages=0) == ["features.0"]
    assert _frozen("torchvision/mobilenet_v3_large", "features", freeze_at=3) == [
        "features.0", "features.1", "features.2", "features.3",
    ]  # fmt: skip


def test_frozen_stages_past_the_models_stages_is_refused_naming_them():
    with pytest.raises(
        FeatxError,
        match=r"<dict>: key `frozen_stages` is 5; accepted: -1\.\.4 \(mmdetection, over the 4 stages of "
        r"`timm/convnext_atto`: `stages.0`, `stages.1`, `stages.2`, `stages.3`\)",
    ):
        _frozen("timm/convnext_atto", "stages", frozen_stages=5)


def test_frozen_stages_past_the_cut_is_refused():
    with pytest.raises(
        FeatxError, match=r"key `frozen_stages` freezes through `stages.2`, past the cut at `stages.1`"
    ):
        _frozen("timm/convnext_atto", "stages.1", frozen_stages=3)


def test_frozen_stages_0_on_a_convnext_is_refused_as_ambiguous():
    with pytest.raises(
        FeatxError, match=r"`frozen_stages: 0` is ambiguous on a ConvNeXt: .* `freeze: stem` for the stem"
    ):
        _frozen("timm/convnext_atto", "stages", frozen_stages=0)


def _resnet18_p6p7_checkpoint(tmp_path: Path, layout: str) -> tuple[dict, torch.nn.Module]:
    """torchvision's resnet18 FPN with P6/P7 from C5 (seeded; the FPN's zero biases made non-zero), saved
    in a detector checkpoint's key layout, and the config that reads it."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    torch.manual_seed(0)
    made = resnet_fpn_backbone(
        backbone_name="resnet18",
        weights=None,
        trainable_layers=5,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(512, 256),
    )
    with torch.no_grad():
        for param in made.fpn.parameters():
            param.add_(torch.rand_like(param) * 0.1)
    if layout == "detectron2":  # bottom_up.*, fpn_lateral{3..5}.*, fpn_output{3..5}.*, top_block.p6/p7.*
        state = {f"backbone.bottom_up.{k}": v for k, v in made.body.state_dict().items()}
        for key, value in made.fpn.state_dict().items():
            if key.startswith("extra_blocks."):
                state[f"backbone.top_block.{key.split('.', 1)[1]}"] = value
                continue
            blocks, i, _, tensor = key.split(".")
            kind = "fpn_lateral" if blocks == "inner_blocks" else "fpn_output"
            state[f"backbone.{kind}{int(i) + 3}.{tensor}"] = value
        prefix = "backbone.bottom_up."
    else:  # mmdetection: backbone.*, neck.lateral_convs.N.conv.*, neck.fpn_convs.N.conv.* (3, 4: P6, P7)
        state = {f"backbone.{k}": v for k, v in made.body.state_dict().items()}
        for key, value in made.fpn.state_dict().items():
            if key.startswith("extra_blocks."):
                level = 3 if key.split(".")[1] == "p6" else 4
                state[f"neck.fpn_convs.{level}.conv.{key.split('.')[-1]}"] = value
                continue
            blocks, i, _, tensor = key.split(".")
            kind = "lateral_convs" if blocks == "inner_blocks" else "fpn_convs"
            state[f"neck.{kind}.{i}.conv.{tensor}"] = value
        prefix = "backbone."
    path = tmp_path / f"{layout}.pth"
    torch.save({"state_dict": state}, path)
    config = {
        **R18_C3_C5,
        "weights": str(path),
        "weights_prefix": prefix,
        "fpn": {"out_channels": 256, "extra_blocks": "p6p7_c5"},
    }
    return config, made.eval()


def test_a_detectron2_retinanet_checkpoints_p6_and_p7_load_from_its_top_block(tmp_path):
    config, made = _resnet18_p6p7_checkpoint(tmp_path, "detectron2")
    plan = featx.resolve(config)
    assert plan.fpn == "loaded"
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected = plan.build()(x), made(x)
    assert list(got) == list(expected) == ["0", "1", "2", "p6", "p7"]
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_an_mmdetection_checkpoints_extra_convs_are_refused_for_p6p7(tmp_path):
    # mmdetection runs P7 on P6 without the ReLU unless `relu_before_extra_convs`, which its file does not say
    config, _ = _resnet18_p6p7_checkpoint(tmp_path, "mmdetection")
    with pytest.raises(
        FeatxError,
        match=r"key `weights` \(its `neck.lateral_convs.\*` keys, for `fpn`\): `fpn.extra_blocks: p6p7_c5` is "
        r"torchvision's LastLevelP6P7 \(a ReLU between P6 and P7\), and an mmdetection file does not say",
    ):
        featx.build_backbone(config)


def test_the_stage_spellings_on_a_one_stride_trunk_are_refused():
    with pytest.raises(
        FeatxError,
        match=r"`timm/vit_tiny_patch16_224` has no stages featx can count: its trunk runs at one stride \(16\); "
        r"name the last frozen module with `freeze: <module name>` instead of `frozen_stages`",
    ):
        featx.build_backbone({"model": "timm/vit_tiny_patch16_224", "upto": "blocks", "frozen_stages": 1})


def test_trainable_layers_0_freezes_a_stage_the_cut_goes_into_as_far_as_it_keeps_it():
    assert _frozen("timm/convnext_atto", "stages.1.blocks.0", trainable_layers=0) == [
        "stem", "stages.0", "stages.1.downsample", "stages.1.blocks.0",
    ]  # fmt: skip
