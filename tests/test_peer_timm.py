"""timm's own tests of its extractors (``tests/test_models.py``), ported to featx's equivalents.

timm holds ``forward_features``, ``forward_intermediates``, ``features_only`` and an fx-traced copy of each
model to the model's own values, forward and backward. featx is held to the same on the same weights:
``featx.truncate(model, cut, keep_glue=True)`` at the end of ``forward_features`` is ``forward_features``; at
the last child it is the model, its gradients the model's; a keep_glue backbone tapping the modules of
``feature_info`` gives ``forward_intermediates`` and ``features_only``. Each module is tested as a user
holds it: built from the model as it is (no ``.train()``/``.eval()`` after), called on an input it was not
built with, twice.

The default run takes a handful of small models; the ``zoo`` marker runs every root-child cut of one small
model of every timm module (``tests/zoo_models.py::TIMM_SMALL``) in both modes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

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
)
from tests.zoo_models import MIN_SIZE, TIMM_SKIPPED, TIMM_SMALL

RESNET18_DROP = Peer("timm/resnet18", kwargs=(("drop_rate", 0.5),))
VIT_TINY = Peer("timm/vit_tiny_patch16_224", kwargs=(("img_size", 64),))
PEERS = [
    RESNET18_DROP,
    Peer("timm/convnext_atto"),
    Peer("timm/regnetx_002"),
    Peer("timm/efficientnet_b0"),
    Peer("timm/mobilenetv3_small_050"),
    VIT_TINY,
]
CNNS = [p for p in PEERS if p is not VIT_TINY]


def _ids(peers: list[Peer]) -> list[str]:
    return [p.id for p in peers]


def _last_child(model: nn.Module) -> str:
    return [name for name, _ in model.named_children()][-1]


def _forward_features_end(model: nn.Module, x: torch.Tensor) -> str:
    """The last child of the root that ``forward_features`` calls: where its value is made."""
    called: list[str] = []
    handles = [
        child.register_forward_hook(lambda *_, name=name: called.append(name))
        for name, child in model.named_children()
    ]
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        for handle in handles:
            handle.remove()
    return called[-1]


def _twice(module: nn.Module, x: torch.Tensor, seed: int = 0) -> list[object]:
    outputs = []
    for _ in range(2):
        torch.manual_seed(seed)
        outputs.append(module(x))
    return outputs


@pytest.mark.parametrize("peer", PEERS, ids=_ids(PEERS))
def test_keep_glue_at_the_end_of_forward_features_is_forward_features(peer):
    model = peer.build().eval()
    reference = reference_copy(model)
    cut = _forward_features_end(model, peer.input())
    module = featx.truncate(model, cut, keep_glue=True)
    x = peer.input(seed=1)  # not the input featx saw
    with torch.no_grad():
        expected = reference.forward_features(x)
        for out in _twice(module, x):
            assert differences(out, expected) == []


@pytest.mark.parametrize(
    "peer",
    PEERS,
    ids=_ids(PEERS),
)
def test_keep_glue_at_the_last_child_of_an_eval_model_is_the_model(peer):
    model = peer.build().eval()
    reference = reference_copy(model)
    module = featx.truncate(model, _last_child(model), keep_glue=True)
    x = peer.input(seed=1)
    with torch.inference_mode():
        expected = reference(x)
        for out in _twice(module, x):
            assert differences(out, expected) == []


@pytest.mark.parametrize("peer", PEERS, ids=_ids(PEERS))
def test_keep_glue_at_the_last_child_of_a_train_model_has_the_model_values_and_gradients(peer):
    model = peer.build().train()
    reference = reference_copy(model)
    module = featx.truncate(model, _last_child(model), keep_glue=True)
    x = peer.input(seed=1)
    torch.manual_seed(0)
    expected = reference(x)
    mean_of(expected).backward()
    torch.manual_seed(0)
    out = module(x)
    mean_of(out).backward()
    assert differences(out, expected) == []
    ours, theirs = gradients(module), gradients(reference)
    assert sorted(ours) == sorted(theirs) == sorted(n for n, _ in reference.named_parameters())
    assert [n for n in theirs if not torch.equal(ours[n], theirs[n])] == []


def _weights(tmp_path: Path, model: nn.Module) -> str:
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _feature_modules(model: nn.Module) -> list[str]:
    return [info["module"] for info in model.feature_info]


@pytest.mark.parametrize("peer", CNNS, ids=_ids(CNNS))
def test_keep_glue_taps_at_feature_info_are_forward_intermediates(peer, tmp_path):
    model = peer.build().eval()
    taps = _feature_modules(model)
    backbone = featx.build_backbone(
        {
            "model": peer.spec,
            "model_kwargs": dict(peer.kwargs),
            "weights": _weights(tmp_path, model),
            "upto": taps[-1],
            "outputs": taps,
            "keep_glue": True,
        }
    )
    x = peer.input(seed=1)
    with torch.no_grad():
        expected = model.forward_intermediates(x, output_fmt="NCHW", intermediates_only=True)
        for out in _twice(backbone, x):
            assert list(out) == taps
            assert differences(list(out.values()), expected) == []


@pytest.mark.parametrize("peer", CNNS, ids=_ids(CNNS))
def test_keep_glue_taps_at_feature_info_are_features_only(peer, tmp_path):
    model = peer.build().eval()
    taps = _feature_modules(model)
    weights = _weights(tmp_path, model)
    # timm loads the same file into its features_only model (its own key filter, no hub)
    features = timm.create_model(
        peer.id,
        features_only=True,
        pretrained=True,
        pretrained_cfg_overlay={"file": weights},
        **dict(peer.kwargs),
    ).eval()
    backbone = featx.build_backbone(
        {"model": peer.spec, "weights": weights, "upto": taps[-1], "outputs": taps}
        | {"model_kwargs": dict(peer.kwargs), "keep_glue": True}
    )
    x = peer.input(seed=1)
    with torch.no_grad():
        expected = features(x)
        out = backbone(x)
    assert differences(list(out.values()), list(expected)) == []
    assert list(backbone.out_channels.values()) == features.feature_info.channels()
    assert list(backbone.strides.values()) == features.feature_info.reduction()


def test_keep_glue_vit_blocks_are_forward_intermediates_with_the_prefix_tokens():
    model = VIT_TINY.build().eval()
    x = VIT_TINY.input(seed=1)
    with torch.no_grad():
        expected = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        for i in (0, 5, 11):
            module = featx.truncate(model, f"blocks.{i}", keep_glue=True)
            for out in _twice(module, x):
                assert differences(out[:, model.num_prefix_tokens :], expected[i]) == []


# -- the zoo: every root-child cut of one small model of every timm module -----------------------------------
ZOO = [
    Peer(f"timm/{name}", size=MIN_SIZE.get(f"timm/{name}", 64))
    for module, name in sorted(TIMM_SMALL.items())
    if module not in TIMM_SKIPPED and MIN_SIZE.get(f"timm/{name}", 64) <= 256
]


@pytest.mark.zoo
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("peer", ZOO, ids=[p.id for p in ZOO])
def test_zoo_every_keep_glue_cut_is_the_model_value_at_the_cut_or_refused(peer, mode):
    cut = traced_once(trace_root, featx.FeatxError)  # what truncate(..., keep_glue=True) runs
    assert every_root_cut_differences(peer, mode, cut, featx.FeatxError) == []
