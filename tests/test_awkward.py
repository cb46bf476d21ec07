"""Awkward but legal models, and faults: a correct report or a clear statement, never a crash or a
wrong "faithful". The model-untouched invariant is checked around every call by conftest's autouse fixture.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import featx
from featx import FeatxError
from tests.toy_models import Between, Scale


class ToDict(nn.Module):
    def forward(self, x):
        return {"double": x * 2, "triple": x * 3}


class FromDict(nn.Module):
    def forward(self, d):
        return d["double"] + d["triple"]


class ToList(nn.Module):
    def forward(self, x):
        return [x, x + 1]


class FromList(nn.Module):
    def forward(self, xs):
        return xs[0] * xs[1]


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Scale()
        self.b = Add()

    def forward(self, x):
        return self.b(self.a(x), x)


class Add(nn.Module):
    def forward(self, x, y=None):
        return x + y


class KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Scale()
        self.b = Scale(3.0)

    def forward(self, x):
        return self.b(self.a(x), scale=10.0)


class Boom(nn.Module):
    def __init__(self, when: str) -> None:
        super().__init__()
        self.when = when

    def forward(self, x):
        if self.when in ("always", "train" if self.training else "eval"):
            raise RuntimeError("boom")
        return x + 1


def boom_model(position: int, when: str) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)]
    layers.insert(position, Boom(when))
    return nn.Sequential(*layers)


def test_children_passing_dicts_and_lists_are_compared_leaf_by_leaf():
    model = nn.Sequential(ToDict(), FromDict(), ToList(), FromList())
    sweep = featx.sweep(model, torch.randn(2, 3))
    assert [c.faithful for c in sweep.cuts] == [True] * 4
    assert featx.verify(model, 1, torch.randn(2, 3)).faithful  # a dict at the cut


def test_a_child_called_with_two_inputs_is_flagged_and_the_sequential_error_reported():
    sweep = featx.sweep(TwoInputs(), torch.ones(2, 2))
    assert sweep.anatomy.children[1].feed["eval"] == "called with 2 positional arguments"
    assert sweep.cuts[0].faithful and not sweep.cuts[1].faithful
    assert "TypeError" in sweep.cuts[1].modes["eval"].error
    assert any("called with 2 positional arguments" in r for r in sweep.cuts[1].reasons)


def test_a_child_called_with_keyword_arguments_is_flagged_and_checked_by_running_it():
    sweep = featx.sweep(KeywordCall(), torch.ones(2, 2))
    assert "keyword arguments ['scale']" in sweep.anatomy.children[1].feed["eval"]
    assert not sweep.cuts[1].faithful
    assert sweep.cuts[1].modes["eval"].max_abs_diff == 54.0  # 2*3*10 vs 2*3


def test_a_model_without_children_is_a_clear_error():
    with pytest.raises(FeatxError, match="no children"):
        featx.verify(nn.Tanh(), 1, torch.ones(2))
    with pytest.raises(FeatxError, match="no children"):
        featx.sweep(nn.Tanh(), torch.ones(2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_and_inputs(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.LayerNorm(8)).to(dtype)
    sweep = featx.sweep(model, torch.randn(4, 8, dtype=dtype))
    assert all(c.faithful for c in sweep.cuts)
    assert featx.verify(model, 3, torch.randn(4, 8, dtype=dtype)).faithful


def test_bfloat16_resnet_sweep_matches_literal():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().to(torch.bfloat16)
    x = torch.randn(2, 3, 64, 64, dtype=torch.bfloat16)
    derived, literal = featx.sweep(model, x), featx.sweep(model, x, literal=True)
    assert [c.faithful for c in derived.cuts] == [c.faithful for c in literal.cuts] == [True] * 9 + [False]


def test_channels_last_inputs_keep_their_layout_and_verdicts():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    derived, literal = featx.sweep(model, x), featx.sweep(model, x, literal=True)
    assert [c.faithful for c in derived.cuts] == [c.faithful for c in literal.cuts] == [True] * 9 + [False]
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_a_layout_change_in_glue_is_checked_by_running_the_next_child():
    class Relayout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.b(self.a(x).contiguous(memory_format=torch.channels_last))

    sweep = featx.sweep(Relayout(), torch.randn(1, 3, 16, 16))
    assert "strides" in sweep.anatomy.children[1].feed["eval"]
    assert sweep.cuts[1].modes["eval"].method == "run"


@pytest.mark.parametrize("grad", [True, False])
def test_inputs_with_requires_grad_under_no_grad_and_without(grad):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 4, requires_grad=True)
    with torch.set_grad_enabled(grad):
        report = featx.verify(model, 2, x)
        assert torch.is_grad_enabled() == grad
    assert report.faithful
    assert x.requires_grad and x.grad is None
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("position", [0, 1, 3], ids=["first", "middle", "last"])
@pytest.mark.parametrize("when", ["eval", "train"])
def test_a_child_that_raises_in_one_mode_is_reported_per_cut(position, when):
    model = boom_model(position, when)
    other = "train" if when == "eval" else "eval"
    x = torch.randn(2, 4)
    sweep = featx.sweep(model, x)
    for cut in sweep.cuts:
        assert cut.modes[other].ok
        if cut.kept <= position:
            assert cut.modes[when].ok
        elif cut.kept == position + 1:
            assert cut.modes[when].error == "RuntimeError: boom (in `" + str(position) + "`)"
        else:
            assert not cut.modes[when].ok and "raised" in cut.modes[when].mismatch
    if position > 0:
        assert featx.verify(model, position, x).faithful  # the cut before the raising child
    with pytest.raises(FeatxError, match=f"raised in `{position}` in {when} mode"):
        featx.verify(model, str(position), x)  # the cut through it


def test_a_model_raising_in_its_first_child_in_every_mode_is_a_clear_error():
    with pytest.raises(FeatxError, match="before any child returned: RuntimeError: boom; check the input"):
        featx.sweep(boom_model(0, "always"), torch.randn(2, 4))


@pytest.mark.parametrize("literal", [False, True])
def test_nan_in_both_outputs_at_the_same_place_is_reported_not_hidden(literal):
    class Poison(nn.Module):
        def forward(self, x):
            return x / torch.tensor([0.0, 1.0]) * 0.0  # column 0: 0/0 = NaN in both runs

    model = nn.Sequential(nn.Identity(), Poison(), nn.Identity())
    sweep = featx.sweep(model, torch.ones(3, 2), literal=literal)
    assert [c.faithful for c in sweep.cuts] == [True, False, False]
    assert sweep.cuts[1].modes["eval"].nonfinite == 3
    assert "NaN or infinite" in sweep.cuts[1].reasons[-1]


def test_keyboard_interrupt_mid_sweep_leaves_the_model_as_found():
    class Interrupt(nn.Module):
        def forward(self, x):
            if self.training:
                raise KeyboardInterrupt
            return x

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), Interrupt(), nn.Linear(4, 4)).eval()
    with pytest.raises(KeyboardInterrupt):
        featx.sweep(model, torch.randn(3, 4))
    assert not model.training


def test_an_in_place_write_featx_cannot_see_coming_is_caught_by_the_version_counter():
    def hidden_write(root, x):
        with torch._C.DisableTorchFunction():  # no TorchFunctionMode sees this write
            x.add_(1.0)
        return x

    torch.manual_seed(0)
    model, x = Between(hidden_write), torch.randn(2, 4)
    derived, literal = featx.sweep(model, x), featx.sweep(model, x, literal=True)
    assert [c.faithful for c in derived.cuts] == [c.faithful for c in literal.cuts] == [True, False]
    assert featx.verify(model, "a", x).faithful


@pytest.mark.xfail(
    strict=True,
    reason="known limit: a child's output is held, not copied, until a write featx sees (a torch call or its "
    "version counter); a write through numpy is neither, so the cut is compared with the overwritten tensor",
)
def test_a_write_no_version_counter_sees_leaves_the_earlier_cut_its_value():
    # A write through numpy bypasses torch: no TorchFunctionMode sees it and no version counter moves. The
    # value at the cut after `a` is what `a` returned, before the root's glue overwrote it. Copying every
    # child's output as it returns would get this right, at 7-15% of a `verify` at 224 px (measured on
    # torchvision's resnet50 at `layer2`), so the recorder holds outputs instead.
    class Overwrite(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            y = self.a(x)
            out = self.b(y)
            y.numpy()[...] = 0.0  # after `b` read it: `b` was fed what `a` returned
            return out

    torch.manual_seed(0)
    model, x = Overwrite(), torch.randn(2, 4)
    with torch.no_grad():
        at_a = model.a(x)
    sweep = featx.sweep(model, x)
    assert [c.faithful for c in sweep.cuts] == [True, True]
    assert featx.verify(model, "a", x).faithful
    assert torch.equal(featx.truncate(model, "a")(x).detach(), at_a)
