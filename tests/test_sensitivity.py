"""What a verdict checks beyond the comparison: that it could have failed (``sensitive``), and whether the
model's output depends on the value at the cut (``output_depends_on_cut``)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

import featx
from examples.seed_toy import ResN
from featx.cli import main
from featx.compare import Tolerance
from featx.report import Report
from featx.sensitivity import blind_spot


class _Empties(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :0]


class EmptyAtTheCut(nn.Module):
    """Its first child returns an empty tensor: equal to anything of its shape, whatever it computes."""

    def __init__(self) -> None:
        super().__init__()
        self.empties = _Empties()
        self.head = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.empties(x))


class Discards(nn.Module):
    """Calls ``side`` and ignores what it returns; dropout after ``head`` draws from the RNG in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.side = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        self.side(x)
        return F.dropout(self.head(x), 0.5, self.training)


class MapsAndDiscards(nn.Module):
    """``Discards`` with feature maps, to tap in a backbone config."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.side = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        self.side(x)
        return self.head(x)


class AttendsAndDiscards(nn.Module):
    """``nn.MultiheadAttention`` picks a fused kernel when no torch function mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Linear(8, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.side(x)
        return self.attention(x, x, x, need_weights=False)[0]


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18()


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def resnet18_at_layer3() -> Report:
    return featx.verify(_resnet18(), "layer3", X)


# -- sensitive -------------------------------------------------------------------------------------------
def test_an_empty_value_at_the_cut_is_not_called_faithful():
    report = featx.verify(EmptyAtTheCut(), "empties", torch.randn(2, 4))
    assert not report.faithful
    assert {m: r.sensitive for m, r in report.modes.items()} == {"eval": False, "train": False}
    assert report.reasons == (
        "in eval mode the comparison cannot fail, so it proves nothing: the value at the cut holds no element "
        "a difference could show in (no tensor, or an empty one)",
        "in train mode the comparison cannot fail, so it proves nothing: the value at the cut holds no element "
        "a difference could show in (no tensor, or an empty one)",
    )
    assert "NOT faithful" in str(report)
    assert "equal, but the comparison cannot fail" in str(report)


def test_a_tolerance_no_float32_difference_can_exceed_is_not_a_verdict():
    report = featx.verify(ResN(), "blk", torch.ones(5, 5), atol=1e39)  # the lost +5 is within it
    assert not report.faithful
    assert report.modes["eval"].sensitive is False
    assert report.modes["eval"].blind == (
        "no finite torch.float32 value lies just beyond the tolerance (atol 1e+39, rtol 0) from the largest "
        "element 8"
    )


def test_the_seed_toy_verdict_is_sensitive_on_the_example_and_the_fresh_input():
    report = featx.verify(ResN(), "blk", torch.ones(5, 5), keep_glue=True)
    assert report.faithful
    for mode in ("eval", "train"):
        result = report.to_dict()["modes"][mode]
        assert result["sensitive"] is True
        assert result["fresh"]["sensitive"] is True


def test_a_failed_comparison_is_not_checked_for_sensitivity():
    report = featx.verify(ResN(), "blk", torch.ones(5, 5))
    assert not report.faithful
    assert [r.sensitive for r in report.modes.values()] == [None, None]


def test_resnet18_verdicts_are_sensitive(resnet18_at_layer3):
    assert resnet18_at_layer3.faithful
    assert {m: r.sensitive for m, r in resnet18_at_layer3.modes.items()} == {"eval": True, "train": True}


def test_resnet18_verdicts_are_sensitive_within_a_tolerance():
    report = featx.verify(_resnet18(), "layer3", X, modes=("eval",), atol=1e-3, rtol=1e-2, dependence=False)
    assert report.faithful and report.modes["eval"].sensitive is True


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [
        (torch.float32, Tolerance()),
        (torch.bfloat16, Tolerance()),
        (torch.float16, Tolerance(atol=1e-5, rtol=1e-3)),
        (torch.float32, Tolerance(rtol=1e-8)),  # below float32's resolution at 1.0: a step past the bound
        (torch.int64, Tolerance(atol=2.5)),
        (torch.bool, Tolerance()),
    ],
)
def test_a_difference_just_above_the_tolerance_is_seen_in_each_dtype(dtype, tolerance):
    value = torch.tensor([[1.0, -0.25], [0.5, 0.0]]).to(dtype)
    assert blind_spot((value, 3), tolerance) is None
    assert blind_spot({"a": value.t()}, tolerance, whole=False) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("whole", [True, False])
def test_the_perturbed_element_is_the_first_of_the_largest_finite_ones(dtype, whole):
    nan, inf = float("nan"), float("inf")
    value = torch.tensor([[nan, inf, 1.0], [-8.0, 8.0, -inf]]).to(dtype)
    why = "no finite {} value lies just beyond the tolerance (atol 1e+39, rtol 0) from the largest element {}"
    assert blind_spot(value, Tolerance(atol=1e39), whole) == why.format(dtype, -8)
    assert blind_spot((value[:, 1:], value), Tolerance(atol=1e39), whole) == why.format(dtype, 8)


def test_the_probe_check_of_a_sweep_cut_is_a_few_dozen_torch_calls():
    class Counted(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Counted.calls += 1
            return func(*args, **(kwargs or {}))

    value = torch.randn(2, 40, 16, 16, generator=torch.Generator().manual_seed(0))
    with Counted():
        assert blind_spot(value, Tolerance(), whole=False) is None
    # it was 98, most of them on one-element tensors: 7% of a sweep of convnext_atto at 64 px
    assert Counted.calls <= 70


def test_a_sweep_withholds_a_blind_verdict_too():
    sweep = featx.sweep(EmptyAtTheCut(), torch.randn(2, 4))
    cut = sweep.cuts[0]
    assert cut.upto == "empties" and not cut.faithful
    assert cut.to_dict()["modes"]["eval"]["sensitive"] is False
    assert sweep.cuts[1].to_dict()["modes"]["eval"]["sensitive"] is False  # the model's output: empty too


# -- output_depends_on_cut ------------------------------------------------------------------------------
def test_a_child_whose_output_the_model_ignores_gets_the_note_and_the_json_false():
    report = featx.verify(Discards(), "side", torch.randn(3, 4))
    assert report.faithful
    data = report.to_dict()
    assert [data["modes"][m]["output_depends_on_cut"] for m in ("eval", "train")] == [False, False]
    note = (
        "the model's output does not depend on `side`'s value in eval and train mode (it discards it): "
        "a tap there is legal, but nothing the model returns is computed from it"
    )
    assert data["notes"] == [note]
    assert f"note: {note}" in str(report)


def test_a_discarded_value_is_told_apart_under_a_fused_attention_kernel():
    report = featx.verify(AttendsAndDiscards().eval(), "side", torch.randn(2, 5, 8), modes=("eval",))
    assert report.modes["eval"].output_depends_on_cut is False


def test_resnet18_output_depends_on_layer3(resnet18_at_layer3):
    modes = resnet18_at_layer3.modes
    assert {m: r.output_depends_on_cut for m, r in modes.items()} == {"eval": True, "train": True}
    assert resnet18_at_layer3.notes == ()


def test_dependence_can_be_left_out_of_verify():
    report = featx.verify(Discards(), "side", torch.randn(3, 4), dependence=False)
    assert [r.output_depends_on_cut for r in report.modes.values()] == [None, None]
    assert report.notes == ()


def test_sweep_tells_dependence_only_when_asked():
    x = torch.randn(3, 4)
    assert featx.sweep(Discards(), x).cuts[1].modes["eval"].output_depends_on_cut is None
    sweep = featx.sweep(Discards(), x, dependence=True)
    assert [c.modes["train"].output_depends_on_cut for c in sweep.cuts] == [True, False, True]
    assert (
        "note: the model's output does not depend on the value at `side` in eval and train mode (it discards "
        "it): a tap there is legal, but nothing the model returns is computed from it"
    ) in str(sweep).splitlines()


def test_cli_sweep_dependence_puts_it_in_the_json(capsys):
    assert main(["sweep", "examples.seed_toy:ResN", "--input-shape", "5,5", "--dependence", "--json"]) == 0
    modes = json.loads(capsys.readouterr().out)["cuts"][0]["modes"]
    assert [modes[m]["output_depends_on_cut"] for m in ("eval", "train")] == [True, True]


def test_both_checks_leave_the_model_as_found(untouched):
    model = _resnet18().train()
    with untouched(model):
        report = featx.verify(model, "layer2", X, modes=("train",))
    assert report.faithful and report.modes["train"].output_depends_on_cut is True
    model, x = Discards().train(), torch.randn(3, 4)
    with untouched(model):
        featx.sweep(model, x, dependence=True)


def test_check_notes_a_tap_the_model_output_does_not_depend_on(tmp_path, capsys):
    config = tmp_path / "discards.yaml"
    config.write_text(
        "model: tests.test_sensitivity:MapsAndDiscards\nupto: side\noutputs: [stem, side]\n"
        "verify:\n  input_shape: [2, 3, 8, 8]\n"
    )
    assert main(["check", str(config)]) == 0
    assert (
        f"  {config}: note: the model's output does not depend on `side`'s value in eval and train mode (it "
        "discards it): a tap there is legal, but nothing the model returns is computed from it"
    ) in capsys.readouterr().out.splitlines()
