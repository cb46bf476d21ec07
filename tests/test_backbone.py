"""Config-driven backbones: shipped configs, measured channels and strides, the anchors' taps, freezing,
norms, weights with a prefix, and real detection/segmentation heads on top."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.ops.misc import FrozenBatchNorm2d

import featx
from featx import FeatxError
from featx.backbone import body_of
from featx.cli import main
from featx.errors import FeatxWarning
from tests import toy_models

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SMALL = {"input_shape": [1, 3, 64, 64]}


def _config(**overrides) -> dict:
    return {
        "model": "torchvision/resnet50",
        "upto": "layer4",
        "outputs": ["layer2"],
        "verify": SMALL,
        **overrides,
    }


@pytest.mark.parametrize(
    ("name", "channels", "strides"),
    [
        ("fasterrcnn_resnet50_fpn.yaml", [256, 512, 1024, 2048], [4, 8, 16, 32]),
        ("c4_resnet50.yaml", [1024], [16]),
        ("deeplab_resnet50_dilated.yaml", [256, 2048], [4, 8]),
        ("deeplab_timm_resnet50d_os8.yaml", [256, 2048], [4, 8]),
        ("mmdet_timm_resnet50d.yaml", [256, 512, 1024, 2048], [4, 8, 16, 32]),
        ("convnext_tiny_fpn.yaml", [96, 192, 384, 768], [4, 8, 16, 32]),
        ("mobilenet_v3_large_fpn.yaml", [24, 40, 112, 960], [4, 8, 16, 32]),
    ],
)
def test_shipped_configs_build_with_measured_channels_and_strides(name, channels, strides):
    backbone = featx.build_backbone(CONFIGS / name)
    body = body_of(backbone)
    assert list(body.channels.values()) == channels
    assert list(body.strides.values()) == strides


def _seeded_weights(tmp_path: Path, spec: str, prefix: str = "") -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(3)
    model = featx.load_model(spec)
    path = tmp_path / "weights.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_taps_equal_intermediate_layer_getter_and_create_feature_extractor(tmp_path):
    model, path = _seeded_weights(tmp_path, "torchvision/resnet50")
    taps = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
    backbone = featx.build_backbone(_config(weights=str(path), outputs={v: k for k, v in taps.items()}))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = backbone(x)
        getter = IntermediateLayerGetter(model, taps)(x)
        fx = create_feature_extractor(model, taps)(x)
    assert list(ours) == ["0", "1", "2", "3"]
    for key in ours:
        assert torch.equal(ours[key], getter[key])
        assert torch.equal(ours[key], fx[key])


def test_taps_equal_timm_features_only(tmp_path):
    model, path = _seeded_weights(tmp_path, "timm/resnet50d")
    backbone = featx.build_backbone(
        _config(model="timm/resnet50d", weights=str(path), outputs=["layer1", "layer2", "layer3", "layer4"])
    )
    features = timm.create_model("resnet50d", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    features.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = list(backbone(x).values()), features(x)
    assert len(ours) == len(theirs) == 4
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert [backbone.out_channels[k] for k in backbone.out_channels] == features.feature_info.channels()
    assert list(backbone.strides.values()) == features.feature_info.reduction()


@pytest.mark.parametrize(("upto", "output"), [("layer2", "layer2"), (6, "layer2"), ("layer3.0", "layer3.0")])
def test_a_config_without_outputs_has_the_cut_as_its_one_output(upto, output):
    config = {"model": "torchvision/resnet18", "upto": upto, "verify": {"input_shape": [1, 3, 32, 32]}}
    x = torch.randn(1, 3, 32, 32)
    backbone = featx.build_backbone(config)
    named = featx.build_backbone({**config, "outputs": [output]})
    named.load_state_dict(backbone.state_dict())
    got, expected = backbone(x), named(x)
    assert list(got) == [output]
    assert torch.equal(got[output], expected[output])


def test_weights_prefix_is_stripped_and_the_tail_is_not_needed(tmp_path):
    model, _ = _seeded_weights(tmp_path, "torchvision/resnet50")
    path = tmp_path / "detector.pth"
    kept = {f"backbone.{k}": v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    torch.save({"state_dict": {**kept, "roi_heads.box.weight": torch.zeros(3)}}, path)
    backbone = featx.build_backbone(_config(weights=str(path), weights_prefix="backbone."))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(
            backbone(x)["layer2"], IntermediateLayerGetter(model, {"layer2": "layer2"})(x)["layer2"]
        )


@pytest.mark.parametrize(
    "spelling",
    [{"freeze": "layer1"}, {"trainable_layers": 3}, {"frozen_stages": 1}, {"freeze_at": 2}],
    ids=["featx", "torchvision", "mmdetection", "detectron2"],
)
def test_every_framework_spelling_of_freeze_the_stem_and_layer1_agrees(spelling):
    backbone = featx.build_backbone(_config(**spelling))
    assert backbone.frozen == ["conv1", "bn1", "relu", "maxpool", "layer1"]
    frozen = {name for name, p in backbone.named_parameters() if not p.requires_grad}
    assert frozen == {
        n for n, _ in backbone.named_parameters() if n.startswith(("conv1.", "bn1.", "layer1."))
    }


@pytest.mark.parametrize(
    ("spelling", "frozen"),
    [
        ({"trainable_layers": 5}, []),
        ({"trainable_layers": 0}, ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]),
        ({"frozen_stages": -1}, []),
        ({"frozen_stages": 0}, ["conv1", "bn1", "relu", "maxpool"]),
        ({"freeze_at": 1}, ["conv1", "bn1", "relu", "maxpool"]),
        ({"freeze_at": 0}, []),
    ],
)
def test_freeze_spellings_at_their_ends(spelling, frozen):
    assert featx.build_backbone(_config(upto="layer2", **spelling)).frozen == frozen


CONVNEXT = {
    "model": "timm/convnext_atto",
    "upto": "stages.3",
    "outputs": ["stages.1", "stages.3"],
    "verify": SMALL,
}


def _frozen_parameters(backbone: torch.nn.Module) -> set[str]:
    return {name for name, p in backbone.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("keep_glue", [False, True], ids=["sequential", "keep_glue"])
@pytest.mark.parametrize(
    ("freeze", "frozen"),
    [
        ("stages.1", ["stem", "stages.0", "stages.1"]),
        ("stages.1.blocks.0", ["stem", "stages.0", "stages.1.downsample", "stages.1.blocks.0"]),
        ("stem.1", ["stem.0", "stem.1"]),
    ],
)
def test_a_dotted_freeze_freezes_up_to_and_including_that_module(keep_glue, freeze, frozen):
    backbone = featx.build_backbone({**CONVNEXT, "freeze": freeze, "keep_glue": keep_glue})
    assert backbone.frozen == frozen
    full = timm.create_model("convnext_atto")  # the names, from a model featx has not touched
    expected = {n for n, _ in full.named_parameters() if n.startswith(tuple(f + "." for f in frozen))}
    assert _frozen_parameters(backbone) == expected
    backbone.train()
    assert [backbone.get_submodule(f).training for f in frozen] == [False] * len(frozen)
    assert backbone.get_submodule("stages.3").training


def test_a_dotted_freeze_inside_a_kept_child_reaches_the_models_own_modules():
    # the cut keeps `stages` whole (a root child), the freeze still names blocks inside it
    backbone = featx.build_backbone({**CONVNEXT, "upto": "head", "outputs": ["stages"], "freeze": "stages.2"})
    assert backbone.frozen == ["stem", "stages.0", "stages.1", "stages.2"]
    assert not any(p.requires_grad for p in backbone["stages"][2].parameters())
    assert all(p.requires_grad for p in backbone["stages"][3].parameters())


def test_mobilenet_freeze_features_3_freezes_features_0_to_3():
    config = {"model": "torchvision/mobilenet_v3_small", "upto": "features.8", "outputs": ["features.8"]}
    backbone = featx.build_backbone({**config, "freeze": "features.3", "verify": SMALL})
    assert backbone.frozen == ["features.0", "features.1", "features.2", "features.3"]
    frozen = _frozen_parameters(backbone)
    assert frozen == {n for n, _ in backbone.named_parameters() if int(n.split(".")[1]) <= 3}
    assert frozen and all(p.requires_grad for n, p in backbone.named_parameters() if n not in frozen)


def test_cli_build_marks_taps_inside_a_dotted_freeze_as_frozen(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        json.dumps({**CONVNEXT, "outputs": ["stages.0", "stages.1", "stages.2"], "freeze": "stages.1"})
    )
    assert main(["build", str(config), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [o["frozen"] for o in summary["outputs"]] == [True, True, False]
    assert summary["frozen"] == ["stem", "stages.0", "stages.1"]


@pytest.mark.parametrize(
    ("freeze", "message"),
    [
        (
            "stages.7",
            "<dict>: key `freeze`: `stages.7`: `stages` (Sequential) has no child `7`; its children: `0`, `1`, "
            "`2`, `3`",
        ),
        ("stages.1.blokcs", "has no child `blokcs` (did you mean `blocks`?)"),
        (
            "stages.3.blocks.0",
            "<dict>: key `freeze` freezes through `stages.3.blocks.0`, past the cut at `stages.2`; freeze a "
            "module up to `stages.2`",
        ),
        ("norm_pre", "<dict>: key `freeze` freezes through `norm_pre`, past the cut at `stages.2`"),
    ],
)
def test_a_dotted_freeze_that_names_no_module_or_lies_past_the_cut_is_one_line(freeze, message):
    with pytest.raises(FeatxError) as raised:
        featx.build_backbone({**CONVNEXT, "upto": "stages.2", "outputs": ["stages.2"], "freeze": freeze})
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_train_keeps_frozen_children_and_norm_eval_batchnorms_in_eval():
    backbone = featx.build_backbone(_config(frozen_stages=1, norm="eval")).train()
    assert backbone.training and backbone.layer2.training
    assert not backbone.layer1.training and not backbone.conv1.training
    assert not any(m.training for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_norm_frozen_swaps_every_batchnorm_for_frozen_with_the_same_statistics(tmp_path):
    model, path = _seeded_weights(tmp_path, "torchvision/resnet50")
    backbone = featx.build_backbone(_config(weights=str(path), norm="frozen"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert isinstance(backbone.bn1, FrozenBatchNorm2d)
    assert torch.equal(backbone.layer1[0].bn1.running_var, model.layer1[0].bn1.running_var)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = IntermediateLayerGetter(model.eval(), {"layer2": "layer2"})(x)["layer2"]
        assert torch.allclose(backbone(x)["layer2"], ref, atol=1e-5)


def test_fpn_backbone_trains_inside_torchvision_faster_rcnn():
    backbone = featx.build_backbone(CONFIGS / "fasterrcnn_resnet50_fpn.yaml")
    assert backbone.out_channels == 256
    detector = FasterRCNN(backbone, num_classes=3, min_size=128, max_size=128).train()
    frozen_stats = backbone.body.layer1[0].bn1.running_mean.clone()
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[30.0, 30.0, 100.0, 120.0]]), "labels": torch.tensor([2])},
    ]
    losses = detector(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in backbone.body.named_parameters():
        assert (p.grad is not None) == name.startswith(("layer2.", "layer3.", "layer4.")), name
    assert torch.equal(backbone.body.layer1[0].bn1.running_mean, frozen_stats)
    detections = detector.eval()([torch.rand(3, 128, 128)])
    assert set(detections[0]) == {"boxes", "labels", "scores"}


def _train_step_and_eval(detector: torch.nn.Module, size: int = 128) -> None:
    torch.manual_seed(0)
    images = [torch.rand(3, size, size), torch.rand(3, size, size)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[30.0, 30.0, 100.0, 120.0]]), "labels": torch.tensor([2])},
    ]
    if isinstance(detector, MaskRCNN):
        for target in targets:
            box = target["boxes"][0].int()
            target["masks"] = torch.zeros(1, size, size, dtype=torch.uint8)
            target["masks"][0, box[1] : box[3], box[0] : box[2]] = 1
    losses = detector.train()(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    detections = detector.eval()([torch.rand(3, size, size)])
    assert {"boxes", "labels", "scores"} <= set(detections[0])


def test_fpn_maps_are_named_as_torchvision_names_them_whatever_the_tap_names():
    backbone = featx.build_backbone(
        _config(outputs=["layer1", "layer2", "layer3", "layer4"], fpn={"out_channels": 64})
    )
    assert backbone.map_names == {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
    assert backbone.strides == {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}
    with torch.no_grad():
        maps = backbone(torch.rand(1, 3, 64, 64))
    assert {k: list(v.shape) for k, v in maps.items()} == {
        "0": [1, 64, 16, 16],
        "1": [1, 64, 8, 8],
        "2": [1, 64, 4, 4],
        "3": [1, 64, 2, 2],
        "pool": [1, 64, 1, 1],
    }
    assert list(backbone.body(torch.rand(1, 3, 64, 64))) == ["layer1", "layer2", "layer3", "layer4"]
    # torchvision's own default anchors for its resnet50 FPN
    assert backbone.anchor_generator().sizes == ((32,), (64,), (128,), (256,), (512,))


def test_fpn_with_list_form_taps_trains_in_a_default_faster_rcnn():
    backbone = featx.build_backbone(
        _config(outputs=["layer1", "layer2", "layer3", "layer4"], fpn={"out_channels": 64})
    )
    _train_step_and_eval(FasterRCNN(backbone, num_classes=3, min_size=128, max_size=128))


def test_fpn_with_three_taps_trains_with_the_backbones_anchors_and_pooler():
    backbone = featx.build_backbone(
        _config(
            model="torchvision/resnet18", outputs=["layer2", "layer3", "layer4"], fpn={"out_channels": 64}
        )
    )
    assert list(backbone.strides) == ["0", "1", "2", "pool"]
    anchors = backbone.anchor_generator()
    assert anchors.sizes == ((64,), (128,), (256,), (512,))
    assert backbone.roi_pooler().featmap_names == ["0", "1", "2"]
    detector = FasterRCNN(
        backbone,
        num_classes=3,
        min_size=128,
        max_size=128,
        rpn_anchor_generator=anchors,
        box_roi_pool=backbone.roi_pooler(),
    )
    _train_step_and_eval(detector)
    masks = MaskRCNN(
        backbone,
        num_classes=3,
        min_size=128,
        max_size=128,
        rpn_anchor_generator=backbone.anchor_generator(),
        box_roi_pool=backbone.roi_pooler(),
        mask_roi_pool=backbone.roi_pooler(output_size=14),
    )
    _train_step_and_eval(masks)


def test_deeplab_head_on_the_dilated_backbone_runs_forward_and_backward():
    backbone = featx.build_backbone(CONFIGS / "deeplab_resnet50_dilated.yaml").train()
    head = DeepLabHead(backbone.out_channels["out"], num_classes=5)
    features = backbone(torch.randn(2, 3, 64, 64))
    logits = head(features["out"])
    assert list(logits.shape) == [2, 5, 8, 8]  # output stride 8
    logits.mean().backward()
    assert backbone.layer4[0].conv2.weight.grad is not None


def test_cli_build_prints_the_outputs_table_and_json(capsys):
    assert main(["build", str(CONFIGS / "c4_resnet50.yaml")]) == 0
    out = capsys.readouterr().out
    assert "res4    layer3  1024      16      2x1024x14x14" in out
    assert main(["build", str(CONFIGS / "c4_resnet50.yaml"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["outputs"] == [
        {
            "name": "res4",
            "child": "layer3",
            "channels": 1024,
            "stride": 16,
            "shape": [2, 1024, 14, 14],
            "frozen": False,
        }
    ]
    assert summary["frozen"] == ["conv1", "bn1", "relu", "maxpool", "layer1"]


def test_cli_verify_takes_a_config(capsys):
    code = main(["verify", str(CONFIGS / "c4_resnet50.yaml"), "--input-shape", "2,3,64,64", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["upto"] == "layer3" and report["faithful"]


def test_a_dict_and_a_file_give_the_same_backbone(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: torchvision/resnet18\nupto: layer3\noutputs: [layer2, layer3]\n")
    a = featx.build_backbone(path)
    b = featx.build_backbone(
        {"model": "torchvision/resnet18", "upto": "layer3", "outputs": ["layer2", "layer3"]}
    )
    assert (
        (a.out_channels, a.strides)
        == (b.out_channels, b.strides)
        == (
            {"layer2": 128, "layer3": 256},
            {"layer2": 8, "layer3": 16},
        )
    )


def test_torch_jit_script_runs_the_backbone():
    backbone = featx.build_backbone(
        _config(model="torchvision/resnet18", upto="layer3", outputs=["layer2", "layer3"])
    )
    scripted = torch.jit.script(backbone)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(scripted(x).values(), backbone(x).values(), strict=True))


def test_torch_export_runs_the_backbone():
    backbone = featx.build_backbone(
        _config(model="torchvision/resnet18", upto="layer3", outputs=["layer2", "layer3"])
    )
    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(backbone, (x,))
    with torch.no_grad():
        out = exported.module()(x)
        assert all(torch.allclose(out[k], v) for k, v in backbone(x).items())


def test_bad_configs_name_the_key():
    with pytest.raises(FeatxError, match=r"<dict>: unknown key `output`.*did you mean `outputs`"):
        featx.build_backbone(
            {"model": "torchvision/resnet18", "upto": "layer3", "outputs": ["layer2"], "output": 1}
        )


@pytest.mark.parametrize("spec", ["torchvision/resnet50", "timm/resnetblur50"])
def test_building_from_a_file_equals_loading_the_whole_model(tmp_path, spec):
    # resnetblur50 keeps a blur filter in a buffer outside the state dict: featx must not leave it empty.
    model, path = _seeded_weights(tmp_path, spec)
    backbone = featx.build_backbone(_config(model=spec, weights=str(path), upto="layer3", outputs=["layer3"]))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = IntermediateLayerGetter(model.eval(), {"layer3": "layer3"})(x)["layer3"]
        assert torch.equal(backbone(x)["layer3"], ref)
    assert all(not p.is_meta for p in backbone.parameters())


def test_strict_false_fills_what_the_file_lacks_with_the_models_own_init(tmp_path):
    model, _ = _seeded_weights(tmp_path, "torchvision/resnet50")
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if not k.startswith("layer2.")}, str(path))
    with pytest.raises(FeatxError, match=r"missing: `layer2\.0\.conv1\.weight`"):
        featx.build_backbone(_config(weights=str(path)))
    with pytest.warns(FeatxWarning, match=r"lacks 65 of the 265 tensors"):
        backbone = featx.build_backbone(_config(weights=str(path), strict=False))
    assert torch.equal(backbone.layer1[0].conv1.weight, model.layer1[0].conv1.weight)
    assert torch.isfinite(backbone.layer2[0].conv1.weight).all()
    assert backbone.layer2[0].conv1.weight.std() > 0


def test_strict_false_says_which_tensors_stay_at_their_init(tmp_path):
    model, _ = _seeded_weights(tmp_path, "torchvision/resnet50")
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if not k.startswith("layer3.")}, str(path))
    with pytest.warns(
        FeatxWarning, match=r"lacks 95 of the \d+ tensors it should fill; they stay at their init"
    ):
        featx.build_backbone(_config(weights=str(path), strict=False))


def test_strict_false_refuses_a_file_that_fills_nothing(tmp_path):
    """A file of another model (a ConvNeXt's for a ResNet) would give a random backbone that checks faithful."""
    path = tmp_path / "other.safetensors"
    save_file({"stem.0.weight": torch.zeros(3), "stages.0.blocks.0.gamma": torch.zeros(3)}, str(path))
    with pytest.raises(FeatxError, match=r"holds none of the model's \d+ tensors it should fill"):
        featx.build_backbone(_config(weights=str(path), strict=False))


def test_export_writes_only_the_kept_weights_and_rebuilds_bit_exactly(tmp_path, capsys):
    _, weights = _seeded_weights(tmp_path, "torchvision/resnet50")
    config = tmp_path / "c4.yaml"
    config.write_text(
        f"model: torchvision/resnet50\nweights: {weights}\nupto: layer3\noutputs: {{res4: layer3}}\n"
        "freeze_at: 2\nnorm: frozen\nverify: {input_shape: [1, 3, 64, 64]}\n"
    )
    out = tmp_path / "c4.safetensors"
    assert main(["export", str(config), "--out", str(out)]) == 0
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert {k.split(".")[0] for k in keys} == {"conv1", "bn1", "layer1", "layer2", "layer3"}
    assert (metadata["source_model"], metadata["upto"]) == ("torchvision/resnet50", "layer3")
    assert json.loads(metadata["config"])["freeze_at"] == 2
    original = featx.build_backbone(config)
    rebuilt = featx.build_backbone({**yaml_load(config), "weights": str(out)})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(original(x)["res4"], rebuilt(x)["res4"])
    assert not list(tmp_path.glob(".c4.safetensors.*"))  # no temporary left behind


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.mark.slow
def test_torch_compile_runs_the_backbone():
    backbone = featx.build_backbone(
        _config(model="torchvision/resnet18", upto="layer2", outputs=["layer1", "layer2"])
    )
    compiled = torch.compile(backbone)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out, ref = compiled(x), backbone(x)
    assert list(out) == list(ref)
    assert all(torch.allclose(out[k], ref[k], atol=1e-5) for k in ref)


def test_cli_verify_config_with_a_backbone_only_checkpoint(tmp_path, capsys):
    model, _ = _seeded_weights(tmp_path, "torchvision/resnet50")
    path = tmp_path / "backbone.pth"
    torch.save({f"backbone.{k}": v for k, v in model.state_dict().items() if not k.startswith("fc.")}, path)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: torchvision/resnet50\nweights: {path}\nweights_prefix: backbone.\nupto: layer3\noutputs: [layer3]\n"
    )
    assert main(["verify", str(config), "--input-shape", "2,3,64,64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["faithful"]


def test_integer_outputs_are_refused_naming_the_stage_like_children(tmp_path):
    # mmdetection's `out_indices: [0, 1, 2, 3]` habit: as child indices they would tap conv1, bn1, relu, maxpool
    config = tmp_path / "c.yaml"
    config.write_text("model: torchvision/resnet18\nupto: layer4\noutputs: [0, 1, 2, 3]\n")
    with pytest.raises(FeatxError) as raised:
        featx.build_backbone(config)
    assert str(raised.value) == (
        f"{config}: key `outputs[0]` is the integer 0; outputs are module names, not indices: name the "
        "modules to tap, such as this model's stage-like children `layer1`, `layer2`, `layer3`, `layer4` "
        "(a dotted name such as `layer1.0` taps inside one); stage indices (mmdetection's `out_indices`) "
        "are not read yet"
    )


def test_an_integer_in_an_outputs_mapping_is_refused_by_its_key():
    with pytest.raises(
        FeatxError, match=r"^<dict>: key `outputs.c3` is the integer -5; .* `stem`, `stages` "
    ):
        featx.build_backbone(
            {"model": "timm/convnext_atto", "upto": "stages", "outputs": {"c2": "stages.0", "c3": -5}}
        )


def test_a_model_that_cannot_be_built_on_meta_still_loads_its_weights(tmp_path):
    model, path = _seeded_weights(tmp_path, "torchvision/regnet_x_400mf")
    backbone = featx.build_backbone(
        {
            "model": "torchvision/regnet_x_400mf",
            "weights": str(path),
            "upto": "trunk_output",
            "outputs": ["stem"],
        }
    )
    assert torch.equal(backbone.stem[0].weight, model.stem[0].weight)


@pytest.mark.parametrize(
    "spec, upto, tap",
    [
        ("timm/resnetblur50", "layer2", "layer2"),  # a blur filter in a buffer no state dict holds
        ("torchvision/regnet_x_400mf", "trunk_output", "stem"),  # widths computed from tensors (.tolist())
    ],
)
def test_featx_build_from_a_weights_file_builds_the_model_once(
    tmp_path, capsys, backbone_calls, spec, upto, tap
):
    """What the constructor computes is made for real and only the parameters wait on the meta device,
    so these models are not built a second time for real (and the file is read once)."""
    model, path = _seeded_weights(tmp_path, spec)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {spec}\nweights: {path}\nupto: {upto}\noutputs: [{tap}]\nverify: {{input_shape: [1, 3, 64, 64]}}\n"
    )
    assert main(["build", str(config), "--json"]) == 0
    assert backbone_calls == ["build", "load"]
    (output,) = json.loads(capsys.readouterr().out)["outputs"]
    assert output["name"] == tap
    backbone = featx.build_backbone(config)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = IntermediateLayerGetter(model.eval(), {tap: "out"})(x)["out"]
        assert torch.equal(backbone(x)[tap], expected)


def test_relative_weights_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    model, path = _seeded_weights(tmp_path, "torchvision/resnet18")
    config = tmp_path / "c.yaml"
    config.write_text(f"model: torchvision/resnet18\nweights: {path.name}\nupto: layer1\noutputs: [layer1]\n")
    monkeypatch.chdir("/")
    backbone = featx.build_backbone(config)
    assert torch.equal(backbone.conv1.weight, model.conv1.weight)


def test_cli_verify_config_uses_the_configs_modes_and_tolerances(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        "model: torchvision/resnet18\nupto: layer1\noutputs: [layer1]\n"
        "verify: {input_shape: [2, 3, 32, 32], modes: [eval], atol: 0.5}\n"
    )
    assert main(["verify", str(config), "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["modes"]) == ["eval"]


def test_config_weights_prefix_without_its_trailing_dot(tmp_path):
    model, path = _seeded_weights(tmp_path, "torchvision/resnet18", prefix="backbone.body.")
    backbone = featx.build_backbone(
        _config(
            model="torchvision/resnet18",
            weights=str(path),
            weights_prefix="backbone.body",
            upto="layer1",
            outputs=["layer1"],
        )
    )
    assert torch.equal(backbone.layer1[0].conv1.weight, model.layer1[0].conv1.weight)


def test_resolve_is_the_plan_build_backbone_and_featx_build_read(tmp_path, capsys):
    config = {
        "model": "torchvision/resnet18",
        "upto": "layer3",
        "outputs": {"C3": "layer2", "C4": "layer3"},
        "freeze": "layer1",
        "verify": {"input_shape": [1, 3, 64, 64]},
    }
    plan = featx.resolve(config)
    assert (plan.cut.upto, plan.kept, plan.frozen) == (
        "layer3",
        7,
        ("conv1", "bn1", "relu", "maxpool", "layer1"),
    )
    assert dict(plan.taps) == {"layer2": ("C3",), "layer3": ("C4",)}
    assert [c.upto for c in plan.cuts] == ["layer2", "layer3"]
    assert plan.features == (
        featx.Feature("C3", "layer2", 128, 8, (1, 128, 8, 8)),
        featx.Feature("C4", "layer3", 256, 16, (1, 256, 4, 4)),
    )
    assert plan.build() is plan.build()  # made once, from the plan's own model
    assert plan.build().layer2 is plan.model.layer2
    path = tmp_path / "r18.yaml"
    path.write_text(json.dumps(config))
    assert main(["build", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {**featx.resolve(path).to_dict(), "config": str(path)}


@pytest.mark.parametrize(
    "fpn, maps",
    [
        (None, [("C4", 256, 16), ("C3", 128, 8)]),  # the config's order
        (
            {"out_channels": 32},
            [("0", 32, 8), ("1", 32, 16), ("pool", 32, 32)],
        ),  # the pyramid's, as torchvision
    ],
)
def test_a_plans_maps_are_what_its_backbone_returns_in_order(fpn, maps):
    """``plan.maps``: what an export names its outputs by, read from the plan instead of the module."""
    config = {
        "model": "torchvision/resnet18",
        "upto": "layer3",
        "outputs": {"C4": "layer3", "C3": "layer2"},  # not the children's order
        "fpn": fpn,
        "verify": {"input_shape": [1, 3, 64, 64]},
    }
    plan = featx.resolve(config)
    assert list(plan.maps) == maps
    assert plan.input_shape == (1, 3, 64, 64)
    with torch.no_grad():
        returned = plan.build()(torch.randn(1, 3, 64, 64))
    assert sorted((name, out.shape[1]) for name, out in returned.items()) == sorted(
        (n, c) for n, c, _ in maps
    )


def test_a_plans_tensors_are_the_weights_file_its_config_rebuilds_from(tmp_path):
    config = {
        "model": "torchvision/resnet18",
        "upto": "layer2",
        "outputs": ["layer1", "layer2"],
        "fpn": {"out_channels": 16},
        "verify": {"input_shape": [1, 3, 64, 64]},
    }
    plan = featx.resolve(config)
    assert not plan.fpn_loaded  # no weights file: the FPN's own init
    tensors = plan.tensors()
    assert {key.split(".")[0] for key in tensors} == {"conv1", "bn1", "layer1", "layer2", "fpn"}
    path = tmp_path / "backbone.safetensors"
    save_file(tensors, str(path))
    again = featx.resolve({**config, "weights": str(path)})
    assert again.fpn_loaded
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(
            torch.equal(a, b)
            for a, b in zip(plan.build()(x).values(), again.build()(x).values(), strict=True)
        )


def test_weights_given_to_resolve_are_the_plans_weights_fpn_included(tmp_path):
    config = {
        "model": "torchvision/resnet18",
        "upto": "layer2",
        "outputs": ["layer1", "layer2"],
        "fpn": {"out_channels": 16},
        "verify": {"input_shape": [1, 3, 64, 64]},
    }
    path = tmp_path / "backbone.safetensors"
    save_file(featx.resolve(config).tensors(), str(path))
    overridden = featx.resolve(config, weights=str(path))  # a shipped config, one's own weights
    assert overridden.config.weights == str(path)
    assert overridden.fpn_loaded and overridden.fpn == "loaded"
    built = featx.build_backbone(config, weights=str(path))
    assert torch.equal(
        built.fpn.inner_blocks[0][0].weight, load_file(str(path))["fpn.inner_blocks.0.0.weight"]
    )


# -- strides are exact and outputs are NCHW maps (issue 23 §6, §7) -------------------------------------
R18_FPN = {
    "model": "torchvision/resnet18",
    "upto": "layer4",
    "outputs": ["layer1", "layer2", "layer3", "layer4"],
    "fpn": {"out_channels": 16},
}


def test_an_input_that_is_not_a_multiple_of_the_largest_stride_is_refused_naming_sizes_that_are():
    # at 100 px a rounded ratio made strides 4/8/14/25 and anchors 32/64/112/200/400
    with pytest.raises(FeatxError) as raised:
        featx.build_backbone({**R18_FPN, "verify": {"input_shape": [1, 3, 100, 100]}})
    assert str(raised.value) == (
        "<dict>: input 100x100 (`verify.input_shape` [1, 3, 100, 100]) is not a multiple of 32, the largest "
        "stride (output `layer4`): its maps would not line up with the input; use 96x96 or 128x128"
    )


def test_a_stride_that_is_not_a_power_of_two_is_refused():
    with pytest.raises(FeatxError) as raised:
        featx.build_backbone(
            {"model": "tests.layout_models:StrideThree", "upto": "act", "outputs": ["act"],
             "verify": {"input_shape": [1, 3, 96, 96]}}
        )  # fmt: skip
    assert str(raised.value) == (
        "<dict>: output `act` is not reduced by one power-of-two stride: its H x W is 32x32 at input 96x96 "
        "and 74x117 at 224x352; featx taps maps at a stride of 1, 2, 4, ... in both H and W"
    )


def test_a_stride_above_128_is_measured_exactly():
    backbone = featx.build_backbone(
        {"model": "tests.layout_models:Stride256", "upto": "act", "outputs": ["act"],
         "verify": {"input_shape": [1, 3, 512, 512]}}
    )  # fmt: skip
    assert backbone.strides == {"act": 256}


def test_tokens_of_a_model_that_declares_no_token_grid_are_refused_naming_their_layout():
    with pytest.raises(FeatxError) as raised:
        featx.build_backbone(
            {"model": "tests.layout_models:Tokens", "upto": "tokens", "outputs": {"C2": "tokens"},
             "verify": {"input_shape": [1, 3, 64, 64]}}
        )  # fmt: skip
    assert str(raised.value) == (
        "<dict>: output `C2` (`tokens`) is tokens (B, N, C) [1, 256, 8] at input 64x64, not an NCHW map "
        "(B, C, H, W); featx makes tokens of a ViT or Swin (timm) into NCHW maps, and cannot convert these "
        "tokens: tap a module that returns an NCHW map"
    )


def test_a_channels_last_map_measured_at_two_sizes_is_permuted_to_nchw():
    backbone = featx.build_backbone(
        {"model": "tests.layout_models:ChannelsLast", "upto": "nhwc", "outputs": {"C2": "nhwc"},
         "verify": {"input_shape": [1, 3, 64, 64]}}
    )  # fmt: skip
    x = torch.randn(1, 3, 64, 96)
    assert torch.equal(backbone(x)["C2"], backbone.stem(x))
    assert (backbone.channels, backbone.strides) == ({"C2": 8}, {"C2": 4})


def test_a_vit_block_cut_without_keep_glue_is_refused_naming_the_lost_glue():
    config = {
        "model": "timm/vit_tiny_patch16_224",
        "model_kwargs": {"img_size": 64},
        "upto": "blocks.1",
        "outputs": ["blocks.1"],
        "verify": {"input_shape": [1, 3, 64, 64]},
    }
    with pytest.raises(FeatxError) as raised:
        featx.build_backbone(config)
    assert str(raised.value) == (
        "<dict>: output `blocks.1` (`blocks.1`) is tokens [1, 16, 192], which `VisionTransformer`'s own "
        "forward makes with glue a plain cut loses (the class token, the position embedding); set "
        "`keep_glue: true` (or pass --keep-glue)"
    )


# -- a detector checkpoint's FPN is found where each ecosystem stores it (issue 23 §6) -----------------
def _detector(tmp_path: Path, layout: str) -> tuple[Path, dict, object]:
    """A resnet18 FPN backbone as torchvision builds it (seeded; the FPN's biases made non-zero so its init
    cannot pass for it), saved in a detector checkpoint's key layout; the config that reads it; the FPN."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    made = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    with torch.no_grad():
        for param in made.fpn.parameters():
            param.uniform_(-0.1, 0.1)
    body = made.body.state_dict()
    fpn = made.fpn.state_dict()
    if layout == "torchvision":  # fasterrcnn_resnet50_fpn().state_dict(): backbone.body.*, backbone.fpn.*
        state = {f"backbone.{k}": v for k, v in made.state_dict().items()}
        prefix = "backbone.body"
    elif layout == "mmdetection":  # backbone.*, neck.lateral_convs.N.conv.*, neck.fpn_convs.N.conv.*
        state = {f"backbone.{k}": v for k, v in body.items()}
        for key, value in fpn.items():
            blocks, i, _, tensor = key.split(".")
            kind = "lateral_convs" if blocks == "inner_blocks" else "fpn_convs"
            state[f"neck.{kind}.{i}.conv.{tensor}"] = value
        prefix = "backbone."
    else:  # detectron2: backbone.bottom_up.*, backbone.fpn_lateral{2..5}.*, backbone.fpn_output{2..5}.*
        state = {f"backbone.bottom_up.{k}": v for k, v in body.items()}
        for key, value in fpn.items():
            blocks, i, _, tensor = key.split(".")
            kind = "fpn_lateral" if blocks == "inner_blocks" else "fpn_output"
            state[f"backbone.{kind}{int(i) + 2}.{tensor}"] = value
        prefix = "backbone.bottom_up."
    path = tmp_path / f"{layout}.pth"
    torch.save({"state_dict": state}, path)
    config = {**R18_FPN, "fpn": {"out_channels": 256}, "norm": "frozen", "weights": str(path),
              "weights_prefix": prefix, "verify": {"input_shape": [1, 3, 64, 64]}}  # fmt: skip
    return path, config, made


@pytest.mark.parametrize("layout", ["torchvision", "mmdetection", "detectron2"])
def test_a_detector_checkpoints_fpn_is_loaded_and_the_backbone_is_torchvisions(tmp_path, layout):
    _, config, made = _detector(tmp_path, layout)
    plan = featx.resolve(config)
    assert plan.fpn == "loaded"
    backbone = plan.build()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = backbone(x), made.eval()(x)
    assert list(ours) == list(theirs) == ["0", "1", "2", "3", "pool"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_an_fpn_with_more_levels_than_taps_is_refused_naming_the_extra_keys(tmp_path):
    _, config, _ = _detector(tmp_path, "mmdetection")
    with pytest.raises(FeatxError) as raised:
        featx.build_backbone({**config, "outputs": ["layer2", "layer3", "layer4"]})
    assert str(raised.value) == (
        "<dict>: key `weights` (its `neck.lateral_convs.*` keys, for `fpn`): torchvision's FeaturePyramidNetwork "
        "over 3 taps has no place for `neck.fpn_convs.3.conv.bias`, `neck.fpn_convs.3.conv.weight`, "
        "`neck.lateral_convs.3.conv.bias`, `neck.lateral_convs.3.conv.weight` (more levels, extra convs or "
        "norms); tap as many levels as the file's FPN has, or set `strict: false` to leave those out"
    )


def test_an_fpn_without_a_level_the_taps_need_names_the_missing_keys(tmp_path):
    path, config, _ = _detector(tmp_path, "detectron2")
    state = torch.load(path)["state_dict"]
    torch.save({k: v for k, v in state.items() if not k.startswith("backbone.fpn_output5.")}, path)
    with pytest.raises(FeatxError) as raised:
        featx.build_backbone(config)
    assert str(raised.value) == (
        "<dict>: key `weights` (its `backbone.fpn_lateral*` keys, for `fpn`): the file has no "
        "`backbone.fpn_output5.weight`, `backbone.fpn_output5.bias`, which torchvision's "
        "FeaturePyramidNetwork over 4 taps needs"
    )


def test_a_backbone_checkpoint_without_an_fpn_warns_and_build_shows_fpn_random_once(tmp_path, capsys):
    _, path = _seeded_weights(tmp_path, "torchvision/resnet18")
    config = tmp_path / "c.yaml"
    config.write_text(
        json.dumps({**R18_FPN, "weights": str(path), "verify": {"input_shape": [1, 3, 64, 64]}})
    )
    looked = "`fpn.*`, `neck.lateral_convs.*`, `fpn_lateral*`"
    with pytest.warns(featx.errors.FeatxWarning) as warned:
        plan = featx.resolve(config)
        assert plan.fpn == "random" and not plan.fpn_loaded
    assert [str(w.message) for w in warned] == [
        f"{config}: the FPN stays at random init: `{path}` holds no FPN tensors; looked for {looked}"
    ]
    assert main(["build", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == f"fpn: random (`{path}` holds no FPN tensors; looked for {looked})"
    assert err == ""  # the line says it; a warning too would say it twice
    assert main(["build", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fpn"] == "random"


def test_featx_build_and_check_show_a_loaded_fpn(tmp_path, capsys):
    path, config, _ = _detector(tmp_path, "torchvision")
    file = tmp_path / "det.yaml"
    file.write_text(json.dumps(config))
    assert main(["build", str(file)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == f"fpn: loaded (from `backbone.fpn.*` in `{path}`)" and err == ""
    assert main(["check", str(file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["configs"][0]["fpn"] == "loaded"
    assert main(["check", str(file)]) == 0
    header, row = capsys.readouterr().out.splitlines()[3:5]
    assert header.split()[-1] == "fpn" and row.split()[-1] == "loaded"


def test_a_layout_a_model_of_one_input_size_leaves_ambiguous_is_refused():
    with pytest.raises(FeatxError) as raised:
        featx.build_backbone(
            {"model": "tests.layout_models:FixedSize", "upto": "stem", "outputs": ["stem"],
             "verify": {"input_shape": [1, 3, 32, 32]}}
        )  # fmt: skip
    assert str(raised.value) == (
        "<dict>: output `stem` has shape [1, 8, 8, 8] at input 32x32, and featx cannot tell its layout and "
        "stride: the backbone does not run at a second input size (160x288: ValueError: input size (160, 288) "
        "doesn't match the model's (32, 32)) and both NCHW and NHWC divide the input by one power-of-two "
        "stride; let the model run at another input size (timm: `strict_img_size: false`) so featx can "
        "measure it"
    )


# -- taps are what their module returns ---------------------------------------------------------------
def _module_outputs(model: torch.nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each named module returns (its last call) in a full forward of ``model`` in eval: a plain
    forward hook that clones the value as the module returns it, before anything later can change it."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda module, args, out, name=name: seen.__setitem__(name, out.clone())
        )
        for name in names
    ]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _differing_taps(config: dict) -> dict[str, float]:
    """The taps of the backbone ``config`` builds that differ from their module's own output in the full
    model, with their max abs difference (empty: every tap is its module's value)."""
    plan = featx.resolve({**config, "norm": "eval", "fpn": None})  # the backbone runs the model's own modules
    body = body_of(plan.build())
    x = torch.randn(plan.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        taps = body(x)
    reference = _module_outputs(plan.model, list(plan.taps), x)
    return {
        output: (taps[output] - reference[child]).abs().max().item()
        for output, child in plan.outputs
        if not torch.equal(taps[output], reference[child])
    }


@pytest.mark.parametrize("keep_glue", [False, True], ids=["sequential", "keep_glue"])
@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_tap_of_a_shipped_config_is_its_modules_own_output(name, keep_glue):
    import yaml

    config = yaml.safe_load((CONFIGS / name).read_text())
    config = {**config, "keep_glue": keep_glue, "verify": {"input_shape": [1, 3, 64, 64]}}
    assert _differing_taps(config) == {}


MULTI_TAP = [
    # torchvision's `relu` (ReLU(inplace=True)) writes over what `bn1` returned
    _config(
        model="torchvision/resnet18", upto="layer1", outputs=["conv1", "bn1", "relu", "maxpool", "layer1"]
    ),
    # a tap inside a block, then its in-place activation (Hardswish(inplace=True))
    _config(
        model="torchvision/mobilenet_v3_small",
        upto="features.1",
        outputs=["features.0.0", "features.0.1", "features.0", "features.1"],
    ),
    # timm's act1 is in place too, and the tap at bn1 is read after layer1 has run
    _config(model="timm/resnet18", upto="layer2", outputs=["bn1", "layer1", "layer2"]),
]


@pytest.mark.parametrize("keep_glue", [False, True], ids=["sequential", "keep_glue"])
@pytest.mark.parametrize("config", MULTI_TAP, ids=["resnet18_stem", "mobilenet_block", "timm_resnet18"])
def test_a_tap_followed_by_an_in_place_module_is_what_its_module_returned(config, keep_glue):
    assert _differing_taps({**config, "keep_glue": keep_glue}) == {}


RESIDUAL_AFTER_LAST = {
    "model": "tests.toy_models:ResidualAfterLast",
    "upto": "head",
    "outputs": ["stem", "head"],
    "keep_glue": True,
    "verify": {"input_shape": [2, 3, 8, 8]},
}


def test_a_keep_glue_tap_at_the_last_child_is_what_the_child_returns_not_the_models_output():
    torch.manual_seed(0)
    plan = featx.resolve(RESIDUAL_AFTER_LAST)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        taps = plan.build()(x)
        output = plan.model(x)
    reference = _module_outputs(plan.model, ["stem", "head"], x)
    assert torch.equal(taps["head"], reference["head"])
    assert torch.equal(taps["stem"], reference["stem"])
    assert not torch.equal(taps["head"], output)


def test_truncate_at_the_last_child_with_keep_glue_still_returns_the_models_output():
    torch.manual_seed(0)
    model = featx.load_model("tests.toy_models:ResidualAfterLast").eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(featx.truncate(model, "head", keep_glue=True)(x), model(x))


def test_verify_cuts_compares_a_tap_at_the_last_child_with_what_the_child_returns():
    from featx.verification import verify_cuts

    torch.manual_seed(0)
    model = featx.load_model("tests.toy_models:ResidualAfterLast")
    x = torch.randn(2, 3, 8, 8)
    (report,) = verify_cuts(model, ["head"], x, keep_glue=True, model_output=False)
    assert report.faithful
    assert {m: r.max_abs_diff for m, r in report.modes.items()} == {"eval": 0.0, "train": 0.0}


# -- a plain backbone runs a container's children one after the other: only where its forward does that --
def test_a_plain_backbone_with_a_tap_inside_a_residual_block_refuses_naming_the_block():
    config = _config(model="torchvision/resnet18", upto="layer2", outputs=["layer1.0.conv2", "layer2"])
    with pytest.raises(FeatxError) as err:
        featx.build_backbone(config)
    assert re.fullmatch(
        r"<dict>: key `outputs.layer1.0.conv2`: `layer1.0.conv2` is inside `layer1.0` \(BasicBlock\), whose "
        r"children the plain backbone runs one after the other, but its forward applies `add` "
        r"\(torchvision/models/resnet.py:\d+\); tap `layer1.0` or set `keep_glue: true`",
        str(err.value),
    )


def test_the_same_taps_with_keep_glue_are_their_modules_own_outputs():
    config = _config(model="torchvision/resnet18", upto="layer2", outputs=["layer1.0.conv2", "layer2"])
    assert _differing_taps({**config, "keep_glue": True}) == {}


def test_a_cut_inside_a_residual_block_before_its_add_builds_and_is_exact():
    config = _config(model="torchvision/resnet18", upto="layer1.0.conv2", outputs=["layer1.0.conv2"])
    assert _differing_taps(config) == {}


@pytest.mark.parametrize(
    ("how", "why", "below"),
    [
        ("swapped", "calls `pair.b` (toy_models.py:{line}) where the chain runs `pair.a`", 1),
        ("parallel", "calls `pair.b` (toy_models.py:{line}) with other than what `pair.a` returns", 2),
    ],
    ids=["swapped", "parallel"],
)
def test_a_container_whose_forward_is_not_its_children_in_order_is_refused_with_the_call(how, why, below):
    config = _config(model="tests.toy_models:HoldsPair", model_kwargs={"how": how}, upto="head")
    config = {**config, "outputs": ["pair.a", "head"], "verify": {"input_shape": [1, 3, 4, 4]}}
    with pytest.raises(FeatxError) as err:
        featx.build_backbone(config)
    lines = Path(toy_models.__file__).read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.strip().startswith(f'if self.how == "{how}"'))
    assert f"but its forward {why.format(line=line + below)};" in str(err.value)


def test_a_container_whose_forward_keeps_state_is_refused_naming_the_write_without_offering_keep_glue():
    config = _config(model="tests.toy_models:HoldsPair", model_kwargs={"how": "counts"}, upto="head")
    config = {**config, "outputs": ["pair.a", "head"], "verify": {"input_shape": [1, 3, 4, 4]}}
    with pytest.raises(FeatxError) as err:
        featx.build_backbone(config)
    lines = Path(toy_models.__file__).read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.strip() == "self.calls += 1  # sets")
    assert str(err.value) == (
        "<dict>: key `outputs.pair.a`: `pair.a` is inside `pair` (_Pair), whose children the plain backbone "
        f"runs one after the other, but its forward sets `calls` (toy_models.py:{line}), which running "
        "its children one by one skips; tap `pair`"
    )


def test_a_container_whose_forward_is_its_children_in_order_builds_and_is_exact():
    config = _config(model="tests.toy_models:HoldsPair", upto="head", outputs=["pair.a", "pair", "head"])
    assert _differing_taps({**config, "verify": {"input_shape": [1, 3, 4, 4]}}) == {}


def test_a_cut_alone_inside_a_container_that_is_no_chain_is_refused_naming_upto():
    config = _config(model="tests.toy_models:HoldsPair", model_kwargs={"how": "swapped"}, upto="pair.a")
    config = {**config, "outputs": ["stem"], "verify": {"input_shape": [1, 3, 4, 4]}}
    with pytest.raises(FeatxError, match=r"^<dict>: key `upto`: the cut `pair.a` is inside `pair` \(_Pair\), .*"
                       r"; cut at `pair` or set `keep_glue: true`$"):  # fmt: skip
        featx.build_backbone(config)


@pytest.fixture
def upto_resolutions(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Each ``upto`` that ``featx.cut.resolve_path`` resolves, from here to the end of the test, whichever
    featx module calls it."""
    import sys

    import featx.cut

    seen: list[object] = []
    real = featx.cut.resolve_path

    def counted(model: torch.nn.Module, upto: str | int, **kwargs: object) -> object:
        seen.append(upto)
        return real(model, upto, **kwargs)

    for name, module in list(sys.modules.items()):
        if (name == "featx" or name.startswith("featx.")) and getattr(module, "resolve_path", None) is real:
            monkeypatch.setattr(module, "resolve_path", counted)
    return seen


@pytest.mark.parametrize("keep_glue", [False, True], ids=["sequential", "keep_glue"])
def test_a_build_resolves_its_cut_once(upto_resolutions, keep_glue):
    featx.build_backbone(
        {
            "model": "torchvision/resnet18",
            "upto": "layer3",
            "outputs": ["layer1", "layer2"],
            "freeze": "layer1",
            "keep_glue": keep_glue,
            "verify": {"input_shape": [1, 3, 32, 32]},
        }
    )
    assert upto_resolutions.count("layer3") == 1


def test_a_plan_of_another_cut_resolves_it_once(upto_resolutions):
    config = {"model": "torchvision/resnet18", "upto": "layer3", "outputs": ["layer1", "layer3"]}
    plan = featx.resolve(config, upto="layer2")  # `featx verify CONFIG --upto layer2`
    assert (plan.cut.upto, plan.kept) == ("layer2", 6)
    assert upto_resolutions.count("layer2") == 1


def test_a_plan_holds_each_tap_once_as_a_value_and_measures_it_when_built():
    plan = featx.resolve(
        {
            "model": "torchvision/resnet18",
            "upto": "layer3",
            "outputs": {"C4": "layer3", "C3": "layer2", "C3b": "layer2"},
            "verify": {"input_shape": [1, 3, 64, 64]},
        }
    )
    assert plan.tapped == (
        featx.Feature("C4", "layer3"),
        featx.Feature("C3", "layer2"),
        featx.Feature("C3b", "layer2"),
    )
    assert not plan.tapped[0].measured and plan.tapped[0].to_dict() == {
        "name": "C4", "child": "layer3", "channels": None, "stride": None, "shape": None
    }  # fmt: skip
    assert plan.outputs == (("C4", "layer3"), ("C3", "layer2"), ("C3b", "layer2"))
    assert dict(plan.taps) == {"layer3": ("C4",), "layer2": ("C3", "C3b")}
    assert plan.features[0] == plan.tapped[0].measure(256, 16, [1, 256, 4, 4])


def test_a_plans_runner_returns_vit_tokens_where_the_build_returns_their_map():
    plan = featx.resolve(
        {
            "model": "timm/vit_tiny_patch16_224",
            "model_kwargs": {"depth": 2},
            "upto": "blocks",
            "keep_glue": True,
            "verify": {"input_shape": [1, 3, 224, 224]},
        }
    )
    x = torch.randn(1, 3, 224, 224)
    tokens = plan.runner()(x)["blocks"]
    assert list(tokens.shape) == [1, 197, 192]
    assert torch.equal(plan.build()(x)["blocks"], tokens[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2))


def test_build_backbone_without_weights_is_seeded_and_leaves_the_callers_rng_alone():
    config = {"model": "torchvision/resnet18", "upto": "layer2", "verify": {"input_shape": [1, 3, 64, 64]}}
    before = torch.random.get_rng_state()
    first, again = featx.build_backbone(config), featx.build_backbone(config)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(0)  # what load_model(seed=0) builds: the seed, then the constructor
    expected = torchvision.models.resnet18().layer2[0].conv1.weight
    assert torch.equal(first.layer2[0].conv1.weight, expected)
    assert torch.equal(again.layer2[0].conv1.weight, expected)
    other = featx.build_backbone(config, seed=1)
    assert not torch.equal(other.layer2[0].conv1.weight, expected)


def test_a_plans_repr_is_one_short_line():
    plan = featx.resolve(
        {"model": "torchvision/resnet18", "upto": "layer3", "outputs": {"C3": "layer2", "C4": "layer3"}}
    )
    assert repr(plan) == (
        "BackbonePlan(model='torchvision/resnet18', cut='layer3', taps={'C3': 'layer2', 'C4': 'layer3'}, "
        "weights='random init')"
    )


def test_a_config_reads_1e_minus_5_as_the_number_it_means(tmp_path):
    """PyYAML's YAML 1.1 reads `1e-5` (no dot) as a string; featx reads configs as YAML 1.2 does."""
    path = tmp_path / "c.yaml"
    path.write_text("model: torchvision/resnet18\nupto: layer2\nverify: {atol: 1e-5, rtol: 5E-3}\n")
    verify = featx.config.load_config(path).verify
    assert (verify.atol, verify.rtol) == (1e-5, 5e-3)


def test_a_model_kwarg_reads_1e_minus_1_as_a_number():
    from featx.cli.flags import kwarg

    assert kwarg("drop_rate=1e-1") == ("drop_rate", 0.1)
    assert kwarg("name=e5") == ("name", "e5")
