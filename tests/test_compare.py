"""What verify says when the truncated model's value is not the full model's: which element of a
tuple/list/dict output differs, and how; and, for each way the full forward feeds a child otherwise than the
truncated model does, what the truncated model does instead."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import featx
from featx.compare import Tolerance, compare
from featx.errors import FeatxError
from featx.export import _diff
from tests.test_verify import CalledTwice, NeverCalled
from tests.toy_models import Scale


class ReturnsSize(nn.Module):
    """A child that returns its tokens and the map size they came from, as timm mvitv2's patch_embed does."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 4, 2, stride=2)

    def forward(self, x):
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), x.shape[-2:]


class Tail(nn.Module):
    def forward(self, pair):
        tokens, size = pair
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *size)


class SizeThenTail(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = ReturnsSize()
        self.tail = Tail()

    def forward(self, x):
        return self.tail(self.embed(x))


def test_a_child_that_returns_a_torch_size_is_faithful():
    report = featx.verify(SizeThenTail(), "embed", torch.randn(2, 3, 8, 8))
    assert report.faithful, report.reasons


def test_timm_mvitv2_at_patch_embed_is_faithful():
    model = timm.create_model("mvitv2_tiny", pretrained=False, img_size=64)
    report = featx.verify(model, "patch_embed", torch.randn(1, 3, 64, 64))
    assert report.faithful, report.reasons


def test_a_differing_non_tensor_element_is_named_with_both_values():
    t = torch.zeros(2, 3)
    result = compare((t, (14, 14)), (t, (7, 7)))
    assert result.mismatch == "element [1] is (14, 14) where the full model has (7, 7)"


def test_a_size_where_the_full_model_has_a_tuple_is_named_as_a_structure_difference():
    t = torch.zeros(2, 3)
    result = compare((t, torch.Size([56, 56])), (t, (56, 56)))
    assert result.mismatch == (
        "the truncated model's output differs in structure from the full model's at the cut: "
        "element [1] is torch.Size([56, 56]) where the full model has (56, 56)"
    )


def test_a_nested_list_of_another_length_is_named_by_its_path():
    t = torch.zeros(1)
    result = compare([t, [t, t]], [t, [t]])
    assert result.mismatch == (
        "the truncated model's output differs in structure from the full model's at the cut: "
        "element [1] is a list of 2 where the full model has a list of 1"
    )


def test_dicts_with_other_keys_are_told_apart_by_their_keys():
    t = torch.zeros(1)
    result = compare({"a": t}, {"b": t})
    assert result.mismatch == (
        "the truncated model returns a dict with keys ['a'], the full model has a dict with keys ['b'] at the cut"
    )


def test_a_tensor_element_of_another_shape_is_named():
    result = compare((torch.zeros(2, 56, 96), torch.zeros(1)), (torch.zeros(2, 3136, 96), torch.zeros(1)))
    assert (
        result.mismatch
        == "output element [0] shape [2, 56, 96] differs from the full model's [2, 3136, 96] at the cut"
    )


def test_a_single_tensor_of_another_shape_keeps_the_plain_sentence():
    result = compare(torch.zeros(2, 3), torch.zeros(2, 4))
    assert result.mismatch == "output shape [2, 3] differs from the full model's [2, 4] at the cut"


def test_a_tensor_where_the_full_model_has_a_number_is_a_mismatch_not_a_crash():
    t = torch.zeros(2, 3)
    result = compare((t, t), (t, 3))
    assert result.mismatch == "element [1] is a tensor of shape [2, 3] where the full model has 3"


def test_the_element_that_differs_most_is_named_in_the_reason():
    t = torch.zeros(2, 3)
    result = compare((t, t + 0.5, t + 2), (t, t, t))
    assert result.max_abs_diff == 2.0 and result.element == "[2]"
    assert result.reason("eval") == (
        "in eval mode the truncated output differs from the full model's by up to 2 (most at element [2])"
    )


def test_a_single_tensor_that_differs_names_no_element():
    result = compare(torch.ones(2), torch.zeros(2))
    assert result.element is None
    assert (
        result.reason("train")
        == "in train mode the truncated output differs from the full model's by up to 1"
    )


def test_rtol_is_relative_to_each_element_not_to_the_largest():
    # off by 0.001 where the reference is 0: within 1e-5 + 1e-5 * max |b| (0.01), not within 1e-5 + 1e-5 * 0
    result = compare(torch.tensor([1000.001, 0.001]), torch.tensor([1000.0, 0.0]), Tolerance(1e-5, 1e-5))
    assert not result.equal and result.max_abs_diff == pytest.approx(0.001)


def test_within_atol_plus_rtol_of_each_element_is_equal():
    result = compare(torch.tensor([1000.001, 0.001]), torch.tensor([1000.0, 0.0]), Tolerance(0.0011, 1e-5))
    assert result.equal and result.max_abs_diff == pytest.approx(0.001)


@pytest.mark.filterwarnings("ignore:Casting complex values to real")  # the comparator reads the real part
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.cfloat])
def test_nan_and_inf_on_either_side_are_counted_per_element_and_never_equal(dtype):
    nan, inf = float("nan"), float("inf")
    out = torch.tensor([1.0, nan, inf, inf, 2.0, 5.0]).to(dtype)
    reference = torch.tensor([1.0, nan, inf, -inf, nan, 4.0]).to(dtype)
    result = compare(out, reference, Tolerance(atol=10.0))
    assert (result.nonfinite, result.equal, result.max_abs_diff) == (4, False, 1.0)
    assert compare(out[[0, 5]], reference[[0, 5]], Tolerance(atol=10.0)).equal


def test_float64_values_whose_difference_is_beyond_float64_differ_by_inf_and_are_finite():
    big = torch.tensor([1.7e308, 0.0], dtype=torch.float64)
    result = compare(big, -big)
    assert (result.max_abs_diff, result.nonfinite, result.equal) == (float("inf"), 0, False)


def test_verify_and_export_judge_one_tensor_pair_alike():
    out, reference = torch.tensor([[1000.001, 0.001]]), torch.tensor([[1000.0, 0.0]])
    for tolerance in (Tolerance(1e-5, 1e-5), Tolerance(0.001, 1e-5), Tolerance(0.0, 0.01)):
        exported = _diff((1, 2), "out", out, reference, tolerance)
        assert exported.within == compare(out, reference, tolerance).equal, tolerance
        assert exported.max_rel_diff == pytest.approx(0.001 / 1000.0)


@pytest.mark.parametrize(
    ("atol", "rtol", "message"),
    [
        (-1e-5, 0.0, "atol -1e-05 is not a tolerance; accepted: a finite number >= 0"),
        (0.0, float("nan"), "rtol nan is not a tolerance; accepted: a finite number >= 0"),
        (float("inf"), 0.0, "atol inf is not a tolerance; accepted: a finite number >= 0"),
        ("0.1", 0.0, "atol '0.1' is not a tolerance; accepted: a finite number >= 0"),
        (True, 0.0, "atol True is not a tolerance; accepted: a finite number >= 0"),
    ],
)
def test_a_tolerance_that_is_not_a_finite_number_at_least_zero_is_refused(atol, rtol, message):
    with pytest.raises(FeatxError) as err:
        Tolerance(atol, rtol)
    assert str(err.value) == message


def test_verify_refuses_a_negative_atol_naming_it():
    with pytest.raises(FeatxError, match=r"^atol -1\.0 is not a tolerance; accepted: a finite number >= 0$"):
        featx.verify(nn.Sequential(Scale(2.0)), 1, torch.ones(2), atol=-1.0)


class OutOfOrder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Scale(2.0)
        self.b = Scale(3.0)

    def forward(self, x):
        return self.a(self.b(x))


def test_a_child_the_full_forward_never_calls_is_a_reason_saying_the_truncated_model_calls_it():
    report = featx.verify(NeverCalled(), "b", torch.ones(2, 2))
    assert report.reasons[0] == (
        "child `unused` is never called in the full forward (eval, train); "
        "the truncated model calls it on what `a` returns"
    )


def test_a_child_called_twice_is_a_reason_saying_the_truncated_model_calls_it_once():
    report = featx.verify(CalledTwice(), "a", torch.ones(2, 2))
    assert report.reasons[0] == (
        "child `a` is called 2 times in the full forward (eval, train); "
        "the truncated model calls it once, on the model's input"
    )


def test_children_out_of_order_are_a_reason_saying_the_truncated_model_keeps_registration_order():
    report = featx.verify(OutOfOrder(), "b", torch.ones(2, 2))
    assert (
        "child `b` is called before `a`, out of registration order in the full forward (eval, train); "
        "the truncated model calls it right after `a`, in registration order"
    ) in report.reasons


def test_a_child_fed_something_else_is_a_reason_saying_what_the_truncated_model_feeds_it():
    report = featx.verify(OutOfOrder(), "a", torch.ones(2, 2))
    assert report.reasons[0] == (
        "child `a` is fed something other than the model's input (other values) in the full forward "
        "(eval, train); the truncated model feeds it the model's input as it is"
    )
