"""The two forum threads featx began from, with their exact numbers."""

from __future__ import annotations

import linecache

import torch

import featx
from examples.seed_resnet import resnet18 as seed_resnet18
from examples.seed_toy import ResN


def test_seed_toy_full_model_gives_8_and_the_sequential_gives_3():
    model = ResN()
    x = torch.ones(5, 5)
    assert torch.equal(model(x), torch.full((5, 5), 8.0))
    assert torch.equal(featx.truncate(model, "blk")(x), torch.full((5, 5), 3.0))


def test_seed_toy_is_not_faithful_with_the_add_before_blk_lost(untouched):
    model = ResN()
    with untouched(model):
        report = featx.verify(model, "blk", torch.ones(5, 5))
    assert not report.faithful
    assert [(g.op, g.after, g.before, g.status(report.kept)) for g in report.anatomy.glue] == [
        ("add", None, "blk", "lost")
    ]
    assert {m: r.max_abs_diff for m, r in report.modes.items()} == {"eval": 5.0, "train": 5.0}
    assert report.reasons[0].startswith("glue `add` (examples/seed_toy.py:")
    assert report.reasons[0].endswith("runs before `blk` in the full model and is lost")


def test_seed_toy_glue_source_is_the_line_with_plus_5():
    report = featx.verify(ResN(), "blk", torch.ones(5, 5))
    path, line = report.anatomy.glue[0].source.rsplit(":", 1)
    assert linecache.getline(path, int(line)).strip() == "return x + 5"


def test_seed_toy_sweep_derives_the_same_verdict():
    sweep = featx.sweep(ResN(), torch.ones(5, 5))
    (cut,) = sweep.cuts
    assert not cut.faithful
    assert [g.op for g in cut.lost_glue] == ["add"]
    assert {m: r.max_abs_diff for m, r in cut.modes.items()} == {"eval": 5.0, "train": 5.0}


def test_seed_resnet18_is_faithful_through_avgpool_and_loses_view_at_fc(untouched):
    torch.manual_seed(0)
    model = seed_resnet18()
    x = torch.randn(2, 1, 224, 224)
    with untouched(model):
        sweep = featx.sweep(model, x)
    verdicts = {c.upto: c.faithful for c in sweep.cuts}
    assert verdicts == {name: name != "fc" for name, _ in model.named_children()}
    fc = sweep.cuts[-1]
    assert [(g.op, g.after, g.before) for g in fc.lost_glue] == [("view", "avgpool", "fc")]
    assert all("mat1 and mat2 shapes cannot be multiplied" in r.error for r in fc.modes.values())
    for cut in sweep.cuts[:-1]:
        assert all(r.max_abs_diff == 0.0 and r.equal for r in cut.modes.values())


def test_seed_resnet18_residuals_live_in_its_eight_basic_blocks():
    torch.manual_seed(0)
    anatomy = featx.verify(seed_resnet18(), "layer4", torch.randn(2, 1, 224, 224)).anatomy
    assert [r.module for r in anatomy.residuals] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert [r.shortcut for r in anatomy.residuals].count("projection") == 3
    assert all(r.status(8) == "kept" for r in anatomy.residuals)
