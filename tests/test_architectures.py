"""Expected verdicts on real torchvision and timm ResNets, every cut, both modes.

The default run uses 64x64 inputs (the verdicts do not depend on resolution); the `slow` run repeats
the torchvision sweep at 224x224 and checks the derived sweep against the literal one cut by cut.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

import featx

TORCHVISION = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]
TIMM_FAITHFUL = [
    "resnetv2_50",
    "resnet50d",
    "seresnext26d_32x4d",
    "resnest14d",
    "res2net50_26w_4s",
    "skresnet18",
    "resnetblur50",
    "resnetrs50",
]


def _blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [
        (f"{layer}.{i}", block)
        for layer in ("layer1", "layer2", "layer3", "layer4")
        for i, block in enumerate(getattr(model, layer))
    ]


def _check_torchvision_sweep(model: torch.nn.Module, sweep: featx.Sweep) -> None:
    names = [name for name, _ in model.named_children()]
    assert [c.upto for c in sweep.cuts] == names
    for cut in sweep.cuts[:-1]:  # every cut through avgpool: faithful and bit-exact
        assert cut.faithful, (cut.upto, cut.reasons)
        assert all(r.max_abs_diff == 0.0 and r.equal for r in cut.modes.values())
    fc = sweep.cuts[-1]
    assert not fc.faithful
    assert [(g.op, g.after, g.before) for g in fc.lost_glue] == [("flatten", "avgpool", "fc")]
    assert all(r.error and r.error.startswith("RuntimeError") for r in fc.modes.values())
    assert fc.reasons[0].startswith("glue `flatten` (torchvision/models/resnet.py:")
    # Residuals: one per block, a projection shortcut exactly where the block has a downsample.
    blocks = _blocks(model)
    residuals = sweep.anatomy.residuals
    assert [r.module for r in residuals] == [name for name, _ in blocks]
    assert {r.module for r in residuals if r.shortcut == "projection"} == {
        name for name, block in blocks if block.downsample is not None
    }
    assert {r.shortcut for r in residuals} <= {"identity", "projection"}
    for kept in range(1, len(names) + 1):
        # a merge is kept exactly when the module performing it is in the truncated model
        modules = dict(featx.truncate(model, kept).named_modules())
        assert [r.status(kept) for r in residuals] == [
            "kept" if r.module in modules else "dropped" for r in residuals
        ]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_resnets_are_faithful_through_avgpool_and_lose_flatten_at_fc(name, untouched):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with untouched(model):
        sweep = featx.sweep(model, x)
    _check_torchvision_sweep(model, sweep)


def test_resnet50_has_16_residual_blocks_and_4_projection_shortcuts():
    anatomy = featx.verify(torchvision.models.resnet50(), "layer4", torch.randn(1, 3, 64, 64)).anatomy
    assert len(anatomy.residuals) == 16
    assert [r.module for r in anatomy.residuals if r.shortcut == "projection"] == [
        "layer1.0",
        "layer2.0",
        "layer3.0",
        "layer4.0",
    ]
    assert [c.residuals for c in anatomy.children] == [0, 0, 0, 0, 3, 4, 6, 3, 0, 0]


def test_verify_at_fc_reports_the_lost_flatten_instead_of_raising(untouched):
    model = torchvision.models.resnet18()
    x = torch.randn(2, 3, 64, 64)
    with untouched(model):
        report = featx.verify(model, "fc", x)
    assert not report.faithful
    assert report.to_dict()["glue"][0]["status"] == "lost"
    assert "mat1 and mat2 shapes cannot be multiplied" in report.modes["eval"].error


def test_timm_resnet50_dropout_glue_is_lost_only_in_train_mode(untouched):
    model = timm.create_model("resnet50", drop_rate=0.5)
    x = torch.randn(2, 3, 64, 64)
    with untouched(model):
        sweep = featx.sweep(model, x)
    assert all(cut.modes["eval"].ok for cut in sweep.cuts)
    assert all(cut.faithful for cut in sweep.cuts[:-1])
    fc = sweep.cuts[-1]
    assert fc.upto == "fc" and not fc.faithful
    assert fc.modes["train"].max_abs_diff > 0
    assert [(g.op, g.after, g.before) for g in fc.lost_glue] == [("dropout", "global_pool", "fc")]
    assert any("glue `dropout`" in r and "is lost" in r for r in fc.reasons)
    report = featx.verify(model, "fc", x)
    assert report.modes["eval"].ok and not report.modes["train"].ok


@pytest.mark.parametrize("name", TIMM_FAITHFUL)
def test_timm_resnet_family_is_faithful_at_every_cut_in_both_modes(name, untouched):
    torch.manual_seed(0)
    model = timm.create_model(name)
    x = torch.randn(2, 3, 64, 64)
    with untouched(model):
        sweep = featx.sweep(model, x)
    assert [c.upto for c in sweep.cuts] == [n for n, _ in model.named_children()]
    for cut in sweep.cuts:
        assert cut.faithful, (cut.upto, cut.reasons)
        assert set(cut.modes) == {"eval", "train"}
    assert sweep.anatomy.glue == ()


def test_timm_resnetv2_counts_preactivation_downsample_as_projection():
    model = timm.create_model("resnetv2_50")
    residuals = featx.sweep(model, torch.randn(1, 3, 64, 64), modes=("eval",)).anatomy.residuals
    blocks = [
        (f"stages.{s}.blocks.{b}", blk)
        for s, stage in enumerate(model.stages)
        for b, blk in enumerate(stage.blocks)
    ]
    assert [r.module for r in residuals] == [name for name, _ in blocks]
    assert {r.module for r in residuals if r.shortcut == "projection"} == {
        name for name, blk in blocks if blk.downsample is not None
    }


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_derived_sweep_matches_literal_sweep(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name)
    x = torch.randn(2, 3, 64, 64)
    derived, literal = featx.sweep(model, x), featx.sweep(model, x, literal=True)
    for d, lit in zip(derived.cuts, literal.cuts, strict=True):
        assert d.faithful == lit.faithful
        assert {m: r.max_abs_diff for m, r in d.modes.items()} == {
            m: r.max_abs_diff for m, r in lit.modes.items()
        }


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_full_resolution_derived_and_literal_sweeps_agree(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(2, 3, 224, 224)
    derived = featx.sweep(model, x)
    _check_torchvision_sweep(model, derived)
    literal = featx.sweep(model, x, literal=True)
    assert [c.faithful for c in literal.cuts] == [c.faithful for c in derived.cuts]
    assert all(r.method == "run" for c in literal.cuts for r in c.modes.values())
