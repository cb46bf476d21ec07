from __future__ import annotations

import numpy
import pytest
import torch
import torchvision

import featx
from featx import FeatxError


@pytest.fixture(scope="module")
def resnet18() -> torch.nn.Module:
    return torchvision.models.resnet18().eval()


def test_truncate_by_name_keeps_children_up_to_and_including_it(resnet18):
    seq = featx.truncate(resnet18, "layer2")
    assert list(seq._modules) == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]


def test_truncate_by_count_and_negative_count_match_the_list_slices(resnet18):
    children = list(resnet18.children())
    assert list(featx.truncate(resnet18, 6).children()) == children[:6]
    assert list(featx.truncate(resnet18, -4).children()) == children[:-4]
    assert list(featx.truncate(resnet18, "7").children()) == children[:7]


def test_truncated_model_shares_modules_and_state_dict_keys(resnet18):
    seq = featx.truncate(resnet18, "layer3")
    assert seq.layer3 is resnet18.layer3
    full_keys = resnet18.state_dict().keys()
    assert set(seq.state_dict()) <= set(full_keys)
    assert all(k.startswith(("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")) for k in seq.state_dict())
    assert len(seq.state_dict()) == sum(k.split(".")[0] in seq._modules for k in full_keys)


def test_truncated_output_equals_manual_children_slice(resnet18):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        manual = torch.nn.Sequential(*list(resnet18.children())[:-4])(x)
        assert torch.equal(featx.truncate(resnet18, -4)(x), manual)


@pytest.mark.parametrize(
    ("upto", "fragment"),
    [
        ("layer9", "did you mean `layer4`"),
        (0, "keeps 0 of 10 children"),
        (11, "accepted: 1..10, -1..-9"),
        (-10, "accepted: 1..10"),
        (-11, "upto -11 drops the last 11 of 10 children; accepted: 1..10, -1..-9"),
        (2.5, "neither a child name nor an int"),
        (True, "neither a child name nor an int"),
    ],
)
def test_bad_upto_names_the_value_and_lists_the_children(resnet18, upto, fragment):
    with pytest.raises(FeatxError) as err:
        featx.truncate(resnet18, upto)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_a_model_without_children_cannot_be_cut():
    with pytest.raises(FeatxError, match="no children"):
        featx.truncate(torch.nn.ReLU(), 1)


def test_digit_strings_name_sequential_children_before_they_count():
    seq = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2), torch.nn.ReLU())
    assert list(featx.truncate(seq, "2")._modules) == ["0", "1", "2"]
    assert list(featx.truncate(seq, "0")._modules) == ["0"]
    assert list(featx.truncate(seq, 2)._modules) == ["0", "1"]


def test_numpy_and_torch_integers_are_counts(resnet18):
    names = [name for name, _ in resnet18.named_children()]
    for three in (numpy.int64(3), numpy.int32(3), numpy.uint8(3), torch.tensor(3)):
        assert list(featx.truncate(resnet18, three)._modules) == names[:3], type(three)
    assert list(featx.truncate(resnet18, numpy.int64(-4))._modules) == names[:-4]
    report = featx.verify(resnet18, numpy.int64(6), torch.randn(1, 3, 32, 32), modes="eval")
    assert (report.upto, report.kept, report.faithful) == ("layer2", 6, True)
    with pytest.raises(FeatxError, match="upto 11 keeps 11 of 10 children"):
        featx.truncate(resnet18, numpy.int64(11))
    with pytest.raises(FeatxError, match="neither a child name nor an int"):
        featx.truncate(resnet18, numpy.float64(3.0))  # a float is no count, numpy's neither


# --- one kind of thing, whatever keep_glue says: featx.TruncatedModel ----------------------------------------


@pytest.mark.parametrize("keep_glue", [False, True])
def test_truncate_returns_a_truncated_model_whatever_the_flag(resnet18, keep_glue):
    cut = featx.truncate(resnet18, -3, keep_glue=keep_glue)
    assert isinstance(cut, featx.TruncatedModel)
    assert (cut.upto, cut.keep_glue) == ("layer3", keep_glue)  # the cut as resolved
    assert set(cut.state_dict()) <= set(resnet18.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(cut(x), featx.truncate(resnet18, "layer3")(x))  # resnet18 has no glue before fc


def test_a_nested_cut_is_a_truncated_model_with_the_dotted_cut(resnet18):
    plain, glued = featx.truncate(resnet18, "layer3.1"), featx.truncate(resnet18, "layer3.1", keep_glue=True)
    assert (plain.upto, plain.keep_glue) == (glued.upto, not glued.keep_glue) == ("layer3.1", False)
    assert type(plain.layer3) is torch.nn.Sequential  # the containers inside stay plain Sequentials


def test_the_plain_cut_is_still_the_sequential_it_was(resnet18):
    from featx.truncation import TruncatedSequential

    seq = featx.truncate(resnet18, "layer2")
    assert isinstance(seq, torch.nn.Sequential) and type(seq) is TruncatedSequential
    assert len(seq) == 6 and seq[0] is resnet18.conv1 and seq[-1] is resnet18.layer2
    assert [m for m in seq] == list(resnet18.children())[:6]
    head = seq[:2]  # a slice is another cut: a plain Sequential, as before
    assert type(head) is torch.nn.Sequential and list(head) == [resnet18.conv1, resnet18.bn1]
    keys = [k for k in resnet18.state_dict() if k.split(".")[0] in seq._modules]
    assert list(seq.state_dict()) == keys


def test_the_plain_cut_scripts_exports_and_pickles_as_a_sequential(resnet18, tmp_path):
    import copy
    import warnings

    seq = featx.truncate(resnet18, "layer2")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = seq(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
            scripted = torch.jit.script(seq)
        assert torch.equal(scripted(x), expected) and scripted.upto == "layer2"
        exported = torch.export.export(seq, (x,))
        assert torch.equal(exported.module()(x), expected)
        copied = copy.deepcopy(seq)
        assert (copied.upto, copied.keep_glue) == ("layer2", False) and torch.equal(copied(x), expected)
        torch.save(seq, tmp_path / "seq.pt")
        loaded = torch.load(tmp_path / "seq.pt", weights_only=False)
        assert isinstance(loaded, featx.TruncatedModel) and torch.equal(loaded(x), expected)
