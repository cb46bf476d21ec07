"""keep_glue cuts and taps inside residual blocks: every module whose value the graph up to it computes.

The value at ``layer1.0.conv2`` needs only the path to it; the residual add after it is dead code for that
cut. References are computed here, not through featx: forward hooks on the full model, and torchvision's
``create_feature_extractor`` on the same seeded weights (one extractor per node: with several nodes in one
graph, a later in-place ReLU writes over an earlier node's value).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
import yaml
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import featx
from featx import FeatxError
from featx.checks import check_config
from featx.glue import trace_root


def _model(spec: str) -> nn.Module:
    torch.manual_seed(0)
    source, name = spec.split("/", 1)
    if source == "torchvision":
        return getattr(torchvision.models, name)(weights=None).eval()
    return timm.create_model(name, pretrained=False).eval()


def _hooked(model: nn.Module, name: str, x: torch.Tensor, mode: str) -> torch.Tensor:
    """What module ``name`` returns in a full forward of a copy of ``model`` in ``mode`` under seed 0."""
    model = copy.deepcopy(model).train(mode == "train")
    seen: list[torch.Tensor] = []
    model.get_submodule(name).register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    torch.manual_seed(0)
    with torch.no_grad():
        model(x)
    (value,) = seen
    return value


def _extracted(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return create_feature_extractor(model, return_nodes=[name])(x)[name]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_cut_at_conv2_of_a_basic_block_is_what_conv2_returns_in_the_full_forward(mode):
    model, x = _model("torchvision/resnet18"), torch.randn(2, 3, 64, 64)
    cut = featx.truncate(copy.deepcopy(model), "layer1.0.conv2", keep_glue=True).train(mode == "train")
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(cut(x), _hooked(model, "layer1.0.conv2", x, mode))


def test_verify_calls_a_keep_glue_cut_at_a_bottlenecks_downsample_faithful():
    model = _model("torchvision/resnet50")
    report = featx.verify(model, "layer1.0.downsample", torch.randn(1, 3, 32, 32), keep_glue=True)
    assert report.faithful, report.reasons
    assert set(report.modes) == {"eval", "train"}


def test_the_plain_cut_at_a_bottlenecks_downsample_is_not_faithful_and_says_what_it_feeds_it():
    # plain: the Sequential of the block's children feeds `downsample` what `relu` returns, not the input
    report = featx.verify(_model("torchvision/resnet50"), "layer1.0.downsample", torch.randn(1, 3, 32, 32))
    assert not report.faithful
    assert any(
        "child `layer1.0.downsample` is not called right after `layer1.0.relu` returned" in r
        for r in report.reasons
    )


SAMPLES = {
    "torchvision/resnet18": ["layer1.0.conv2", "layer1.0.bn2", "layer2.0.downsample.0", "layer3.1.bn1"],
    "torchvision/resnet50": ["layer1.0.downsample", "layer1.0.conv3", "layer2.1.bn2"],
    "torchvision/mobilenet_v3_small": [
        "features.2.block.0",
        "features.4.block.2",  # the SE block inside an InvertedResidual, whose add reads its input
        "features.5.block.1",
        "features.9.block.3",
    ],
    "timm/resnet18d": ["layer1.0.conv2", "layer2.0.downsample.1", "layer3.0.act1"],
    "timm/convnext_atto": [
        "stages.1.blocks.0.conv_dw",
        "stages.2.blocks.1.mlp.fc1",
        "stages.3.blocks.0.norm",
    ],
}


@pytest.mark.parametrize("spec", list(SAMPLES))
def test_keep_glue_cuts_inside_blocks_are_bit_equal_to_create_feature_extractor(spec):
    model, x = _model(spec), torch.randn(1, 3, 64, 64)
    traced = trace_root(model)
    with torch.no_grad():
        for name in SAMPLES[spec]:
            assert torch.equal(traced.cut(name)(x), _extracted(model, name, x)), name


@pytest.mark.parametrize("spec", ["torchvision/resnet50", "timm/convnext_atto"])
def test_keep_glue_taps_inside_blocks_are_bit_equal_to_create_feature_extractor(spec):
    model, x = _model(spec), torch.randn(1, 3, 64, 64)
    *taps, cut = SAMPLES[spec]
    with torch.no_grad():
        values = trace_root(model).cut(cut, taps=taps)(x)
        assert list(values) == [*taps, cut]
        for name in [*taps, cut]:
            assert torch.equal(values[name], _extracted(model, name, x)), name


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_cut_inside_a_squeeze_excitation_is_what_the_module_returns_in_the_full_forward(mode):
    # torchvision's extractor keeps SqueezeExcitation whole (a torchvision.ops leaf): hooks are the reference
    model, x = _model("torchvision/mobilenet_v3_small"), torch.randn(2, 3, 64, 64)
    name = "features.4.block.2.fc1"  # SE's forward multiplies its input by the scale after `fc1`
    cut = featx.truncate(copy.deepcopy(model), name, keep_glue=True).train(mode == "train")
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(cut(x), _hooked(model, name, x, mode))


def test_a_module_a_block_calls_twice_has_no_one_value_and_is_refused_naming_both_calls():
    model = _model("torchvision/resnet18")  # BasicBlock: `relu` after bn1, and again after the add
    with pytest.raises(FeatxError) as raised:
        featx.truncate(model, "layer1.0.relu", keep_glue=True)
    message = str(raised.value)
    assert message.startswith(
        "keep_glue: in eval mode the forward of `BasicBlock` (`layer1.0`) calls `layer1.0.relu` 2 times ("
    )
    assert message.count("torchvision/models/resnet.py:") == 2
    assert message.endswith(
        "so it has no one value; cut or tap a module called once (such as `layer1.0`), or without keep_glue"
    )


def test_a_tap_on_a_module_a_block_calls_twice_is_refused_too():
    with pytest.raises(FeatxError, match=r"calls `layer1\.0\.relu` 2 times"):
        trace_root(_model("torchvision/resnet18")).cut("layer2", taps=["layer1.0.relu"])


def test_modules_a_block_registers_after_the_cut_but_runs_before_it_are_kept():
    # Bottleneck registers `relu` after `bn3`, and calls it after `bn1` and `bn2`
    model, x = _model("torchvision/resnet50"), torch.randn(1, 3, 64, 64)
    cut = featx.truncate(model, "layer1.0.conv2", keep_glue=True)
    assert "layer1.0.relu.inplace" not in cut.state_dict()  # no state; the module itself is held
    assert cut.get_submodule("layer1.0.relu") is model.layer1[0].relu
    with torch.no_grad():
        assert torch.equal(cut(x), _extracted(model, "layer1.0.conv2", x))


class _ActFirst(nn.Module):
    """Registers the in-place ``act`` before ``lin``, and calls it after: a tap on ``act`` runs past ``lin``."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.act(self.lin(x))


def test_the_cut_keeps_its_value_when_a_tap_made_later_writes_to_it_in_place():
    torch.manual_seed(0)
    model, x = _ActFirst().eval(), torch.randn(8, 4)
    with torch.no_grad():
        values = trace_root(model).cut("lin", taps=["act"], model_output=False)(x)
        assert torch.equal(values["lin"], model.lin(x))
        assert bool((values["lin"] < 0).any())  # what the in-place ReLU would have zeroed
        assert torch.equal(values["act"], model(x))


def _config(tmp_path, model: str, upto: str, outputs: list[str]):
    path = tmp_path / "inside.yaml"
    text = {"model": model, "upto": upto, "keep_glue": True, "outputs": outputs}
    path.write_text(yaml.safe_dump({**text, "verify": {"input_shape": [2, 3, 32, 32]}}))
    return path


def test_a_config_tapping_inside_blocks_builds_and_check_proves_it(tmp_path):
    outputs = ["layer1.0.conv2", "layer2.0.downsample", "layer4"]
    path = _config(tmp_path, "torchvision/resnet18", "layer4", outputs)
    backbone = featx.build_backbone(path)
    model, x = _model("torchvision/resnet18"), torch.randn(1, 3, 64, 64)
    backbone.load_state_dict(model.state_dict(), strict=False)
    backbone.eval()
    with torch.no_grad():
        values = backbone(x)
        assert list(values) == outputs
        for name in outputs:
            assert torch.equal(values[name], _extracted(model, name, x)), name
    assert check_config(path).to_dict()["outcome"] == "faithful"


def test_a_config_cut_inside_a_block_is_proved_by_check(tmp_path):
    outputs = ["layer1.0.conv2", "layer1.2.bn3", "layer2.0.downsample"]
    path = _config(tmp_path, "torchvision/resnet50", "layer2.0.downsample", outputs)
    assert check_config(path).to_dict()["outcome"] == "faithful"


SWEPT = ["torchvision/resnet18", "torchvision/resnet50", "torchvision/mobilenet_v3_small", "timm/resnet18d"]


@pytest.mark.slow
@pytest.mark.parametrize("spec", SWEPT)
def test_every_module_node_keep_glue_accepts_is_bit_equal_to_create_feature_extractor(spec):
    """Every module torchvision names a node of, cut alone; only modules called more than once refused."""
    model, x = _model(spec), torch.randn(1, 3, 64, 64)
    traced = trace_root(model)
    _, nodes = get_graph_node_names(model)
    called_again = {n.rsplit("_", 1)[0] for n in nodes if n.rsplit("_", 1)[-1].isdigit()}
    for name, _ in model.named_modules():
        if name not in nodes:
            continue
        try:
            cut = traced.cut(name, model_output=False)
        except FeatxError as err:
            assert name in called_again, str(err)
            continue
        with torch.no_grad():
            assert torch.equal(cut(x), _extracted(model, name, x)), name
