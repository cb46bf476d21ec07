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
import featx.glue_state
import featx.guard
import featx.record
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


class Counted(nn.Linear):
    """A child that counts its calls."""

    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


class WritesWhatItIsFed(nn.Module):
    """A child that writes in place into what it is fed, which the root reads again after it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.stem(x)
        z = self.act(y)
        return self.head(z + y)  # y is relu(y) by now


class ReturnsWhatItIsFed(nn.Module):
    """A child that returns what it is fed; the root writes into that in place and reads the input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.same = nn.Identity()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.stem(x)
        z = self.same(y)
        z.mul_(2.0)
        return self.head(z + y)  # y is z by now


class Steps(nn.Module):
    """Scales by a buffer it advances in place on every call."""

    def __init__(self, steps: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("steps", steps)

    def forward(self, x):
        self.steps.add_(1.0)
        return x * self.steps


class SharesABuffer(nn.Module):
    """Two children hold one buffer: the second, fed what the glue makes, reads what the first's call
    left in it."""

    def __init__(self) -> None:
        super().__init__()
        steps = torch.ones(1)
        self.a = nn.Sequential(nn.Linear(4, 4), Steps(steps))
        self.b = Steps(steps)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.b(self.a(x) + 1.0))


class ReadsAChildsBuffer(nn.Module):
    """The root reads the buffer a child advances, after the child."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.steps = Steps(torch.ones(1))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.steps(self.stem(x)) * self.steps.steps)


class CallsInsideAChildAgain(nn.Module):
    """The root calls a module inside a child again after the child."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        x = self.a(x)
        return self.b(self.a[1](x) * 2.0)


REUSE = {
    "writes_what_it_is_fed": WritesWhatItIsFed,
    "returns_what_it_is_fed": ReturnsWhatItIsFed,
    "shares_a_buffer": SharesABuffer,
    "reads_a_childs_buffer": ReadsAChildsBuffer,
    "calls_inside_a_child_again": CallsInsideAChildAgain,
}


@pytest.mark.parametrize("name", list(REUSE))
def test_a_recorded_call_is_reused_only_where_it_is_what_the_cut_runs(name):
    """What a cut's own module computes (verify_cuts runs each) is what the sweep says, where a call it
    makes writes what it is fed, returns it, shares state with a later call, or is called into again."""
    model = _seeded(REUSE[name])
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    swept = [c for c in featx.sweep(model, x, depth=2, keep_glue=True).cuts if c.refused is None]
    cuts = [c.upto for c in swept]
    reports = featx.verification.verify_cuts(model, cuts, x, keep_glue=True, dependence=False)
    assert [c.to_dict()["modes"] for c in swept] == [r.to_dict()["modes"] for r in reports]
    assert len(swept) >= 2 and all(c.faithful for c in swept)


def test_a_keep_glue_sweep_runs_the_children_only_in_the_recorded_forwards():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Counted(4, 4), nn.Sequential(Counted(4, 4), nn.Linear(4, 2)))
    Counted.calls = 0
    swept = featx.sweep(model, torch.randn(3, 4), depth=2, keep_glue=True)
    assert all(c.faithful for c in swept.cuts)
    # two Counted, each once per recorded forward: eval and train, on the example input and the fresh one
    assert Counted.calls == 2 * 4


def test_a_call_inside_a_reused_child_makes_the_run_start_over(monkeypatch):
    runs: list[bool] = []
    run_once = featx.glue_proof._run_once

    def counted(*args):
        runs.append(args[-1] is not None)
        return run_once(*args)

    monkeypatch.setattr(featx.glue_proof, "_run_once", counted)
    featx.sweep(_seeded(CallsInsideAChildAgain), torch.randn(3, 4), keep_glue=True)
    assert runs == [True, False] * 4  # each mode and input: with reuse, then without


def test_a_recording_with_effects_says_which_calls_had_none_but_their_output():
    model = _seeded(WritesWhatItIsFed)
    with featx.guard.preserved(model) as snapshot:
        rec = featx.record.record(model, torch.randn(3, 4), ["eval"], 0, snapshot, effects=True)["eval"]
        plain = featx.record.record(model, torch.randn(3, 4), ["eval"], 0, snapshot)["eval"]
    assert {u.name: u.contained for u in rec.units} == {"stem": True, "act": False, "head": True}
    assert not any(u.contained for u in plain.units)
    model = _seeded(ReadsALevelPutBack)
    with featx.guard.preserved(model) as snapshot:
        rec = featx.record.record(model, torch.randn(3, 4), ["eval"], 0, snapshot, effects=True)["eval"]
    assert {u.name: u.contained for u in rec.units} == {"a": False, "b": False, "c": True}


def test_a_keep_glue_sweep_watches_module_attributes_once_for_all_its_traces(monkeypatch):
    put_on: list[int] = []
    enter = featx.glue_state._Attributes.enter

    def counted(self):
        if not self.users:
            put_on.append(1)
        enter(self)

    monkeypatch.setattr(featx.glue_state._Attributes, "enter", counted)
    featx.sweep(_seeded(torchvision.models.resnet18), torch.randn(2, 3, 64, 64), depth=2, keep_glue=True)
    assert len(put_on) == 1  # not once per trace: the root and layer1..layer4, in each mode
    assert "__getattribute__" not in nn.Module.__dict__ and featx.glue_state._ATTRIBUTES.users == 0


def test_a_keep_glue_sweep_makes_the_code_of_the_modules_it_runs_only(monkeypatch):
    made: list[str] = []
    python_code = torch.fx.Graph.python_code

    def counted(self, *args, **kwargs):
        made.append("code")
        return python_code(self, *args, **kwargs)

    monkeypatch.setattr(torch.fx.Graph, "python_code", counted)
    swept = featx.sweep(
        _seeded(torchvision.models.resnet18), torch.randn(2, 3, 64, 64), depth=2, keep_glue=True
    )
    assert len(swept.cuts) == 18
    assert len(made) == 2 * 5  # the one module that taps every cut: the root and layer1..layer4, per mode
