"""A keep_glue sweep traces each root once and runs one module per mode and input for all its cuts, and
its verdicts are those of each cut's own module (``verify_cuts``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from toy_models import GlueBetweenStages, Looped

import featx
import featx.glue
import featx.glue_proof
import featx.verification
from featx.glue import KeepGlue


class DropoutBetweenStages(nn.Module):
    """Root glue that draws random numbers in train mode (``F.dropout``) between two stages, and a stage
    whose first module writes in place into what the stage before it returned."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.stage1 = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8))
        self.stage2 = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stage1(self.stem(x))
        x = F.dropout(x, 0.5, self.training) + 1.0
        x = self.stage2(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class LeavesLevel(nn.Linear):
    def __init__(self) -> None:
        super().__init__(4, 4)
        self.level = 1.0

    def forward(self, x):
        self.level = 2.0  # what the root reads after it: the graph holds 1.0, its value when traced
        return super().forward(x)


class PutsLevelBack(nn.Linear):
    def __init__(self, other: LeavesLevel) -> None:
        super().__init__(4, 4)
        self.other = [other]  # not a submodule

    def forward(self, x):
        self.other[0].level = 1.0
        return super().forward(x)


class ReadsALevelPutBack(nn.Module):
    """The root reads a child's attribute that the child changes and a later child puts back: each cut
    before the later child is refused when its module is called, the last one is not."""

    def __init__(self) -> None:
        super().__init__()
        self.a = LeavesLevel()
        self.b = nn.Linear(4, 4)
        self.c = PutsLevelBack(self.a)

    def forward(self, x):
        x = self.a(x) * self.a.level
        return self.c(self.b(x))


class FrozenNorms(GlueBetweenStages):
    """Overrides ``train()``: its norms stay in eval mode, as mmdetection's ``norm_eval`` does."""

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


def _seeded(make):
    torch.manual_seed(0)
    return make()


MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(), (2, 3, 64, 64)),
    "dropout_between_stages": (DropoutBetweenStages, (2, 3, 32, 32)),
    "glue_between_stages": (GlueBetweenStages, (2, 3, 32, 32)),
    "looped": (Looped, (3, 4)),
    "frozen_norms": (FrozenNorms, (2, 3, 32, 32)),
    "reads_a_level_put_back": (ReadsALevelPutBack, (3, 4)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_keep_glue_sweep_verdicts_equal_each_cuts_own_module(name):
    make, shape = MODELS[name]
    model = _seeded(make)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    swept = featx.sweep(model, x, depth=2, keep_glue=True)
    cuts = [c.upto for c in swept.cuts]
    reports = featx.verification.verify_cuts(model, cuts, x, keep_glue=True, dependence=False)
    for cut, report in zip(swept.cuts, reports, strict=True):
        data, alone = cut.to_dict(), report.to_dict()
        assert (cut.upto, data["modes"], data["faithful"], data["reasons"]) == (
            report.upto,
            alone["modes"],
            alone["faithful"],
            alone["reasons"],
        )


def test_dropout_glue_and_an_in_place_write_after_a_cut_keep_every_cut_faithful():
    model = _seeded(DropoutBetweenStages)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    swept = featx.sweep(model, x, depth=2, keep_glue=True)
    assert [c.upto for c in swept.cuts if not c.faithful] == []
    assert [c.upto for c in featx.sweep(model, x, depth=2).cuts if not c.faithful] == [
        "stage2.0",
        "stage2.1",
        "stage2.2",
        "stage2",
        "head",
    ]


def test_a_keep_glue_sweep_traces_the_root_and_each_container_once_per_mode(monkeypatch):
    traced: list[tuple[str, str]] = []
    trace = featx.glue.trace

    def counted(module, mode, concrete, where, leaves=()):
        traced.append((where, mode))
        return trace(module, mode, concrete, where, leaves)

    monkeypatch.setattr(featx.glue, "trace", counted)
    model = _seeded(torchvision.models.resnet18)
    featx.sweep(model, torch.randn(2, 3, 64, 64), depth=2, keep_glue=True)
    assert sorted(set(traced)) == sorted(traced)  # nothing traced twice
    assert len(traced) == 2 * 5  # eval and train: the root, layer1..layer4


def test_a_keep_glue_sweep_runs_the_model_glue_once_per_mode_and_input_not_once_per_cut(monkeypatch):
    runs: list[str] = []
    forward = KeepGlue.forward

    def counted(self, *args, **kwargs):
        if self.source_class == "torchvision.models.resnet.ResNet":  # the root's graph, not a stage's
            runs.append(self.upto)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(KeepGlue, "forward", counted)
    model = _seeded(torchvision.models.resnet18)
    swept = featx.sweep(model, torch.randn(2, 3, 64, 64), depth=2, keep_glue=True)
    assert len(swept.cuts) == 18 and all(c.faithful for c in swept.cuts)
    assert runs == ["fc"] * 4  # eval and train, on the example input and on the fresh one


def test_a_model_that_overrides_train_has_each_cut_run_by_its_own_module(monkeypatch):
    together: list[object] = []
    all_cuts = featx.glue_proof.all_cuts

    def made(*args):
        together.append(all_cuts(*args))
        return together[-1]

    monkeypatch.setattr(featx.verification, "all_cuts", made)
    model = _seeded(FrozenNorms)
    swept = featx.sweep(model, torch.randn(2, 3, 32, 32), depth=2, keep_glue=True)
    assert together == [None] and len(swept.cuts) == 10


def test_an_attribute_a_child_changes_and_another_puts_back_fails_the_cuts_between():
    model = _seeded(ReadsALevelPutBack)
    swept = featx.sweep(model, torch.randn(3, 4), keep_glue=True)
    errors = {c.upto: c.modes["eval"].error for c in swept.cuts}
    assert [upto for upto, error in errors.items() if error and "reads `a.level`" in error] == ["a", "b"]
    assert errors["c"] is None and not swept.cuts[-1].faithful
