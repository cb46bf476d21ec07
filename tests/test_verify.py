"""verify/sweep on small hand-built models whose truth is known, and the model-left-as-found guarantee."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import featx
import featx.recorder as recorder_module
from examples.seed_toy import ResN
from featx import FeatxError
from featx.report import Cut
from tests.toy_models import Between, Describe, ReturnsPair, Scale


class Block(nn.Module):
    def __init__(self, project: bool = False) -> None:
        super().__init__()
        self.conv = nn.Linear(4, 4)
        self.downsample = nn.Linear(4, 4) if project else None

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv(x)
        out += shortcut
        return out


class TopLevelSkip(nn.Module):
    """The root adds an earlier child's output: a residual no child carries."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 4)

    def forward(self, x):
        x = self.a(x)
        skip = x
        x = self.b(x)
        x = x + skip
        return self.c(x)


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Scale(2.0)
        self.b = Scale(3.0)

    def forward(self, x):
        return self.b(self.a(self.a(x)))


class NeverCalled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Scale(2.0)
        self.unused = Scale(10.0)
        self.b = Scale(3.0)

    def forward(self, x):
        return self.b(self.a(x))


class OutOfOrder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(self.b(x))


class InPlaceInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Scale(2.0)

    def forward(self, x):
        x.mul_(3)
        return self.a(x)


class RootDropout(nn.Module):
    """Glue that draws random numbers: only train mode can tell."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        x = self.a(x)
        x = F.dropout(x, 0.5, self.training)
        x = self.drop(x)
        return self.b(x)


class Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(5, 5)  # wrong width: raises on a's output
        self.c = nn.Linear(5, 5)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


class Interrupts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        x = self.bn(x)
        if self.training:
            raise KeyboardInterrupt
        return self.a(x)


def test_root_level_skip_is_a_lost_residual_and_makes_later_cuts_unfaithful(untouched):
    model = TopLevelSkip()
    x = torch.randn(3, 4)
    with untouched(model):
        sweep = featx.sweep(model, x)
    assert [c.faithful for c in sweep.cuts] == [True, True, False]
    (residual,) = sweep.anatomy.residuals
    assert (residual.module, residual.child, residual.status(3)) == ("", None, "lost")
    assert [(g.op, g.after, g.before) for g in sweep.cuts[2].lost_glue] == [("add", "b", "c")]
    assert [(g.op, g.status(2)) for g in sweep.anatomy.glue] == [("add", "at_cut")]


def test_identity_and_projection_shortcuts_are_told_apart():
    model = nn.Sequential(Block(), Block(project=True))
    anatomy = featx.verify(model, 2, torch.randn(2, 4)).anatomy
    assert [(r.module, r.child, r.shortcut) for r in anatomy.residuals] == [
        ("0", "0", "identity"),
        ("1", "1", "projection"),
    ]


def test_child_called_twice_is_flagged_and_the_cut_through_it_is_unfaithful():
    sweep = featx.sweep(CalledTwice(), torch.ones(2, 2))
    assert sweep.anatomy.children[0].calls == {"eval": 2, "train": 2}
    cut_a, cut_b = sweep.cuts
    assert not cut_a.faithful and cut_a.modes["eval"].max_abs_diff == 2.0  # 2 vs 4
    assert any("called 2 times" in r for r in cut_a.reasons)
    assert not cut_b.faithful and cut_b.modes["eval"].max_abs_diff == 6.0  # 6 vs 12


def test_child_never_called_leaves_no_reference_at_its_cut():
    sweep = featx.sweep(NeverCalled(), torch.ones(2, 2))
    assert sweep.anatomy.children[1].calls == {"eval": 0, "train": 0}
    assert [c.faithful for c in sweep.cuts] == [True, False, False]
    assert "never calls `unused`" in sweep.cuts[1].modes["eval"].mismatch
    assert sweep.cuts[2].modes["eval"].max_abs_diff == 54.0  # sequential: 1*2*10*3 = 60, full: 6


def test_children_called_out_of_registration_order_are_flagged():
    torch.manual_seed(0)
    model = OutOfOrder()
    sweep = featx.sweep(model, torch.randn(2, 4))
    assert "out of registration order" in sweep.anatomy.children[1].feed["eval"]
    literal = featx.sweep(model, torch.randn(2, 4), literal=True)
    assert [c.faithful for c in sweep.cuts] == [c.faithful for c in literal.cuts] == [False, False]


def test_forward_that_mutates_its_input_in_place_does_not_leak_into_other_runs(untouched):
    model = InPlaceInput()
    x = torch.ones(2, 2)
    with untouched(model):
        report = featx.verify(model, "a", x)
    assert torch.equal(x, torch.ones(2, 2))
    assert report.modes["eval"].max_abs_diff == 4.0  # 6 vs 2
    assert [(g.op, g.status(1)) for g in report.anatomy.glue] == [("mul_", "lost")]


def test_random_glue_is_caught_in_train_mode_only(untouched):
    torch.manual_seed(0)
    model = RootDropout()
    x = torch.randn(4, 8)
    with untouched(model):
        sweep = featx.sweep(model, x)
        literal = featx.sweep(model, x, literal=True)
    assert [c.faithful for c in sweep.cuts] == [True, False, False]
    assert [c.faithful for c in literal.cuts] == [True, False, False]
    for derived, run in zip(sweep.cuts, literal.cuts, strict=True):
        assert derived.modes["train"].max_abs_diff == run.modes["train"].max_abs_diff
    assert all(c.modes["eval"].ok for c in sweep.cuts)
    assert [g.op for g in sweep.cuts[1].lost_glue] == ["dropout"]


def test_full_forward_raising_after_the_cut_still_verifies_the_cut(untouched):
    model = Raises()
    x = torch.randn(2, 4)
    with untouched(model):
        report = featx.verify(model, "a", x)
    assert report.faithful
    assert report.anatomy.full_errors["eval"].startswith("RuntimeError")


def test_full_forward_raising_before_the_cut_is_a_clear_error(untouched):
    model = Raises()
    x = torch.randn(2, 4)
    with (
        untouched(model),
        pytest.raises(FeatxError, match="raised in `b` in eval mode before the cut at `c` returned"),
    ):
        featx.verify(model, "c", x)


def test_sweep_reports_cuts_after_a_raising_child_instead_of_crashing():
    sweep = featx.sweep(Raises(), torch.randn(2, 4))
    assert [c.faithful for c in sweep.cuts] == [True, False, False]
    assert sweep.cuts[1].modes["eval"].error.startswith("RuntimeError")
    assert "raised" in sweep.cuts[2].modes["eval"].mismatch


def test_keyboard_interrupt_leaves_the_model_as_found(untouched):
    model = Interrupts()
    model.train()
    with untouched(model), pytest.raises(KeyboardInterrupt):
        featx.verify(model, "a", torch.ones(3, 4), modes=("train",))
    assert model.training


def test_model_in_train_mode_with_bn_keeps_its_running_stats(untouched):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU()).train()
    x = torch.randn(8, 4)
    with untouched(model):
        report = featx.verify(model, -1, x, modes=("train", "eval"))
    assert report.faithful and list(report.modes) == ["train", "eval"]


def test_report_json_has_the_contract_keys():
    report = featx.verify(TopLevelSkip(), "b", torch.randn(2, 4))
    d = report.to_dict()
    for key in (
        "model",
        "model_class",
        "input_shape",
        "upto",
        "kept",
        "children",
        "glue",
        "residuals",
        "modes",
        "faithful",
        "reasons",
    ):
        assert key in d
    assert d["model_class"].endswith("test_verify.TopLevelSkip")
    assert d["input_shape"] == [2, 4]
    assert (d["upto"], d["kept"]) == ("b", 2)
    assert set(d["children"][0]) >= {"index", "name", "type", "kept", "calls"}
    assert set(d["glue"][0]) >= {"op", "source", "after", "before", "modes", "status"}
    assert set(d["residuals"][0]) >= {"module", "child", "shortcut", "status"}
    assert set(d["modes"]["eval"]) >= {"max_abs_diff", "equal", "error"}


def test_human_report_draws_the_cut_and_ends_with_a_verdict():
    text = str(featx.verify(TopLevelSkip(), "b", torch.randn(2, 4)))
    lines = text.splitlines()
    cut = next(i for i, line in enumerate(lines) if "cut: keeps 2 of 3" in line)
    assert lines[cut - 1].startswith("1  b")
    assert lines[cut + 1].split()[:4] == ["↳", "add", "glue,", "at_cut"]
    assert lines[-1].startswith("faithful: the cut at `b`")


def test_tolerances_turn_a_small_difference_into_equal():
    class Nudge(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = Scale(1.0)

        def forward(self, x):
            return self.a(x + 1e-4)

    x = torch.ones(2, 2)
    assert not featx.verify(Nudge(), "a", x).faithful
    assert featx.verify(Nudge(), "a", x, atol=1e-3).faithful


def test_nan_is_never_equal():
    class MakesNaN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = Scale(0.0)

        def forward(self, x):
            return self.a(x)

    report = featx.verify(MakesNaN(), "a", torch.full((2, 2), float("inf")))
    assert not report.faithful
    assert report.modes["eval"].nonfinite == 4
    assert report.modes["eval"].max_abs_diff == 0.0
    assert "4 values at the cut are NaN or infinite" in report.reasons[-1]


def test_bad_modes_are_rejected():
    with pytest.raises(FeatxError, match="`eval`, `train`"):
        featx.verify(TopLevelSkip(), "b", torch.randn(2, 4), modes=("test",))


class ReturnsText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Scale(2.0)
        self.name = Describe()

    def forward(self, x):
        return self.name(self.a(x))


def test_a_cut_at_a_child_that_returns_no_tensor_is_a_clear_error():
    with pytest.raises(FeatxError, match="child `name` returns a str, not a tensor"):
        featx.verify(ReturnsText(), "name", torch.ones(2, 2))
    sweep = featx.sweep(ReturnsText(), torch.ones(2, 2))
    assert [c.faithful for c in sweep.cuts] == [True, False]
    assert "not a tensor" in sweep.cuts[1].modes["eval"].mismatch


def test_children_passing_tuples_are_compared_leaf_by_leaf():
    sweep = featx.sweep(ReturnsPair(), torch.ones(2, 2))
    assert [c.faithful for c in sweep.cuts] == [True, True]
    report = featx.verify(ReturnsPair(), "split", torch.ones(2, 2))
    assert report.faithful and report.anatomy.children[0].output_shape is None


class NormEval(nn.Module):
    """mmdetection's norm_eval: the root's train() keeps BN in eval, which nn.Sequential.train() skips."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 4)

    def train(self, mode: bool = True):
        super().train(mode)
        self.bn.eval()
        for p in self.conv.parameters():
            p.requires_grad_(False)  # a frozen stage
        return self

    def forward(self, x):
        return self.head(self.bn(self.conv(x)))


class RootAutocast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.b(self.a(x))


class RebindsBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.register_buffer("avg", torch.zeros(2))

    def forward(self, x):
        if self.training:
            self.avg = 0.9 * self.avg + 0.1 * x.mean(0)
        return self.a(x)


class WritesThroughData(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)

    def forward(self, x):
        self.a.weight.data.mul_(2)
        return self.a(x)


class CallsGrandchild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(Block(), Block())

    def forward(self, x):
        x = self.body[0](x)
        return self.body(x)


def test_a_root_train_override_is_caught_by_sweep_as_by_the_literal_run(untouched):
    torch.manual_seed(0)
    model = NormEval().eval()
    model.requires_grad_(True)  # featx's own model.train() calls freeze these; they must come back
    x = torch.randn(8, 4)
    with untouched(model):
        derived = featx.sweep(model, x)
        literal = featx.sweep(model, x, literal=True)
    assert [c.faithful for c in literal.cuts] == [True, False, False]
    assert [c.faithful for c in derived.cuts] == [True, False, False]
    assert "train/eval flags" in derived.anatomy.children[1].feed["train"]
    assert all(c.modes["eval"].ok for c in derived.cuts)


def test_autocast_set_by_the_root_breaks_the_derived_verdict_too():
    torch.manual_seed(0)
    model, x = RootAutocast(), torch.randn(2, 4)
    derived = featx.sweep(model, x)
    literal = featx.sweep(model, x, literal=True)
    assert [c.faithful for c in derived.cuts] == [c.faithful for c in literal.cuts] == [False, False]
    assert "autocast" in derived.anatomy.children[0].feed["eval"]


def test_a_rebound_buffer_is_put_back(untouched):
    model = RebindsBuffer()
    x = torch.ones(3, 2)
    original = model.avg
    with untouched(model):
        featx.verify(model, "a", x)
    assert model.avg is original and torch.equal(model.avg, torch.zeros(2))


def test_a_parameter_written_through_data_is_put_back(untouched):
    model = WritesThroughData()
    x = torch.ones(3, 2)
    with untouched(model):
        featx.sweep(model, x)


def test_a_buffer_sharing_a_parameters_version_counter_is_no_unseen_write(untouched):
    # Putting the buffer back (copy_) moves the counter it shares with `a.weight`; that is featx's own
    # write, not the forward's, so a second restore must not call it one.
    model, x = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), torch.randn(2, 4)
    model[0].register_buffer("weight_view", model[0].weight.detach())
    with untouched(model):
        sweep = featx.sweep(model, x, modes=("eval", "train"))
    assert [c.faithful for c in sweep.cuts] == [True, True]


def test_a_root_writing_a_childs_parameter_breaks_the_feed(untouched):
    torch.manual_seed(0)

    def write_bias(root, x):
        root.b.bias.add_(1.0)
        return x

    model, x = Between(write_bias), torch.randn(2, 4)
    with untouched(model):
        derived = featx.sweep(model, x)
        literal = featx.sweep(model, x, literal=True)
    assert [c.faithful for c in derived.cuts] == [c.faithful for c in literal.cuts] == [True, False]
    assert "wrote to `b.bias`" in derived.anatomy.children[1].feed["eval"]


def test_item_assignment_at_the_root_is_glue():
    def set_item(root, x):
        x[:, 0] = 0
        return x

    sweep = featx.sweep(Between(set_item), torch.randn(2, 4))
    assert [(g.op, g.after, g.before) for g in sweep.anatomy.glue] == [("setitem", "a", "b")]
    assert [g.op for g in sweep.cuts[1].lost_glue] == ["setitem"]


def test_a_grandchild_called_by_the_root_is_glue_and_its_residual_is_lost():
    sweep = featx.sweep(CallsGrandchild(), torch.randn(2, 4))
    assert not sweep.cuts[0].faithful
    assert [g.op for g in sweep.anatomy.glue] == ["call `body.0`"]
    assert [(r.module, r.child) for r in sweep.anatomy.residuals] == [
        ("body.0", None),
        ("body.0", "body"),
        ("body.1", "body"),
    ]


def test_a_shortcut_through_a_module_that_returns_its_input_is_an_identity_shortcut():
    # timm's ConvNeXt and RegNet blocks: `x = self.drop_path(self.conv(x)) + self.shortcut(shortcut)`, with
    # `shortcut` an nn.Identity and DropPath returning its input as is at rate 0; neither makes anything
    class KeepsInput(nn.Module):
        def forward(self, x):
            return x

    class IdentityModuleBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Linear(4, 4)
            self.drop_path = KeepsInput()
            self.shortcut = nn.Identity()

        def forward(self, x):
            return self.drop_path(self.conv(x)) + self.shortcut(x)

    model = nn.Sequential(nn.Sequential(IdentityModuleBlock(), Block(project=True)))
    residuals = featx.sweep(model, torch.randn(2, 4)).anatomy.residuals
    assert [(r.module, r.shortcut) for r in residuals] == [("0.0", "identity"), ("0.1", "projection")]


def test_an_in_place_write_deep_inside_a_block_leaves_the_earlier_cut_its_value():
    # `act` (depth 3) rectifies in place the very tensor `a` returned: the value at the cut after `a` must
    # be what `a` returned before that write
    class RectifiesItsInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU(inplace=True)
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.act(x))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Sequential(RectifiesItsInput())

        def forward(self, x):
            return self.b(self.a(x))

    model = Model()
    with torch.no_grad():
        model.a.weight.copy_(-torch.eye(4))
        model.a.bias.zero_()
    result = featx.verify(model, "a", torch.ones(2, 4))
    assert result.faithful
    assert result.modes["eval"].max_abs_diff == 0.0  # -1 against -1, not against the rectified 0


def test_a_child_rectifying_in_place_what_its_predecessor_returned_costs_no_second_recording(monkeypatch):
    # torchvision's ResNet stem: `bn1` returns a tensor and `relu` (inplace=True) rectifies it. featx holds
    # `bn1`'s output instead of copying it, so it must copy it before that write. The ReLU's forward runs
    # with the recorder's mode off; the write is seen as the ReLU is called, not found after the forward,
    # which would cost a second recording with every output copied.
    eager: list[bool] = []
    run = recorder_module._Recorder.run

    def counted(self):
        eager.append(self.eager_copies)
        return run(self)

    monkeypatch.setattr(recorder_module._Recorder, "run", counted)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.copy_(-torch.eye(4))
        model[0].bias.zero_()
    sweep = featx.sweep(model, torch.ones(2, 4))
    assert eager == [False, False]  # one recording per mode
    assert [c.faithful for c in sweep.cuts] == [True, True, True]
    assert sweep.cuts[0].modes["eval"].max_abs_diff == 0.0  # -1 against -1, not against the rectified 0


def test_an_embedding_that_renormalises_its_weight_in_the_forward_is_put_back():
    # nn.Embedding(max_norm=...) rescales the rows it looks up, in place, inside F.embedding, where no torch
    # function mode sees the write: featx saves the weight of such a leaf before it runs.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=0.5), nn.Flatten(), nn.Linear(8, 2))
    weight = model[0].weight.detach().clone()
    assert (weight[1:5].norm(dim=1) > 0.5).all()  # the rows looked up below get rescaled
    sweep = featx.sweep(model, torch.tensor([[1, 2], [3, 4]]))
    assert [c.faithful for c in sweep.cuts] == [True, True, True]
    assert torch.equal(model[0].weight, weight)


def test_shortcut_kind_does_not_depend_on_operand_order():
    class Order(nn.Module):
        def __init__(self, flip: bool) -> None:
            super().__init__()
            self.flip = flip
            self.conv = nn.Linear(4, 4)

        def forward(self, x):
            a, b = self.conv(x), x.flip(1)
            return b + a if self.flip else a + b

    kinds = [
        featx.verify(nn.Sequential(Order(f)), 1, torch.randn(2, 4)).anatomy.residuals[0].shortcut
        for f in (False, True)
    ]
    assert kinds == ["other", "other"]


def test_a_tolerance_never_makes_inf_equal_to_a_finite_value():
    class Blows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = Scale(1.0)

        def forward(self, x):
            return self.a(x * float("inf"))

    report = featx.verify(Blows(), "a", torch.ones(2, 2), rtol=1e-6, atol=1.0)
    assert not report.faithful
    assert report.to_dict()["modes"]["eval"]["nonfinite"] == 4


def test_keyboard_interrupt_restores_eval_mode(untouched):
    model = Interrupts().eval()
    with untouched(model), pytest.raises(KeyboardInterrupt):
        featx.verify(model, "a", torch.ones(3, 4))
    assert not model.training


# -- state the root sets on a child, and other feeds the Sequential does not give ------------------------
class Gain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.factor = 1.0
        self.settings = {"gain": 1.0}

    def forward(self, x):
        return x * self.factor * self.settings["gain"]


class SetsScale(nn.Module):
    """The root changes child `b`'s state around its call (issue 10): b's value is not the Sequential's."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = Gain()
        self.c = nn.Linear(4, 4)
        self.how = how

    def forward(self, x):
        x = self.a(x)
        if self.how == "rebind, then put back":
            self.b.factor = 3.0
            x = self.b(x)
            self.b.factor = 1.0
        elif self.how == "rebind, left changed":
            self.b.factor = 3.0
            x = self.b(x)
        else:  # a dict the child holds, written in place
            self.b.settings["gain"] = 3.0
            x = self.b(x)
        return self.c(x)


@pytest.mark.parametrize("how", ["rebind, then put back", "rebind, left changed", "item written in place"])
def test_a_child_whose_attribute_the_root_set_is_run_not_derived(how, untouched):
    model, x = SetsScale(how), torch.randn(2, 4)
    with untouched(model):
        derived = featx.sweep(model, x)
        literal = featx.sweep(model, x, literal=True)
    assert [c.faithful for c in literal.cuts] == [True, False, False]
    assert [c.faithful for c in derived.cuts] == [True, False, False]
    assert [c.modes["eval"].method for c in derived.cuts] == ["derived", "run", "run"]
    changed = "b.settings" if how == "item written in place" else "b.factor"
    assert derived.anatomy.children[1].feed["eval"] == f"called after `{changed}` was changed"
    assert (
        f"child `b` is called after `{changed}` was changed in the full forward (eval, train); "
        "the truncated model makes no such change"
    ) in derived.cuts[1].reasons


@pytest.mark.parametrize("how", ["rebind, left changed", "item written in place"])
def test_attributes_the_forward_changes_are_put_back(how):
    model, x = SetsScale(how), torch.randn(2, 4)
    settings = model.b.settings
    featx.verify(model, "c", x)
    featx.sweep(model, x)
    assert model.b.factor == 1.0
    assert model.b.settings is settings and settings == {"gain": 1.0}


def test_an_attribute_the_forward_adds_is_removed_again():
    def remember(root, x):
        root.b.seen = x.shape
        return x

    model = Between(remember)
    featx.sweep(model, torch.randn(2, 4))
    assert not hasattr(model.b, "seen")


class IteratesStages(nn.Module):
    """``for block in self.stages: x = block(x)``, as timm's FastViT does, over a Sequential or a ModuleList."""

    def __init__(self, container: type[nn.Module]) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        blocks = [nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)]
        self.stages = nn.Sequential(*blocks) if container is nn.Sequential else nn.ModuleList(blocks)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.stem(x)
        for block in self.stages:
            x = block(x)
        return self.head(x)


def test_iterating_a_sequential_child_is_calling_it_not_lost_glue():
    model, x = IteratesStages(nn.Sequential), torch.randn(2, 4)
    derived = featx.sweep(model, x)
    literal = featx.sweep(model, x, literal=True)
    calls = [g for g in derived.anatomy.glue if g.op.startswith("call")]
    assert [g.op for g in calls] == ["call `stages.0`", "call `stages.1`", "call `stages.2`"]
    assert [g.status(3) for g in calls] == ["kept"] * 3
    assert [g.status(1) for g in calls] == ["dropped"] * 3
    assert [c.lost_glue for c in derived.cuts] == [(), (), ()]
    # the verdicts stay those of the literal Sequential; `stages` itself is never called, so no value there
    assert [c.faithful for c in derived.cuts] == [c.faithful for c in literal.cuts] == [True, False, True]
    assert "glue, kept" in str(featx.verify(model, "head", x))


def test_iterating_a_module_list_is_still_lost_glue():
    model = IteratesStages(nn.ModuleList)
    sweep = featx.sweep(model, torch.randn(2, 4))
    assert [g.op for g in sweep.cuts[2].lost_glue] == [
        "call `stages.0`",
        "call `stages.1`",
        "call `stages.2`",
    ]


class SkipsAux(nn.Module):
    """Inception v3 with aux logits: `aux` is fed `a`'s output, and so is `b`, not what `aux` returned."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.aux = nn.Linear(4, 3)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        x = self.a(x)
        self.aux(x)
        return self.b(x)


def test_a_feed_mismatch_with_no_glue_behind_it_is_a_reason():
    sweep = featx.sweep(SkipsAux(), torch.randn(2, 4))
    assert [c.faithful for c in sweep.cuts] == [True, True, False]
    assert sweep.cuts[2].reasons[0] == (
        "child `b` is fed what `a` returned, not what `aux` returned (shape [2, 4] instead of [2, 3]) "
        "in the full forward (eval, train)"
    )


class DrawsBeforeDropout(nn.Module):
    """Glue that only advances the RNG: the dropout after it draws another mask than the Sequential's."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = self.a(x)
        _ = torch.rand(3)
        return self.drop(x)


def test_glue_that_only_advances_the_rng_reads_as_a_sentence():
    report = featx.verify(DrawsBeforeDropout(), "drop", torch.randn(4, 8))
    assert report.modes["eval"].ok and not report.modes["train"].ok
    assert report.reasons[:2] == (
        "glue `rand` (test_verify.py:" + report.anatomy.glue[0].source.rpartition(":")[2] + ") runs before "
        "`drop` in the full model and is lost",
        "child `drop` is called after the random number generator advanced since `a` returned in the full "
        "forward (train); the truncated model draws nothing in between, so random ops (dropout) draw other "
        "numbers",
    )


def test_sweep_says_each_cause_once_with_the_cuts_it_explains():
    class Plus(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Linear(4, 4) for _ in range(4))

        def forward(self, x):
            return self.d(self.c(self.b(self.a(x) + 1)))

    text = str(featx.sweep(Plus(), torch.randn(2, 4)))
    reasons = text.splitlines()[
        text.splitlines().index("1 of 4 cuts are faithful; not faithful: `b`, `c`, `d`") + 1 :
    ]
    assert len(reasons) == 2
    assert reasons[0].startswith("  `b`, `c`, `d`: glue `add` (test_verify.py:")
    assert reasons[0].endswith(") runs before `b` in the full model and is lost")
    assert reasons[1] == (
        "  `b`, `c`, `d`: in eval and train mode the truncated output differs from the full model's "
        "(max abs diff in the table)"
    )


def test_a_faithful_cut_with_glue_at_the_cut_says_what_the_next_child_sees(untouched):
    import torchvision

    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32)
    with untouched(model):
        report = featx.verify(model, "avgpool", x, modes=["eval"])
    assert report.faithful
    (flatten,) = report.anatomy.glue
    note = (
        f"glue at the cut: the full model applies `flatten` ({flatten.source}) to the output of `avgpool` "
        "before `fc` sees it; the truncated model returns that output as it is"
    )
    assert report.notes == (note,)
    assert report.to_dict()["notes"] == [note]
    assert f"note: {note}" in str(report).splitlines()
    assert featx.verify(model, "layer4", x, modes=["eval"]).notes == ()


def test_a_child_returning_no_tensor_is_described_with_the_right_article():
    class Count(nn.Module):
        def forward(self, x):
            return 3

    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.n = Count()

        def forward(self, x):
            return self.n(self.a(x))

    with pytest.raises(FeatxError, match=r"child `n` returns an int, not a tensor"):
        featx.verify(Root(), "n", torch.randn(2, 4))


def test_inspect_counts_read_in_the_singular_too():
    import torchvision

    from featx.verification import inspect

    text = str(inspect(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32), modes=["eval"]))
    assert text.splitlines()[-1] == "10 children, 1 glue op, 8 residuals (3 projection shortcuts)"


def test_sweep_reasons_name_only_the_unfaithful_cuts_when_nested_cuts_share_a_child():
    # `stage.a`, `stage.b`, `stage.c` and `stage` all touch the root's second child (kept 2): a reason
    # grouped by that count would name the faithful `stage.a` and `stage` too
    from tests.test_nested import WithStage

    torch.manual_seed(0)
    result = featx.sweep(WithStage(), torch.randn(3, 4), depth=2)
    assert [c.upto for c in result.cuts if not c.faithful] == ["stage.b", "stage.c"]
    assert {cuts for cuts, _ in result.grouped_reasons()} == {"`stage.b`, `stage.c`"}


def test_reports_call_the_model_by_the_label_given_else_by_its_spec_or_class():
    x = torch.ones(5, 5)
    spec = "examples.seed_toy:ResN"
    assert featx.verify(spec, "blk", x).anatomy.model == spec
    assert featx.verify(spec, "blk", x, label="the seed's toy").anatomy.model == "the seed's toy"
    # a module carries no memory of how it was built: load_model's result is named by its class
    built = featx.load_model(spec)
    assert featx.verify(built, "blk", x).anatomy.model == "examples.seed_toy.ResN"
    assert featx.sweep(built, x, label=spec).to_dict()["model"] == spec
    assert featx.verify(built, "blk", x, label=spec).to_dict()["model"] == spec
    inspected = sys.modules["featx.verification"].inspect(built, x, label=spec)
    assert str(inspected).startswith(f"featx inspect  {spec}  (examples.seed_toy.ResN)")


def test_a_sweep_builds_each_cut_row_as_report_cut_does(monkeypatch):
    # The lost/kept-glue rule of a row lives in Cut.of alone: the sweep's rows and Report.cut come from it.
    made: list[str] = []
    of = Cut.of.__func__

    def spy(cls, anatomy, upto, *args, **kwargs):
        made.append(upto)
        return of(cls, anatomy, upto, *args, **kwargs)

    monkeypatch.setattr(Cut, "of", classmethod(spy))
    sweep = featx.sweep(ResN(), torch.ones(5, 5), keep_glue=True)
    assert made == ["blk"]
    # a sweep tells what the output depends on only when asked (dependence=True)
    report = featx.verify(ResN(), "blk", torch.ones(5, 5), keep_glue=True, dependence=False)
    assert report.cut.to_dict() == sweep.cuts[0].to_dict()
    assert made == ["blk", "blk"]


@pytest.mark.parametrize("literal", [False, True])
def test_a_sweep_resolves_each_cut_once(monkeypatch, literal):
    from tests.test_nested import WithStage

    verification = sys.modules["featx.verification"]
    resolved: list[str] = []
    resolve_path = verification.resolve_path

    def counted(model, upto, **kwargs):
        resolved.append(upto)
        return resolve_path(model, upto, **kwargs)

    monkeypatch.setattr(verification, "resolve_path", counted)
    result = featx.sweep(WithStage(), torch.randn(3, 4), depth=2, literal=literal)
    assert sorted(resolved) == sorted(c.upto for c in result.cuts)
    assert len(resolved) == len(set(resolved))
