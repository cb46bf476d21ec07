"""keep_glue: ``featx.truncate(model, upto, keep_glue=True)`` computes what the full model computes at the cut.

References are computed here, not through featx: forward hooks on the full model (or its output) under the
same seed.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import timm
import torch
import torchvision
import yaml
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import featx
import featx.glue
from examples.seed_toy import ResN
from featx import FeatxError
from featx.backbone import GlueBackbone
from featx.cli import main
from featx.config import export_metadata, load_config
from featx.cut import resolve_path
from featx.glue import KeepGlue
from tests.modes import run_as_is, run_in_mode
from tests.toy_models import DataDependent, Looped, Reuse, ScalesByInt, Skip, TrainOnly, WithConstant


def _at(model: nn.Module, name: str, x: torch.Tensor, mode: str, seed: int = 0) -> torch.Tensor:
    """The full model's value at the cut ``name`` (the last call of it or of a module inside it; the model's
    output at the last child), in ``mode`` under ``seed``, on a deep copy so nothing is shared."""
    model = copy.deepcopy(model).train(mode == "train")
    last = name == list(dict(model.named_children()))[-1]
    seen: list[torch.Tensor] = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
        for qual, m in model.named_modules()
        if qual == name or qual.startswith(name + ".")
        if not last
    ]
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model(x)
    for h in handles:
        h.remove()
    return out if last else seen[-1]


# -- the module ----------------------------------------------------------------------------------------
def test_seed_toy_keeps_the_plus_5_at_blk():
    model = ResN()
    x = torch.ones(5, 5)
    assert torch.equal(featx.truncate(model, "blk")(x), torch.full((5, 5), 3.0))
    assert torch.equal(featx.truncate(model, "blk", keep_glue=True)(x), torch.full((5, 5), 8.0))


def test_resnet_through_fc_equals_the_model_output_in_both_modes():
    model = torchvision.models.resnet18()
    x = torch.randn(2, 3, 64, 64)
    keep = featx.truncate(copy.deepcopy(model), "fc", keep_glue=True)
    for mode in ("eval", "train"):
        assert torch.equal(run_in_mode(keep, x, mode), _at(model, "fc", x, mode))


def test_kept_children_are_the_models_own_objects_and_classes():
    model = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
    keep = featx.truncate(model, "layer2", keep_glue=True)
    assert isinstance(keep, KeepGlue)
    assert [name for name, _ in keep.named_children()] == [
        "conv1",
        "bn1",
        "relu",
        "maxpool",
        "layer1",
        "layer2",
    ]
    assert all(getattr(keep, name) is getattr(model, name) for name, _ in keep.named_children())
    assert type(keep.bn1) is FrozenBatchNorm2d


def test_timm_batchnormact_survives():
    model = timm.create_model("efficientnet_b0", drop_rate=0.5)
    keep = featx.truncate(model, "classifier", keep_glue=True)
    assert type(keep.bn2).__name__ == "BatchNormAct2d" and keep.bn2 is model.bn2


def test_vit_glue_parameters_keep_their_state_dict_names():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64)
    keep = featx.truncate(model, "blocks", keep_glue=True)
    full = model.state_dict()
    keys = list(keep.state_dict())
    assert {"cls_token", "pos_embed"} <= set(keys)
    assert set(keys) <= set(full)
    assert all(keep.state_dict()[k] is not None and torch.equal(keep.state_dict()[k], full[k]) for k in keys)
    assert not any(k.startswith(("norm.", "head.")) for k in keys)
    assert keep.cls_token is model.cls_token


def test_state_dict_round_trips():
    model = torchvision.models.resnet18()
    keep = featx.truncate(model, "fc", keep_glue=True)
    assert list(keep.state_dict()) == list(model.state_dict())  # the whole model, through fc
    other = torchvision.models.resnet18()
    keep.load_state_dict(other.state_dict())
    assert torch.equal(model.fc.weight, other.fc.weight)  # loaded into the model's own fc
    assert keep.state_dict().keys() == other.state_dict().keys()


def test_train_and_eval_reach_the_kept_children():
    model = torchvision.models.resnet18().eval()
    keep = featx.truncate(model, "layer1", keep_glue=True)
    keep.train()
    assert model.layer1.training and model.bn1.training
    keep.eval()
    assert not model.layer1.training and not model.bn1.training


def test_train_mode_glue_draws_the_rng_as_the_full_model_does():
    model = timm.create_model("resnet18", drop_rate=0.5)
    x = torch.randn(2, 3, 64, 64)
    keep = featx.truncate(copy.deepcopy(model), "fc", keep_glue=True)
    # before train runs move BN stats
    assert torch.equal(run_in_mode(keep, x, "eval"), _at(model, "fc", x, "eval"))
    train = run_in_mode(keep, x, "train", seed=3)
    assert torch.equal(train, _at(model, "fc", x, "train", seed=3))
    assert not torch.equal(train, run_in_mode(keep, x, "train", seed=4))  # the dropout is live in train mode


def test_glue_behind_self_training_is_chosen_at_call_time():
    model = TrainOnly()
    x = torch.randn(3, 4)
    keep = featx.truncate(model, "b", keep_glue=True)
    assert "dropout" in keep.code["train"] and "dropout" not in keep.code["eval"]
    for mode in ("eval", "train"):
        assert torch.equal(run_in_mode(keep, x, mode, seed=1), _at(model, "b", x, mode, seed=1))


def test_root_calling_its_grandchildren_is_cut_after_the_last_one():
    model = Looped()
    x = torch.randn(3, 4)
    keep = featx.truncate(model, "blocks", keep_glue=True)
    assert keep.cut_at == {"eval": "blocks.2", "train": "blocks.2"}
    expected = (model.stem(x) + model.pos) * 0.75**3
    assert torch.allclose(run_in_mode(keep, x, "eval"), expected)
    assert torch.equal(run_in_mode(keep, x, "eval"), _at(model, "blocks", x, "eval"))


def test_a_tensor_made_in_the_forward_is_a_buffer_without_a_state_dict_key(untouched):
    model = WithConstant()
    x = torch.randn(2, 4)
    before = dict(vars(model))
    with untouched(model):
        keep = featx.truncate(model, "b", keep_glue=True)
    assert vars(model).keys() == before.keys()  # fx's `_tensor_constant0` moved off the model
    assert set(keep.state_dict()) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    assert torch.equal(run_in_mode(keep, x, "eval"), _at(model, "b", x, "eval"))


def test_a_model_without_glue_gives_the_sequentials_values():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    for upto in (1, 2, 3):
        assert torch.equal(featx.truncate(model, upto, keep_glue=True)(x), featx.truncate(model, upto)(x))
    report = featx.verify(model, 3, x, keep_glue=True)
    assert report.faithful and report.anatomy.glue == ()


# -- the mode it comes back in ---------------------------------------------------------------------------
def _as_is(model: nn.Module, name: str, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """What module ``name`` returns (its last call) in a forward of ``model`` as it is, no mode set: a plain
    forward hook, not featx."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    torch.manual_seed(seed)
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[-1]


def test_an_eval_models_cut_runs_the_eval_graph_as_it_comes_back():
    model = timm.create_model("resnet18", drop_rate=0.5, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    keep = featx.truncate(model, "fc", keep_glue=True)  # no .eval() after this
    with torch.no_grad():
        first, second, full = keep(x), keep(x), model(x)
    assert torch.equal(first, second)  # the dropout before fc is off
    assert torch.equal(first, full)


def test_an_eval_models_nested_cut_runs_the_containers_eval_graph():
    model = timm.create_model("efficientnet_b0").eval()
    x = torch.randn(2, 3, 32, 32)
    keep = featx.truncate(model, "bn1.act", keep_glue=True)  # bn1's own forward: BatchNormAct2d, traced
    with torch.no_grad():
        out = keep(x)
    assert torch.equal(out, _as_is(model, "bn1.act", x))  # running statistics, not the batch's


def test_every_module_a_keep_glue_cut_makes_carries_its_sources_flag():
    model = timm.create_model("convnext_atto").eval()
    model.stages.train()  # the container in another mode than the root
    keep = featx.truncate(model, "stages.1", keep_glue=True)
    assert isinstance(keep.stages, KeepGlue)
    assert (keep.training, keep.stages.training) == (False, True)
    assert all(k.training == model.get_submodule(n).training for n, k in keep.named_modules() if n)


@pytest.mark.parametrize(
    "mixed",
    [
        pytest.param(lambda m: (m.eval(), m.layer1.train()), id="eval-model-with-layer1-in-train"),
        pytest.param(lambda m: (m.train(), m.bn1.eval()), id="train-model-with-bn1-in-eval"),
    ],
)
def test_a_mixed_mode_models_cut_stays_mixed(mixed):
    model = timm.create_model("resnet18", drop_rate=0.5, num_classes=10)
    mixed(model)
    flags = {name: m.training for name, m in model.named_modules()}
    x = torch.randn(2, 3, 64, 64)
    reference = run_as_is(copy.deepcopy(model), x, seed=1)
    keep = featx.truncate(model, "fc", keep_glue=True)
    assert {name: m.training for name, m in keep.named_modules()} == flags
    assert torch.equal(run_as_is(keep, x, seed=1), reference)


def test_the_sequential_of_a_nested_cut_carries_its_sources_flags():
    model = torchvision.models.resnet18().eval()
    model.layer2.train()
    sequential = featx.truncate(model, "layer2.0")
    assert (sequential.training, sequential.layer2.training) == (False, True)
    assert all(s.training == model.get_submodule(n).training for n, s in sequential.named_modules() if n)


# -- refusals --------------------------------------------------------------------------------------------
def test_untraceable_root_is_refused_naming_the_line(untouched):
    model = DataDependent()
    with untouched(model), pytest.raises(FeatxError) as raised:
        featx.truncate(model, "a", keep_glue=True)
    message = str(raised.value)
    assert "\n" not in message
    assert "cannot trace the forward of `DataDependent` in eval mode" in message
    assert "toy_models.py:" in message and "(`if x.sum() > 0:`)" in message
    assert "TraceError" in message


def test_a_cut_before_an_output_reading_the_input_again_is_what_the_child_returns():
    model, x = Skip(), torch.randn(2, 4)  # `return self.b(self.a(x)) + x`: the add is dead code at `a`
    with torch.no_grad():
        assert torch.equal(featx.truncate(model, "a", keep_glue=True)(x), model.a(x))
        assert torch.equal(featx.truncate(model, "b", keep_glue=True)(x), model(x))  # the last: the output


def test_a_child_after_the_cut_running_before_it_is_refused():
    with pytest.raises(FeatxError, match=r"calls `b` \(after the cut at `a`\) before the value at the cut"):
        featx.truncate(Reuse(), "a", keep_glue=True)


def test_a_child_the_forward_never_calls_is_refused():
    model = timm.create_model("eva02_tiny_patch14_224", img_size=56)
    with pytest.raises(FeatxError, match="never calls `rope`"):
        featx.truncate(model, "rope", keep_glue=True)


# -- verify, sweep, check, build -------------------------------------------------------------------------
def test_verify_reports_the_glue_as_kept():
    model = torchvision.models.resnet18()
    x = torch.randn(2, 3, 64, 64)
    plain = featx.verify(model, "fc", x).to_dict()
    kept = featx.verify(model, "fc", x, keep_glue=True).to_dict()
    assert [(g["op"], g["status"]) for g in plain["glue"]] == [("flatten", "lost")]
    assert [(g["op"], g["status"]) for g in kept["glue"]] == [("flatten", "kept")]
    assert (plain["faithful"], kept["faithful"], kept["keep_glue"]) == (False, True, True)
    at_layer4 = featx.verify(model, "layer4", x, keep_glue=True).to_dict()
    assert [g["status"] for g in at_layer4["glue"]] == ["dropped"]


def test_verify_keep_glue_catches_a_module_that_differs(monkeypatch):
    """The proof is a real comparison: a keep_glue module whose glue were wrong is reported."""
    model = ResN()
    keep = featx.truncate(model, "blk", keep_glue=True)
    keep._forwards = {m: (lambda self, x: self.blk(x)) for m in ("eval", "train")}  # the +5 left out
    monkeypatch.setattr(featx.glue.RootTrace, "cut", lambda self, path, taps=(), **_: keep)
    report = featx.verify(model, "blk", torch.ones(5, 5), keep_glue=True)
    assert not report.faithful
    assert report.modes["eval"].max_abs_diff == 5.0


# What a child's forward leaves where the root's trace cannot see it write: a module-level table (not an
# attribute), which fx reads once at build time and bakes into the graph.
_LEFT_BEHIND: dict[str, object] = {}


class _NotesSize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x):
        _LEFT_BEHIND["hw"] = tuple(x.shape[-2:])
        return self.conv(x)


class _UpsamplesToTheStemsInput(nn.Module):
    """``F.interpolate(x, size=<what the stem saw>)`` in the root: right only at the build input's size."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _NotesSize()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(nn.functional.interpolate(x, size=_LEFT_BEHIND["hw"]))


class _NotesScale(nn.Linear):
    def forward(self, x):
        _LEFT_BEHIND["scale"] = x.abs().amax()
        return super().forward(x)


class _DividesByTheStemsScale(nn.Module):
    """``x / <a statistic of the input the stem saw>`` in the root: right only on the build input's values."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _NotesScale(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.stem(x) / _LEFT_BEHIND["scale"])


def test_verify_keep_glue_fails_a_module_right_only_at_its_build_inputs_size():
    model, x = _UpsamplesToTheStemsInput(), torch.randn(2, 3, 16, 16)
    model(x)  # tried once, as a user would: the trace reads the size this call left behind
    report = featx.verify(model, "head", x, keep_glue=True)
    assert not report.faithful
    assert report.reasons == tuple(
        f"in {mode} mode, on a fresh input of shape [3, 3, 48, 48] (not the one the module was built with): "
        "output shape [3, 2, 16, 16] differs from the full model's [3, 2, 48, 48] at the cut"
        for mode in ("eval", "train")
    )
    fresh = report.to_dict()["modes"]["eval"]["fresh"]
    assert (fresh["input_shape"], fresh["equal"]) == ([3, 3, 48, 48], False)


def test_verify_keep_glue_fails_a_module_right_only_on_its_build_inputs_values():
    model, x = _DividesByTheStemsScale(), torch.randn(2, 4)
    model(x)
    report = featx.verify(model, "head", x, keep_glue=True)
    assert not report.faithful
    assert all(
        r.failed_fresh and r.fresh_shape == (3, 4) and r.max_abs_diff > 0 for r in report.modes.values()
    )
    assert (
        "in eval mode, on a fresh input of shape [3, 4] (not the one the module was built with): the "
        "truncated output differs from the full model's by up to" in report.reasons[0]
    )


def test_sweep_keep_glue_checks_every_cut_on_a_fresh_input():
    model, x = _UpsamplesToTheStemsInput(), torch.randn(2, 3, 16, 16)
    model(x)
    sweep = featx.sweep(model, x, keep_glue=True)
    assert [(c.upto, c.faithful) for c in sweep.cuts] == [("stem", True), ("head", False)]
    assert sweep.cuts[1].modes["eval"].fresh_shape == (3, 3, 48, 48)


def test_verify_keep_glue_runs_the_module_in_the_mode_it_came_back_in(monkeypatch):
    """An eval model's module that came back in train mode (as before issue 23) is not faithful in eval:
    verify does not switch it to eval before comparing."""
    cut = featx.glue.RootTrace.cut

    def in_train_mode(self, path, taps=(), **options):
        keep = cut(self, path, taps, **options)
        keep.training = True  # the root's flag only, the kept modules as they are
        return keep

    monkeypatch.setattr(featx.glue.RootTrace, "cut", in_train_mode)
    model = timm.create_model("resnet18", drop_rate=0.5, num_classes=10).eval()
    report = featx.verify(model, "fc", torch.randn(2, 3, 64, 64), keep_glue=True)
    assert (report.modes["eval"].ok, report.modes["train"].ok) == (False, True)


@pytest.mark.parametrize(
    ("build", "x", "fresh_shape"),
    [
        (ResN, torch.ones(5, 5), (6, 5)),
        (torchvision.models.resnet18, torch.randn(2, 3, 64, 64), (3, 3, 96, 96)),
        # its position embedding is for 32 px: the full model takes no other size, so only the batch changes
        (
            lambda: timm.create_model("vit_tiny_patch16_224", img_size=32),
            torch.randn(2, 3, 32, 32),
            (3, 3, 32, 32),
        ),
    ],
    ids=["seed-toy", "resnet18", "vit_tiny-32px"],
)
def test_verify_keep_glue_checks_a_faithful_module_on_a_fresh_input_too(build, x, fresh_shape):
    model = build()
    last = list(dict(model.named_children()))[-1]
    report = featx.verify(model, last, x, keep_glue=True)
    assert report.faithful, report.reasons
    assert all(
        r.fresh is not None and r.fresh.ok and r.fresh_shape == fresh_shape for r in report.modes.values()
    )


def _all_faithful(result: featx.Sweep) -> list[str]:
    return [c.upto for c in result.cuts if not c.faithful]


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        (lambda: torchvision.models.resnet50(), (2, 3, 64, 64)),
        pytest.param(lambda: torchvision.models.vgg16(), (2, 3, 64, 64), marks=pytest.mark.slow),
        pytest.param(lambda: torchvision.models.densenet121(), (2, 3, 64, 64), marks=pytest.mark.slow),
        (lambda: timm.create_model("resnet50", drop_rate=0.5), (2, 3, 64, 64)),
        (lambda: timm.create_model("vit_tiny_patch16_224", img_size=64), (2, 3, 64, 64)),
        pytest.param(
            lambda: timm.create_model("vit_tiny_patch16_224"), (2, 3, 224, 224), marks=pytest.mark.slow
        ),
    ],
    ids=[
        "torchvision-resnet50",
        "vgg16",
        "densenet121",
        "timm-resnet50-drop",
        "vit_tiny-64px",
        "vit_tiny_patch16_224",
    ],
)
def test_sweep_with_keep_glue_is_faithful_at_every_cut(build, shape):
    model = build()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    plain = featx.sweep(model, x)
    kept = featx.sweep(model, x, keep_glue=True)
    assert _all_faithful(plain)  # without keep_glue some cut loses glue
    assert _all_faithful(kept) == []
    assert all(not c.lost_glue for c in kept.cuts)
    assert any(c.kept_glue for c in kept.cuts)


@pytest.mark.slow
def test_vit_b_16_is_faithful_at_every_cut_with_keep_glue():
    """Also proves the comparison runs the module as the reference ran: under a torch function mode,
    nn.MultiheadAttention leaves its fused path, which differs from the slow one by ~3e-6 at `encoder`."""
    model = torchvision.models.vit_b_16()
    x = torch.randn(1, 3, 224, 224)
    result = featx.sweep(model, x, keep_glue=True)
    assert [(c.upto, c.faithful) for c in result.cuts] == [
        ("conv_proj", True),
        ("encoder", True),
        ("heads", True),
    ]
    ops = [g.op for g in result.cuts[1].kept_glue]
    assert {"reshape", "permute", "expand", "cat"} <= set(ops)


def test_eva_calls_its_blocks_from_the_root_and_every_called_cut_is_faithful():
    model = timm.create_model("eva02_tiny_patch14_224", img_size=56)
    result = featx.sweep(model, torch.randn(1, 3, 56, 56), keep_glue=True)
    verdicts = {c.upto: c.faithful for c in result.cuts}
    assert verdicts.pop("rope") is False  # never called: refused, not faked
    assert all(verdicts.values()), verdicts
    rope = next(c for c in result.cuts if c.upto == "rope")
    assert rope.refused is not None and "never calls `rope`" in rope.refused
    assert result.to_dict()["cuts"][0]["keep_glue"] is True


def test_cli_verify_keep_glue_exits_0_where_the_sequential_exits_1(capsys):
    argv = ["verify", "torchvision/resnet18", "--upto", "fc", "--input-shape", "2,3,64,64"]
    assert main(argv) == 1
    capsys.readouterr()
    assert main([*argv, "--keep-glue", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["keep_glue"] is True and [g["status"] for g in out["glue"]] == ["kept"]


def test_cli_sweep_keep_glue_shows_the_kept_glue(capsys):
    assert main(["sweep", "torchvision/resnet18", "--input-shape", "2,3,64,64", "--keep-glue"]) == 0
    out = capsys.readouterr().out
    assert "keep_glue" in out.splitlines()[0]
    assert "10 of 10 cuts are faithful" in out
    assert "kept glue" in out


# NCHW maps behind glue that reads the root's own `gain` (a ViT's blocks return tokens, which a backbone
# refuses to measure as maps: issue 23 §7)
GLUE_CONFIG = {
    "model": "tests.layout_models:GlueCNN",
    "upto": "norm",
    "outputs": ["blocks", "norm"],
    "verify": {"input_shape": [2, 3, 64, 64]},
}


def test_check_with_keep_glue_config_is_faithful_where_the_sequential_is_not(tmp_path):
    import yaml

    plain, kept = tmp_path / "plain.yaml", tmp_path / "kept.yaml"
    plain.write_text(yaml.safe_dump(GLUE_CONFIG))
    kept.write_text(yaml.safe_dump({**GLUE_CONFIG, "keep_glue": True}))
    assert [i.outcome for i in featx.check([plain, kept]).items] == ["not_faithful", "faithful"]


def test_keep_glue_backbone_returns_the_full_models_values_at_its_taps():
    torch.manual_seed(0)
    backbone = featx.build_backbone({**GLUE_CONFIG, "keep_glue": True})
    torch.manual_seed(0)
    model = featx.load_model("tests.layout_models:GlueCNN").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = backbone(x)
    assert list(out) == ["blocks", "norm"]
    assert torch.equal(out["blocks"], _at(model, "blocks", x, "eval"))
    assert torch.equal(out["norm"], _at(model, "norm", x, "eval"))
    assert set(backbone.state_dict()) <= set(model.state_dict())
    assert "gain" in backbone.state_dict()
    assert backbone.out_channels == {"blocks": 16, "norm": 16}
    assert backbone.strides == {"blocks": 4, "norm": 4}


def test_keep_glue_backbone_freezes_and_replaces_norms():
    cfg = {
        "model": "torchvision/resnet18",
        "upto": "layer3",
        "outputs": ["layer2", "layer3"],
        "keep_glue": True,
        "norm": "frozen",
        "freeze": "layer1",
        "verify": {"input_shape": [1, 3, 64, 64]},
    }
    torch.manual_seed(0)
    backbone = featx.build_backbone(cfg)
    torch.manual_seed(0)
    plain = featx.build_backbone({**cfg, "keep_glue": False})
    assert type(backbone.bn1) is FrozenBatchNorm2d
    assert not any(p.requires_grad for p in backbone.layer1.parameters())
    backbone.train()
    assert not backbone.layer1.training and backbone.layer2.training
    assert list(backbone.state_dict()) == list(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(
            torch.equal(a, b)
            for a, b in zip(backbone.eval()(x).values(), plain.eval()(x).values(), strict=True)
        )


def test_assert_faithful_takes_keep_glue():
    from featx.testing import assert_faithful

    with pytest.raises(AssertionError, match="glue `add`"):
        assert_faithful(ResN(), "blk", torch.ones(5, 5))
    assert assert_faithful(ResN(), "blk", torch.ones(5, 5), keep_glue=True).keep_glue


def test_one_root_trace_cuts_at_dotted_paths_and_traces_each_container_once():
    model = timm.create_model("convnext_atto")
    traced = featx.glue.trace_root(model)
    first, again = traced.cut("stages.1"), traced.cut(resolve_path(model, "stages.2"))  # a name, or a CutPath
    assert (first.upto, again.upto) == ("stages.1", "stages.2")
    assert sorted({key[:2] for key in traced.containers}) == [("stages", "eval"), ("stages", "train")]
    assert (
        list(again.stages._modules) == ["0", "1", "2"] and again.get_submodule("stages.2") is model.stages[2]
    )
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(run_in_mode(again, x, "eval"), _at(model, "stages.2", x, "eval"))


class CountsByInt(nn.Module):
    """A root forward that calls a builtin on a tensor: fx cannot trace ``int`` of a proxy."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.b(self.a(x) * int(x.abs().sum() > 1))


def scale_of(x):
    """A helper of the model's own code that converts its tensor argument."""
    return float(x.abs().max()) + 1.0


class ScalesByHelper(CountsByInt):
    def forward(self, x):
        y = self.a(x)
        return self.b(y / scale_of(y))


@pytest.mark.parametrize(
    ("model", "function"), [(CountsByInt, "int"), (ScalesByHelper, "scale_of")], ids=["int", "helper"]
)
def test_keep_glue_refuses_a_function_on_a_tensor_naming_it_and_suggesting_leaf_functions(model, function):
    with pytest.raises(FeatxError) as refused:
        featx.truncate(model(), "b", keep_glue=True)
    message = str(refused.value)
    assert "\n" not in message
    assert message.endswith(
        f"; keep `{function}` whole with `truncate(..., keep_glue=True, leaf_functions=({function},))`, or cut "
        "without keep_glue"
    )


@pytest.mark.parametrize(
    ("model", "function"), [(CountsByInt, int), (ScalesByHelper, scale_of)], ids=["int", "helper"]
)
def test_leaf_functions_are_kept_whole_and_the_cut_computes_the_models_value(model, function):
    torch.manual_seed(0)
    full = model().eval()
    kept = featx.truncate(full, "b", keep_glue=True, leaf_functions=(function,))
    x = torch.randn(2, 3)
    assert isinstance(kept, KeepGlue)
    with torch.no_grad():
        assert torch.equal(kept(x), full(x))
    assert f"{function.__name__}(" in kept.code["eval"]


def test_leaf_functions_without_keep_glue_are_refused():
    with pytest.raises(FeatxError, match=r"^leaf_functions are kept whole by keep_glue's trace, and a cut"):
        featx.truncate(CountsByInt(), "b", leaf_functions=(int,))


# --- leaf_functions wherever keep_glue is: verify, sweep, configs (build, check), the command line ----------

SCALES_BY_INT = "tests.toy_models:ScalesByInt"
NOT_TRACED = "keep `int` whole with `truncate(..., keep_glue=True, leaf_functions=(int,))`"


def scales_by_int_config(**keys: object) -> dict[str, object]:
    return {
        "model": SCALES_BY_INT,
        "upto": "b",
        "keep_glue": True,
        "verify": {"input_shape": [2, 3, 8, 8]},
        **keys,
    }


def test_verify_with_keep_glue_refuses_a_root_calling_int_without_leaf_functions():
    with pytest.raises(FeatxError, match=re.escape(NOT_TRACED)):
        featx.verify(ScalesByInt(), "b", keep_glue=True)


def test_verify_with_leaf_functions_keeps_int_whole_and_is_faithful():
    report = featx.verify(ScalesByInt(), "b", keep_glue=True, leaf_functions=(int,))
    assert report.faithful and report.keep_glue


def test_verify_refuses_leaf_functions_without_keep_glue():
    with pytest.raises(FeatxError, match=r"^leaf_functions are kept whole by keep_glue's trace"):
        featx.verify(ScalesByInt(), "b", leaf_functions=(int,))


def test_sweep_with_keep_glue_takes_leaf_functions():
    with pytest.raises(FeatxError, match=re.escape(NOT_TRACED)):
        featx.sweep(ScalesByInt(), keep_glue=True)
    cuts = featx.sweep(ScalesByInt(), keep_glue=True, leaf_functions=[int]).cuts
    assert [(c.upto, c.faithful, c.refused) for c in cuts] == [("a", True, None), ("b", True, None)]


def test_a_config_names_its_leaf_functions_and_builds_with_them():
    with pytest.raises(FeatxError, match=r"^<dict>: key `keep_glue`: .*" + re.escape(NOT_TRACED)):
        featx.build_backbone(scales_by_int_config())
    backbone = featx.build_backbone(scales_by_int_config(leaf_functions=["builtins.int"]))
    model = featx.load_model(SCALES_BY_INT)
    model.load_state_dict(backbone.state_dict(), strict=False)  # same seed, same init: the same weights
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(backbone(x)["b"], model(x))


def test_build_backbone_takes_leaf_functions_in_place_of_the_configs():
    backbone = featx.build_backbone(scales_by_int_config(), leaf_functions=[int])
    assert list(backbone(torch.randn(1, 3, 8, 8))) == ["b"]


def test_a_config_check_proves_a_cut_with_its_leaf_functions(tmp_path):
    from featx.checks import check_config

    refused, kept = tmp_path / "refused.yaml", tmp_path / "kept.yaml"
    refused.write_text(yaml.safe_dump(scales_by_int_config()))
    kept.write_text(yaml.safe_dump(scales_by_int_config(leaf_functions=["int"])))
    without = check_config(refused).to_dict()
    assert without["outcome"] == "error" and NOT_TRACED in str(without["error"])
    assert check_config(kept).to_dict()["outcome"] == "faithful"


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["nosuch.helper"], "cannot import module `nosuch` (ModuleNotFoundError: No module named 'nosuch')"),
        (["math.ciel"], "`math` has no `ciel` (did you mean `ceil`?)"),
        (["math.pi"], "a float, not a function"),
    ],
    ids=["module", "function", "not-callable"],
)
def test_a_config_refuses_a_leaf_function_it_cannot_find_in_one_line(names, message):
    with pytest.raises(FeatxError) as refused:
        load_config(scales_by_int_config(leaf_functions=names))
    assert str(refused.value) == (
        f"<dict>: key `leaf_functions[0]` is `{names[0]}`: {message}; accepted: `module.function` or "
        "`module:function` (a builtin as `int` or `builtins.int`)"
    )


def test_a_config_refuses_leaf_functions_without_keep_glue():
    with pytest.raises(FeatxError) as refused:
        load_config(scales_by_int_config(keep_glue=False, leaf_functions=["int"]))
    assert str(refused.value) == (
        "<dict>: key `leaf_functions` names functions keep_glue's trace keeps whole, and this config does not "
        "keep the glue; set `keep_glue: true` or drop `leaf_functions`"
    )


@pytest.mark.parametrize("verb", ["verify", "sweep"])
def test_the_command_line_takes_leaf_function_with_keep_glue(verb, capsys):
    argv = [verb, SCALES_BY_INT, "--keep-glue", "--mode", "eval", "--json"]
    argv += ["--upto", "b"] if verb == "verify" else []
    assert main(argv) == 2
    assert NOT_TRACED in capsys.readouterr().err
    assert main([*argv, "--leaf-function", "int"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["faithful"] if verb == "verify" else printed["cuts"][-1]["faithful"]


def test_the_command_line_refuses_leaf_function_without_keep_glue(capsys):
    assert main(["verify", SCALES_BY_INT, "--upto", "b", "--leaf-function", "int"]) == 2
    assert capsys.readouterr().err == (
        "featx: error: --leaf-function int names a function keep_glue's trace keeps whole; pass --keep-glue too\n"
    )


def test_the_command_line_refuses_a_leaf_function_it_cannot_find(capsys):
    assert main(["verify", SCALES_BY_INT, "--upto", "b", "--keep-glue", "--leaf-function", "math.ciel"]) == 2
    assert capsys.readouterr().err == (
        "featx: error: --leaf-function is `math.ciel`: `math` has no `ciel` (did you mean `ceil`?); accepted: "
        "`module.function` or `module:function` (a builtin as `int` or `builtins.int`)\n"
    )


def test_build_spec_takes_leaf_function(capsys):
    argv = ["build", SCALES_BY_INT, "--upto", "b", "--keep-glue", "--input-shape", "1,3,8,8", "--json"]
    assert main(argv) == 2
    assert NOT_TRACED in capsys.readouterr().err
    assert main([*argv, "--leaf-function", "int"]) == 0
    assert [o["name"] for o in json.loads(capsys.readouterr().out)["outputs"]] == ["b"]


def test_build_config_adds_leaf_function_to_the_configs_own(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(scales_by_int_config()))
    assert main(["build", str(config)]) == 2
    assert "`int`" in capsys.readouterr().err
    assert main(["build", str(config), "--leaf-function", "int"]) == 0
    assert "(--leaf-function over `leaf_functions`)" in capsys.readouterr().out


def test_build_config_refuses_leaf_function_when_nothing_keeps_the_glue(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(scales_by_int_config(keep_glue=False)))
    assert main(["build", str(config), "--leaf-function", "int"]) == 2
    assert capsys.readouterr().err == (
        "featx: error: --leaf-function builtins:int names a function keep_glue's trace keeps whole, and "
        f"`{config}` does not keep the glue; pass --keep-glue too\n"
    )


def test_an_export_records_its_leaf_functions_by_name_and_rebuilds_with_them(tmp_path, capsys):
    out = tmp_path / "scales.safetensors"
    argv = ["export", SCALES_BY_INT, "--upto", "b", "--keep-glue", "--leaf-function", "int"]
    argv += ["--input-shape", "1,3,8,8", "--random-weights", "--format", "safetensors", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    assert json.loads(export_metadata(out)["config"])["leaf_functions"] == ["builtins:int"]
    assert isinstance(featx.build_backbone(out), GlueBackbone)


def test_extract_takes_leaf_function_with_keep_glue(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "data").mkdir()
    Image.new("RGB", (12, 10), (10, 200, 30)).save(tmp_path / "data" / "one.png")
    argv = ["extract", SCALES_BY_INT, "--data", str(tmp_path / "data"), "--upto", "b", "--keep-glue"]
    argv += ["--random-weights", "--workers", "0", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "refused")]) == 2
    assert NOT_TRACED in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "out"), "--leaf-function", "int"]) == 0
    assert featx.open_features(tmp_path / "out")["one.png"]["b"].shape == (4, 8, 8)


def test_assert_faithful_takes_leaf_functions_with_keep_glue():
    from featx.testing import assert_faithful

    with pytest.raises(FeatxError, match=re.escape(NOT_TRACED)):
        assert_faithful(ScalesByInt(), "b", keep_glue=True)
    assert assert_faithful(ScalesByInt(), "b", keep_glue=True, leaf_functions=(int,)).faithful
