"""featx on the zoo (marker ``zoo``, not in the default run): ``pytest -m zoo -n auto``.

- The ResNet zoo: every timm model of the ``resnet``, ``resnetv2``, ``resnest``, ``res2net`` and ``sknet``
  modules and the 10 torchvision ResNets, random init (seed 0), batch 2 at 64 px, every cut, eval and
  train. featx.sweep's verdict for each cut and mode must equal the literal answer the test computes
  itself (``tests/zoo_models.py::literal_verdicts``: plain forward hooks and ``nn.Sequential``, no featx).
- Beyond: every torchvision classifier and one small model of every other timm module, at the model's
  smallest working size. featx gives a report or a one-line FeatxError, never another exception, and every
  cut it calls faithful is faithful by the literal harness.
- The known answers, pinned: the flatten before vgg/densenet/mobilenet's classifier, inception_v3's aux
  branch, ViT's class-token concat and position-embedding add.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import featx
from tests.zoo_models import (
    TIMM_SMALL,
    build,
    featx_verdicts,
    literal_verdicts,
    resnet_zoo,
    same,
    torchvision_classifiers,
)

pytestmark = pytest.mark.zoo

# keep_glue (issue 9 §2) lands in featx.sweep separately; its pins switch on when it is there.
KEEP_GLUE = "keep_glue" in inspect.signature(featx.sweep).parameters
needs_keep_glue = pytest.mark.skipif(not KEEP_GLUE, reason="featx.sweep has no keep_glue yet (issue 9 §2)")


@pytest.fixture(autouse=True)
def one_thread_per_worker():
    """Under pytest-xdist every worker is a process: one torch thread each keeps the cores from thrashing."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("spec", resnet_zoo())
def test_resnet_zoo_sweep_verdicts_equal_the_literal_answer(spec):
    built = build(spec)
    sweep = featx.sweep(built.model, built.x)
    names = [name for name, _ in built.model.named_children()]
    assert [c.upto for c in sweep.cuts] == names
    assert featx_verdicts(sweep) == literal_verdicts(built.model, built.x)


@pytest.mark.parametrize("spec", ["torchvision/resnet18", "timm/resnet50d", "torchvision/inception_v3"])
def test_one_sequential_run_gives_the_same_literal_answer_as_one_run_per_cut(spec):
    built = build(spec)
    assert literal_verdicts(built.model, built.x) == literal_verdicts(built.model, built.x, per_cut=True)


# The zoo marker runs a representative subset of "beyond" (one model per torchvision family, the timm
# modules below); benchmarks/zoo.py runs all of it (every torchvision classifier, every timm module).
TORCHVISION_FAMILIES = (
    "alexnet",
    "convnext_tiny",
    "densenet121",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "googlenet",
    "inception_v3",
    "maxvit_t",
    "mnasnet0_5",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
    "swin_t",
    "swin_v2_t",
    "vgg11_bn",
    "vit_b_16",
)
TIMM_MODULES = (
    "byobnet",
    "cait",
    "convnext",
    "cspnet",
    "deit",
    "dla",
    "efficientnet",
    "eva",
    "hrnet",
    "inception_v3",
    "levit",
    "maxxvit",
    "mlp_mixer",
    "mobilenetv3",
    "mobilevit",
    "nfnet",
    "pvt_v2",
    "regnet",
    "rexnet",
    "swin_transformer",
    "vision_transformer",
    "vovnet",
    "xception",
    "xcit",
)
assert set(TORCHVISION_FAMILIES) <= {s.split("/")[1] for s in torchvision_classifiers()}
BEYOND = [f"torchvision/{n}" for n in TORCHVISION_FAMILIES] + [f"timm/{TIMM_SMALL[m]}" for m in TIMM_MODULES]


@pytest.mark.parametrize("spec", BEYOND)
def test_beyond_featx_reports_or_refuses_and_never_calls_a_wrong_cut_faithful(spec):
    built = build(spec)
    try:
        sweep = featx.sweep(built.model, built.x)
    except featx.FeatxError as err:  # a clear refusal: one line saying why
        assert str(err) and "\n" not in str(err)
        return
    claimed = sorted({(c.kept, m) for c in sweep.cuts for m, r in c.modes.items() if r.ok})
    literal = literal_verdicts(built.model, built.x, cuts=sorted({k for k, _ in claimed}))
    wrong = [(sweep.cuts[k - 1].upto, m) for k, m in claimed if not literal[(k, m)]]
    assert not wrong, f"featx calls these cuts faithful, the literal Sequential says not: {wrong}"


def _sweep(spec: str) -> featx.Sweep:
    built = build(spec)
    return featx.sweep(built.model, built.x)


def _lost(sweep: featx.Sweep, upto: str) -> list[str]:
    cut = next(c for c in sweep.cuts if c.upto == upto)
    return [g.op for g in cut.lost_glue]


@pytest.mark.parametrize(
    ("spec", "classifier"),
    [
        ("torchvision/vgg16", "classifier"),
        ("torchvision/densenet121", "classifier"),
        ("torchvision/mobilenet_v2", "classifier"),
        ("torchvision/mobilenet_v3_small", "classifier"),
    ],
)
def test_flatten_before_the_classifier_is_lost_and_every_earlier_cut_is_faithful(spec, classifier):
    sweep = _sweep(spec)
    cut = next(c for c in sweep.cuts if c.upto == classifier)
    assert not cut.faithful
    assert "flatten" in _lost(sweep, classifier)
    flatten = next(g for g in cut.lost_glue if g.op == "flatten")
    assert flatten.before == classifier and flatten.source.startswith("torchvision/models/")
    assert all(c.faithful for c in sweep.cuts if c.kept < cut.kept)


def test_inception_v3_aux_branch_is_never_called_in_eval():
    sweep = _sweep("torchvision/inception_v3")
    aux = next(c for c in sweep.anatomy.children if c.name == "AuxLogits")
    assert aux.calls == {"eval": 0, "train": 1}
    cut = next(c for c in sweep.cuts if c.upto == "AuxLogits")
    assert not cut.modes["eval"].ok
    assert "never calls `AuxLogits`" in cut.modes["eval"].mismatch


def test_torchvision_vit_loses_the_class_token_concat_before_the_encoder():
    sweep = _sweep("torchvision/vit_b_16")
    assert [c.upto for c in sweep.cuts] == ["conv_proj", "encoder", "heads"]
    assert sweep.cuts[0].faithful
    assert not sweep.cuts[1].faithful
    assert "cat" in _lost(sweep, "encoder")


def test_timm_vit_loses_the_class_token_concat_and_position_embedding_add():
    sweep = _sweep("timm/vit_tiny_patch16_224")
    assert sweep.cuts[0].upto == "patch_embed" and sweep.cuts[0].faithful
    lost = _lost(sweep, "pos_drop")
    assert "cat" in lost and "add" in lost
    assert all(not c.faithful for c in sweep.cuts[1:])


@needs_keep_glue
@pytest.mark.parametrize(
    "spec",
    ["torchvision/vgg16", "torchvision/densenet121", "torchvision/vit_b_16", "timm/vit_tiny_patch16_224"],
)
def test_keep_glue_makes_every_cut_faithful(spec):
    built = build(spec)
    sweep = featx.sweep(built.model, built.x, keep_glue=True)
    assert all(c.faithful for c in sweep.cuts), [(c.upto, c.reasons) for c in sweep.cuts if not c.faithful]


def _clone(leaf: Any) -> Any:
    return leaf.detach().clone() if isinstance(leaf, torch.Tensor) else leaf


def _values_at(model: nn.Module, cuts: list[str], x: torch.Tensor) -> dict[str, Any]:
    """The value at each cut in one forward of ``model`` as it is (no mode set): what the cut module (or the
    last module inside it) last returned, the model's output at the last child. Plain hooks, not featx."""
    last = list(dict(model.named_children()))[-1]
    seen: dict[str, Any] = {}
    handles = []
    for cut in cuts:
        for name, module in model.named_modules():
            if cut != last and (name == cut or name.startswith(cut + ".")):
                hook = functools.partial(
                    lambda c, m, args, out: seen.__setitem__(c, pytree.tree_map(_clone, out)), cut
                )
                handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        out = model(x)
    for handle in handles:
        handle.remove()
    return {**seen, last: out} if last in cuts else seen


@needs_keep_glue
@pytest.mark.parametrize(
    "spec",
    [
        "torchvision/vgg16",
        "torchvision/densenet121",
        "torchvision/vit_b_16",
        "timm/vit_tiny_patch16_224",
        "timm/efficientnet_b0",  # F.dropout before the classifier; BatchNormAct2d containers (bn1.act)
        "timm/mobilenetv3_small_100",
    ],
)
def test_an_eval_models_keep_glue_cuts_as_returned_equal_its_values(spec):
    """No ``.eval()`` after ``truncate``: each cut (the root's children and theirs) comes back in the mode
    of the model, and computes the model's value at the cut on the first call and the second."""
    built = build(spec)
    model = built.model.eval()
    names = [name for name, _ in model.named_children()]
    cuts = [f"{c}.{n}" for c in names for n, _ in model.get_submodule(c).named_children()] + names
    kept: dict[str, nn.Module] = {}
    for cut in cuts:
        try:
            kept[cut] = featx.truncate(model, cut, keep_glue=True)
        except featx.FeatxError:  # a cut keep_glue refuses is not this test's business
            continue
    assert names[-1] in kept
    expected = _values_at(model, list(kept), built.x)
    with torch.no_grad():
        wrong = [
            cut
            for cut, keep in kept.items()
            if not (same(keep(built.x), expected[cut]) and same(keep(built.x), expected[cut]))
        ]
    assert wrong == [], f"{len(wrong)} of {len(kept)} cuts differ from the eval model: {wrong[:8]}"
