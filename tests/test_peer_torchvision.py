"""torchvision's own tests of its extractor (``test/test_backbone_utils.py``), ported to featx's equivalents.

torchvision holds ``create_feature_extractor`` to: the module it returns keeps the model's train/eval flag and
follows ``.train()``/``.eval()`` (control flow on ``self.training`` included); modules and functions fx cannot
trace are kept whole; forward and backward run with values; and it matches ``IntermediateLayerGetter`` on the
same weights, parameters included. featx is held to the same with ``featx.truncate(model, cut,
keep_glue=True)`` and config backbones (``featx.build_backbone``), against the model itself and against
``create_feature_extractor`` on the same weights, as a user holds the module: built from the model as it is,
no ``.train()``/``.eval()`` after, an input it was not built with, called twice.

The default run takes a handful of small models; the ``zoo`` marker runs every root-child cut of every
torchvision classifier in both modes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.feature_extraction import create_feature_extractor

import featx
from featx.glue import trace_root
from tests.peer_harness import (
    Peer,
    differences,
    every_root_cut_differences,
    gradients,
    mean_of,
    reference_copy,
    traced_once,
    value_at,
)
from tests.zoo_models import MIN_SIZE


class TrainEval(nn.Module):
    """torchvision's ``test_train_eval`` model, with a last child so the glue sits inside the cut, and no
    mean, so every value is a map a backbone can tap: dropout with p=1, then control flow on
    ``self.training`` (in-place ops, as written there). Every element of a value is the same number."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=1.0)
        self.out = nn.Identity()

    def forward(self, x):
        x = self.dropout(x * 1)
        if self.training:
            x += 100
        else:
            x *= 0
        x -= 0
        return self.out(x)


def test_a_keep_glue_module_of_a_train_model_is_in_train_mode_and_follows_eval():
    model = TrainEval().train()
    module = featx.truncate(model, "out", keep_glue=True)
    assert model.training and module.training
    with torch.no_grad():
        assert (
            module(torch.ones(1, 1, 10, 10)).unique().item() == 100
        )  # dropout zeroes, then the train branch adds 100
        module.eval()
        assert (
            module(torch.ones(1, 1, 10, 10)).unique().item() == 0
        )  # dropout is the identity, the eval branch zeroes


def test_a_keep_glue_module_of_an_eval_model_is_in_eval_mode_and_follows_train():
    model = TrainEval().eval()
    module = featx.truncate(model, "out", keep_glue=True)
    assert not model.training
    with torch.no_grad():
        assert module(torch.ones(1, 1, 10, 10)).unique().item() == 0
        assert not module.training
        module.train()
        assert module(torch.ones(1, 1, 10, 10)).unique().item() == 100


def test_keep_glue_taps_follow_train_and_eval_as_torchvision_return_nodes_do():
    backbone = featx.build_backbone(
        {
            "model": "tests.test_peer_torchvision:TrainEval",
            "upto": "out",
            "outputs": ["dropout", "out"],
            "keep_glue": True,
            "verify": {"input_shape": [1, 1, 10, 10]},
        }
    )
    with torch.no_grad():
        assert {k: v.unique().item() for k, v in backbone(torch.ones(1, 1, 10, 10)).items()} == {
            "dropout": 1.0,
            "out": 0.0,
        }
        backbone.train()
        assert {k: v.unique().item() for k, v in backbone(torch.ones(1, 1, 10, 10)).items()} == {
            "dropout": 0.0,
            "out": 100.0,
        }


def leaf_function(x):
    return int(x)


class LeafModule(nn.Module):
    def forward(self, x):
        int(x.shape[0])  # fx cannot trace this: the module must be kept whole
        return torch.nn.functional.relu(x + 4)


class WithLeaves(nn.Module):
    """torchvision's ``test_leaf_module_and_function`` model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3)
        self.leaf_module = LeafModule()

    def forward(self, x):
        leaf_function(x.shape[0])
        x = self.conv(x)
        return self.leaf_module(x)


def test_a_child_fx_cannot_trace_is_kept_whole_with_the_model_values_and_gradients():
    torch.manual_seed(0)
    model = WithLeaves().train()
    reference = reference_copy(model)
    module = featx.truncate(model, "leaf_module")
    x = torch.rand(1, 3, 16, 16)
    out, expected = module(x), reference(x)
    mean_of(out).backward()
    mean_of(expected).backward()
    assert differences(out, expected) == []
    ours, theirs = gradients(module), gradients(reference)
    assert sorted(ours) == sorted(theirs) == ["conv.bias", "conv.weight"]
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)


def test_a_root_function_fx_cannot_trace_is_refused_by_keep_glue_in_one_line_naming_it():
    with pytest.raises(featx.FeatxError) as refused:
        featx.truncate(WithLeaves(), "leaf_module", keep_glue=True)
    message = str(refused.value)
    assert "\n" not in message
    assert "test_peer_torchvision.py:" in message and "(`return int(x)`)" in message
    assert message.endswith("cut without keep_glue")


def test_an_unknown_cut_is_refused_naming_the_children():
    with pytest.raises(featx.FeatxError, match="layer4") as refused:
        featx.truncate(torchvision.models.resnet18(), "layer5", keep_glue=True)
    assert "\n" not in str(refused.value)


# -- small models: the module as a user holds it ---------------------------------------------------------
PEERS = [
    Peer("torchvision/resnet18"),
    Peer("torchvision/mobilenet_v3_small"),
    Peer("torchvision/efficientnet_b0"),
]
CUTS = {  # a mid child, a dotted cut and the last child of each
    "resnet18": ("layer2", "layer3.0", "fc"),
    "mobilenet_v3_small": ("features", "features.4", "classifier"),
    "efficientnet_b0": ("avgpool", "features.3", "classifier"),
}
TAPS = {  # torchvision's detection backbones tap these
    "resnet18": ["layer1", "layer2", "layer3", "layer4"],
    "mobilenet_v3_small": ["features.1", "features.3", "features.8", "features.12"],
    "efficientnet_b0": ["features.2", "features.3", "features.5", "features.8"],
}
CASES = [pytest.param(p, cut, id=f"{p.id}-{cut}") for p in PEERS for cut in CUTS[p.id]]


def _value(expected: dict[str, object], model: nn.Module, cut: str) -> object:
    return expected[""] if cut == [n for n, _ in model.named_children()][-1] else expected[cut]


@pytest.mark.parametrize(("peer", "cut"), CASES)
def test_keep_glue_cut_of_an_eval_model_is_the_model_value_on_a_fresh_input_twice(peer, cut):
    model = peer.build().eval()
    reference = reference_copy(model)
    module = featx.truncate(model, cut, keep_glue=True)
    x = peer.input(seed=1)
    with torch.no_grad():
        expected = _value(value_at(reference, [cut], x), model, cut)
        for _ in range(2):
            assert differences(module(x), expected) == []


@pytest.mark.parametrize(("peer", "cut"), CASES)
def test_keep_glue_cut_of_a_train_model_has_the_model_values_and_gradients(peer, cut):
    model = peer.build().train()
    reference = reference_copy(model)
    module = featx.truncate(model, cut, keep_glue=True)
    x = peer.input(seed=1)
    expected = _value(value_at(reference, [cut], x), model, cut)
    mean_of(expected).backward()
    torch.manual_seed(0)
    out = module(x)
    mean_of(out).backward()
    assert differences(out, expected) == []
    ours, theirs = gradients(module), gradients(reference)
    assert sorted(ours) == sorted(theirs)
    assert [n for n in theirs if not torch.equal(ours[n], theirs[n])] == []


def _weights(tmp_path: Path, model: nn.Module) -> str:
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.mark.parametrize("keep_glue", [False, True], ids=["plain", "keep_glue"])
@pytest.mark.parametrize("peer", PEERS, ids=[p.id for p in PEERS])
def test_backbone_taps_equal_create_feature_extractor_in_eval_and_train_with_gradients(
    peer, keep_glue, tmp_path
):
    model = peer.build().eval()
    taps = TAPS[peer.id]
    extractor = create_feature_extractor(model, {t: t for t in taps})
    backbone = featx.build_backbone(
        {"model": peer.spec, "weights": _weights(tmp_path, model), "upto": taps[-1], "outputs": taps}
        | {"keep_glue": keep_glue}
    )
    x = peer.input(seed=1)
    with torch.no_grad():
        assert differences(dict(backbone(x)), extractor(x)) == []
    extractor.train()
    backbone.train()
    torch.manual_seed(0)
    expected = extractor(x)
    torch.manual_seed(0)
    out = backbone(x)
    assert differences(dict(out), expected) == []
    mean_of(expected).backward()
    mean_of(out).backward()
    ours, theirs = gradients(backbone), gradients(extractor)
    assert sorted(ours) == sorted(theirs)
    # Each tap is a clone of its module's output (so a later in-place op cannot change it): the forward is
    # bit-equal, and the backward adds the same gradients through one more node, which may round the sums
    # in another order (measured: 1e-7 on resnet18's conv1.weight, of 0.13).
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)


@pytest.mark.parametrize("keep_glue", [False, True], ids=["plain", "keep_glue"])
def test_a_tap_followed_by_an_in_place_relu_is_what_its_module_returned(keep_glue, tmp_path):
    model = Peer("torchvision/resnet18").build().eval()
    backbone = featx.build_backbone(
        {"model": "torchvision/resnet18", "weights": _weights(tmp_path, model), "upto": "layer1"}
        | {"outputs": ["bn1", "layer1"], "keep_glue": keep_glue}
    )
    x = Peer("torchvision/resnet18").input(seed=1)
    with torch.no_grad():
        expected = value_at(model, ["bn1", "layer1"], x)
        out = backbone(x)
    assert differences(dict(out), {"bn1": expected["bn1"], "layer1": expected["layer1"]}) == []


def test_resnet18_backbone_has_the_parameters_and_values_of_intermediate_layer_getter(tmp_path):
    model = Peer("torchvision/resnet18").build().eval()
    taps = {"layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "layer4": "layer4"}
    getter = IntermediateLayerGetter(model, taps).eval()
    backbone = featx.build_backbone(
        {"model": "torchvision/resnet18", "weights": _weights(tmp_path, model), "upto": "layer4"}
        | {"outputs": list(taps)}
    )
    ours, theirs = list(backbone.named_parameters()), list(getter.named_parameters())
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ours, theirs, strict=True))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert differences(dict(backbone(x)), dict(getter(x))) == []


def test_a_plain_backbone_scripts_and_gives_the_same_values(tmp_path):
    backbone = featx.build_backbone(
        {"model": "torchvision/resnet18", "upto": "layer4", "outputs": TAPS["resnet18"]}
    )
    scripted = torch.jit.script(backbone)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert differences(dict(scripted(x)), dict(backbone(x))) == []


# -- the zoo: every root-child cut of every torchvision classifier -----------------------------------------
# The two classifiers of over 600M parameters: the model, its reference copy and the guard's snapshots take
# about 10 GB, and two xdist workers holding one each ran out of memory (a worker crashed on vit_h_14).
TOO_BIG = {"vit_h_14", "regnet_y_128gf"}
ZOO = [
    Peer(f"torchvision/{name}", size=MIN_SIZE.get(f"torchvision/{name}", 64))
    for name in torchvision.models.list_models(module=torchvision.models)
    if name not in TOO_BIG
]


@pytest.mark.zoo
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("peer", ZOO, ids=[p.id for p in ZOO])
def test_zoo_every_keep_glue_cut_is_the_model_value_at_the_cut_or_refused(peer, mode):
    cut = traced_once(trace_root, featx.FeatxError)  # what truncate(..., keep_glue=True) runs
    assert every_root_cut_differences(peer, mode, cut, featx.FeatxError) == []
