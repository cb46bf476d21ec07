"""keep_glue and state: a root whose forward keeps state is kept exactly or refused, never silently wrong.

Each root below keeps state in one way. It is pinned to one of two outcomes:
- kept: the cut, made after the model ran once, equals the full model (a deep copy, in the same mode) on
  fresh inputs (other values, another batch and spatial size) on two calls in a row, buffers included;
- refused: ``FeatxError``, one line naming the attribute (or argument, hook) and the model's source line,
  at build or, for a value the graph holds as a constant, at the first call where it no longer holds.
"""

from __future__ import annotations

import copy
import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass
from random import random as draw

import numpy
import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import featx
from featx import FeatxError
from tests.test_planted import GLUE, ChildPlan, GluePlan, Planted, plans
from tests.test_verify import SetsScale

BUILD = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
FRESH = [
    torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(1)),
    torch.randn(1, 3, 10, 10, generator=torch.Generator().manual_seed(2)),
]


def conv() -> nn.Module:
    return nn.Conv2d(3, 3, 1)


class Two(nn.Module):
    """Children ``a`` and ``b``; subclasses write the forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = conv()
        self.b = conv()


# -- roots the cut keeps exactly ---------------------------------------------------------------------------
class CountsSteps(Two):
    """An in-place buffer update in train mode, recorded in the graph and run in that mode."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        if self.training:
            self.steps.add_(1)
        return self.b(self.a(x) + self.steps)


class ShapeArithmetic(Two):
    """Values from the input's shape: graph operations, recomputed per call."""

    def forward(self, x):
        n, c, h, w = x.shape
        x = self.a(x).reshape(n, c, h * w).softmax(-1).reshape(n, c, h, w) * (h * w)
        return self.b(x)


class Resized(Two):
    """``F.interpolate`` to a size taken from the input: recomputed per call."""

    def forward(self, x):
        return self.b(F.interpolate(self.a(x), size=x.shape[-2:], mode="bilinear", align_corners=False))


class ConfigAttribute(Two):
    """A plain attribute set in ``__init__`` and never written: the graph holds it as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.factor = 2.5

    def forward(self, x):
        return self.b(self.a(x) * self.factor)


class CountingChild(nn.Module):
    """A child that counts its calls: it runs for real in the cut, so it counts there too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x) * self.calls


class ChildKeepsState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = CountingChild()
        self.b = conv()

    def forward(self, x):
        return self.b(self.a(x) + 1)


class ChildHook(Two):
    """A pre-hook on a child rewrites its input: the cut calls the child as the model does."""

    def __init__(self) -> None:
        super().__init__()
        self.b.register_forward_pre_hook(lambda module, args: (args[0] * 3,))

    def forward(self, x):
        return self.b(self.a(x) - 1)


class NoGradChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = conv()

    def forward(self, x):
        with torch.no_grad():
            return self.conv(x)


class ChildWithoutGrad(nn.Module):
    """``torch.no_grad`` inside a child's forward: the child runs itself in the cut."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = NoGradChild()
        self.b = conv()

    def forward(self, x):
        return self.b(self.a(x) * 2)


class ScriptingBranch(Two):
    def forward(self, x):
        if torch.jit.is_scripting():
            return self.b(self.a(x))
        return self.b(self.a(x) + 0.5)


class ScriptedChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.jit.script(conv())
        self.b = conv()

    def forward(self, x):
        return self.b(self.a(x).relu())


class OptionalArgument(Two):
    def forward(self, x, scale=None):
        x = self.a(x)
        if scale is not None:
            x = x * scale
        return self.b(x)


# -- roots the cut refuses at build --------------------------------------------------------------------
class SetsChildAttributeAroundCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = conv()
        self.b = ScaledConv()

    def forward(self, x):
        self.b.gain = 3.0  # sets
        x = self.b(self.a(x))
        self.b.gain = 1.0
        return x


class ScaledConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = conv()
        self.gain = 1.0

    def forward(self, x):
        return self.conv(x) * self.gain


class CountsCalls(Two):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # sets
        return self.b(self.a(x) * self.calls)


class RemembersShape(Two):
    def forward(self, x):
        self.hw = x.shape[-2:]  # sets
        return self.b(F.interpolate(self.a(x), size=self.hw))


class SwapsChild(Two):
    def __init__(self) -> None:
        super().__init__()
        self.spare = conv()

    def forward(self, x):
        self.b, self.spare = self.spare, self.b  # sets
        return self.b(self.a(x))


class DeletesAttribute(Two):
    def __init__(self) -> None:
        super().__init__()
        self.once = True

    def forward(self, x):
        if hasattr(self, "once"):
            del self.once  # deletes
        return self.b(self.a(x))


class CacheDict(Two):
    def __init__(self) -> None:
        super().__init__()
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        x = self.a(x)
        self.cache["a"] = x
        return self.b(x)


class History(Two):
    def __init__(self) -> None:
        super().__init__()
        self.history: list[torch.Tensor] = []

    def forward(self, x):
        x = self.a(x)
        self.history.append(x)
        return self.b(x)


class PlainTensorInPlace(Two):
    def __init__(self) -> None:
        super().__init__()
        self.offset = torch.zeros(1)  # a plain attribute, not a buffer

    def forward(self, x):
        self.offset.add_(1)
        return self.b(self.a(x) + self.offset)


class NoGradGlue(Two):
    def forward(self, x):
        with torch.no_grad():  # autograd
            x = self.a(x)
        return self.b(x)


class NoGradForward(Two):
    @torch.no_grad()
    def forward(self, x):
        return self.b(self.a(x))


class InferenceGlue(Two):
    def forward(self, x):
        with torch.inference_mode():  # inference
            x = self.a(x)
        return self.b(x.clone())


class AutocastGlue(Two):
    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast
            x = self.a(x)
        return self.b(x.float())


class RootPreHook(Two):
    def __init__(self) -> None:
        super().__init__()
        self.register_forward_pre_hook(double_input)

    def forward(self, x):
        return self.b(self.a(x))


def double_input(module, args):
    return (args[0] * 2,)


class RootHook(Two):
    def __init__(self) -> None:
        super().__init__()
        self.register_forward_hook(negate_output)

    def forward(self, x):
        return self.b(self.a(x))


def negate_output(module, args, output):
    return -output


class IntOfTensor(Two):
    def forward(self, x):
        return self.b(self.a(x) * int(x.shape[0]))  # int


class SetsItem(Two):
    def forward(self, x):
        x = self.a(x)
        x[:, 0] = 0  # item
        return self.b(x)


class RangeOfTensor(Two):
    def forward(self, x):
        x = self.a(x)
        for _ in range(x.sum().long() % 3):  # range
            x = x + 1
        return self.b(x)


class FloatOfBuffer(Two):
    """What BN does with ``momentum=None``: a Python number read off a buffer, which fx would bake in."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.ones(()))

    def forward(self, x):
        return self.b(self.a(x) / float(self.seen))  # float


class SwitchesChildMode(Two):
    def forward(self, x):
        self.b.eval()  # flag
        x = self.b(self.a(x))
        self.b.train(self.training)
        return x


class RebindsThroughDict(Two):
    def __init__(self) -> None:
        super().__init__()
        self.factor = 1.0

    def forward(self, x):
        self.__dict__["factor"] = self.factor + 1.0
        return self.b(self.a(x) * self.factor)


class LayerDrop(Two):
    """Skips its last child at random in train mode: the graph would keep one draw."""

    def forward(self, x):
        x = self.a(x)
        if self.training and random.random() < 0.5:  # draws
            return x
        return self.b(x)


class NumpyLayerDrop(Two):
    def forward(self, x):
        x = self.a(x)
        if self.training and numpy.random.rand() < 0.5:  # draws
            return x
        return self.b(x)


class ImportedDraw(Two):
    """Draws through a name imported from `random`, which the trace cannot patch."""

    def forward(self, x):
        x = self.a(x)
        if self.training and draw() < 0.5:
            return x
        return self.b(x)


class UpdatesAfterTheCut(Two):
    """Reads a buffer before the cut at ``a`` and advances it after: the cut would never advance it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        x = self.b(self.a(x + self.steps))
        if self.training:
            self.steps.add_(1)  # after
        return x


class Stage(nn.Module):
    """A container whose forward sets an attribute of its child: the cut traces it at a dotted cut."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = ScaledConv()
        self.out = conv()

    def forward(self, x):
        self.inner.gain = 2.0  # sets
        return self.out(self.inner(x))


class Staged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stage = Stage()
        self.b = conv()

    def forward(self, x):
        return self.b(self.stage(x))


# -- roots the cut refuses once a value the graph holds no longer holds ------------------------------------
class Stem(nn.Module):
    """Leaves what it saw behind: the scale of its input and its spatial size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv()
        self.scale = 1.0
        self.hw: tuple[int, int] = (1, 1)

    def forward(self, x):
        self.scale = float(x.abs().max())
        self.hw = (x.shape[-2], x.shape[-1])
        return self.conv(x)


class DividesByStemScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = Stem()
        self.b = conv()

    def forward(self, x):
        return self.b(self.stem(x) / self.stem.scale)  # reads


class ResizesToStemSize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = Stem()
        self.b = conv()

    def forward(self, x):
        x = self.stem(x)
        return self.b(F.interpolate(x[..., ::2, ::2], size=self.stem.hw))  # reads


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    upto: str = "b"
    mode: str = "eval"
    # None: kept. Else the refusal: its message must contain each of these, and "marker" names the line.
    refused: tuple[str, ...] | None = None
    marker: str | None = None  # the comment on the line the refusal names
    when: str = "build"  # build | call: a refusal at the first call on a fresh input
    warm: bool = True  # the model runs once before the cut is made


KEPT = {
    "an in-place buffer update in train mode": Case(CountsSteps, mode="train"),
    "an in-place buffer update in eval mode (not run)": Case(CountsSteps),
    "arithmetic on the input's shape": Case(ShapeArithmetic),
    "an interpolation to the input's own size": Case(Resized),
    "a config attribute read as a constant": Case(ConfigAttribute),
    "a child that counts its own calls": Case(ChildKeepsState),
    "a pre-hook on a child": Case(ChildHook),
    "torch.no_grad inside a child": Case(ChildWithoutGrad),
    "a torch.jit.is_scripting branch": Case(ScriptingBranch),
    "a scripted child": Case(ScriptedChild),
    "an optional argument left at its default": Case(OptionalArgument),
    "a root counting steps in a buffer, cut before the last child": Case(CountsSteps, upto="a", mode="train"),
}

REFUSED = {
    "an attribute of a child set around its call": Case(
        SetsChildAttributeAroundCall, refused=("sets `b.gain`",), marker="# sets"
    ),
    "a call counter": Case(CountsCalls, refused=("sets `calls`",), marker="# sets"),
    "the input's shape kept in an attribute": Case(RemembersShape, refused=("sets `hw`",), marker="# sets"),
    "a child swapped in the forward": Case(SwapsChild, refused=("sets `b`",), marker="# sets"),
    "an attribute deleted in the forward": Case(
        DeletesAttribute, refused=("deletes `once`",), marker="# deletes", warm=False
    ),
    "a cache dict": Case(CacheDict, refused=("changes `cache` (what it holds)",)),
    "a list the forward appends to": Case(History, refused=("changes `history` (what it holds)",)),
    "a plain tensor changed in place": Case(PlainTensorInPlace, refused=("changes `offset` in place",)),
    "torch.no_grad in the root's forward": Case(
        NoGradGlue, refused=("switches autograd on or off",), marker="# autograd"
    ),
    "a forward decorated with torch.no_grad": Case(
        NoGradForward, refused=("switches autograd on or off (a decorator of the forward)",)
    ),
    "torch.inference_mode in the root's forward": Case(
        InferenceGlue, refused=("enters inference mode",), marker="# inference"
    ),
    "torch.autocast in the root's forward": Case(
        AutocastGlue, refused=("switches autocast",), marker="# autocast"
    ),
    "a forward pre-hook on the root": Case(
        RootPreHook, refused=("has a forward pre hook `double_input`",), marker="def double_input"
    ),
    "a forward hook on the root": Case(RootHook, refused=("has a forward hook `negate_output`",)),
    "int() of a tensor": Case(
        IntOfTensor, refused=("TypeError", "Python functions and conversions on a tensor"), marker="# int"
    ),
    "item assignment into a tensor": Case(
        SetsItem, refused=("item assignment into a tensor or its shape (`x[0] = v`",), marker="# item"
    ),
    "range() of a tensor": Case(
        RangeOfTensor, refused=("a tensor where Python needs an integer (`range(n)`",), marker="# range"
    ),
    "float() of a buffer": Case(
        FloatOfBuffer, refused=("Python functions and conversions on a tensor",), marker="# float"
    ),
    "a child switched to eval mode around its call": Case(
        SwitchesChildMode, refused=("sets `b.training`",), marker="# flag"
    ),
    "an attribute rebound through __dict__": Case(
        RebindsThroughDict, refused=("changes `factor` (rebinds it)",)
    ),
    "LayerDrop with Python's random": Case(
        LayerDrop, mode="train", refused=("calls `random.random()`",), marker="# draws"
    ),
    "LayerDrop with numpy's random": Case(
        NumpyLayerDrop, mode="train", refused=("calls `numpy.random.rand()`",), marker="# draws"
    ),
    "LayerDrop through a name imported from random": Case(
        ImportedDraw, mode="train", refused=("draws from `random`'s global generator",)
    ),
    "a buffer read before the cut and advanced after it": Case(
        UpdatesAfterTheCut,
        upto="a",
        refused=("in train mode", "updates `steps` in place", "after the cut at `a`"),
        marker="# after",
    ),
    "a container on a dotted cut setting its child's attribute": Case(
        Staged, upto="stage.inner", refused=("`Stage` (`stage`) sets `inner.gain`",), marker="# sets"
    ),
    "a child's scale left behind and read by the root": Case(
        DividesByStemScale, refused=("reads `stem.scale`", "when the cut was made and now holds"), when="call"
    ),
    "a child's spatial size left behind and read by the root": Case(
        ResizesToStemSize, refused=("reads `stem.hw`", "held (8, 8) when the cut was made"), when="call"
    ),
}


def _fresh_pair(case: Case) -> tuple[nn.Module, nn.Module]:
    """The model after one forward on the build input, and a deep copy to compare with."""
    model = case.build().train(case.mode == "train")
    if case.warm:
        with torch.no_grad():
            model(BUILD)
    return model, copy.deepcopy(model)


def _at(model: nn.Module, upto: str, x: torch.Tensor) -> torch.Tensor:
    if upto == list(dict(model.named_children()))[-1]:
        return model(x)
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(upto).register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[-1]


def _line(case: Case) -> str:
    assert case.marker is not None
    candidates = [Stage, case.build] if case.build is Staged else [case.build, double_input]
    for cls in candidates:
        source, first = inspect.getsourcelines(cls)
        for i, text in enumerate(source):
            if case.marker in text:
                return f"test_glue_state.py:{first + i}"
    raise AssertionError(f"no line marked {case.marker!r}")


@pytest.mark.parametrize("case", KEPT.values(), ids=KEPT.keys())
def test_a_stateful_root_is_kept_exactly_on_fresh_inputs_called_twice(case):
    model, reference = _fresh_pair(case)
    keep = featx.truncate(model, case.upto, keep_glue=True).train(case.mode == "train")
    for x in FRESH:
        with torch.no_grad():
            assert torch.equal(keep(x), _at(reference, case.upto, x))
        for name, buffer in model.named_buffers():  # the cut advances what the model would
            assert torch.equal(buffer, reference.get_buffer(name)), name


@pytest.mark.parametrize("case", REFUSED.values(), ids=REFUSED.keys())
def test_a_stateful_root_is_refused_naming_what_and_where(case, untouched):
    model, _ = _fresh_pair(case)
    if case.when == "build":
        with untouched(model), pytest.raises(FeatxError) as raised:
            featx.truncate(model, case.upto, keep_glue=True)
    else:
        keep = featx.truncate(model, case.upto, keep_glue=True).train(case.mode == "train")
        with torch.no_grad():
            keep(BUILD)  # the input it was built on: every value it holds still holds
            with pytest.raises(FeatxError) as raised:
                keep(FRESH[0])
    message = str(raised.value)
    assert "\n" not in message and message.startswith("keep_glue: ")
    for part in case.refused or ():
        assert part in message, message
    if case.marker is not None:
        assert _line(case) in message, message


@pytest.mark.parametrize("build", [LayerDrop, NumpyLayerDrop, ImportedDraw])
def test_a_refused_random_draw_leaves_the_global_generators_as_found(build):
    random.seed(7)
    numpy.random.seed(7)
    expected = random.random(), numpy.random.rand()
    random.seed(7)
    numpy.random.seed(7)
    with pytest.raises(FeatxError, match="random"):
        featx.truncate(build().train(), "b", keep_glue=True)
    assert (random.random(), numpy.random.rand()) == expected


def test_a_child_attribute_that_holds_its_build_value_is_kept():
    model, reference = _fresh_pair(Case(ResizesToStemSize))
    keep = featx.truncate(model, "b", keep_glue=True).eval()
    x = torch.randn(3, 3, 8, 8)  # other values and batch, the size it was built with
    with torch.no_grad():
        assert torch.equal(keep(x), reference(x))
        assert torch.equal(keep(x), reference(x))


def test_a_root_attribute_changed_after_the_cut_is_refused_at_the_next_call():
    model = ConfigAttribute().eval()
    keep = featx.truncate(model, "b", keep_glue=True).eval()
    model.factor = 3.0
    with pytest.raises(
        FeatxError, match=r"reads `factor` \(test_glue_state.py:\d+\), which held 2.5 .* now holds 3.0"
    ):
        keep(BUILD)


class ClassAttribute(Two):
    """A plain value in the class body, read through ``self``: an instance attribute set later overrides it."""

    factor = 2.5

    def forward(self, x):
        return self.b(self.a(x) * self.factor)


def test_a_class_attribute_overridden_after_the_cut_is_refused_at_the_next_call():
    model = ClassAttribute().eval()
    keep = featx.truncate(model, "b", keep_glue=True).eval()
    with torch.no_grad():
        assert torch.equal(keep(FRESH[0]), model(FRESH[0]))
    model.factor = 3.0
    with pytest.raises(
        FeatxError, match=r"reads `factor` \(test_glue_state.py:\d+\), which held 2.5 .* now holds 3.0"
    ):
        keep(BUILD)


def test_an_optional_argument_at_another_value_is_refused_naming_it():
    keep = featx.truncate(OptionalArgument().eval(), "b", keep_glue=True).eval()
    with pytest.raises(
        FeatxError, match=r"argument `scale` is 2, but the cut at `b` was traced with `scale=None`"
    ):
        keep(BUILD, scale=2)


def test_an_optional_argument_given_at_its_default_is_accepted():
    model = OptionalArgument().eval()
    keep = featx.truncate(model, "b", keep_glue=True).eval()
    with torch.no_grad():
        assert torch.equal(keep(BUILD, scale=None), model(BUILD))
        assert torch.equal(keep(BUILD, None), model(BUILD))


def test_an_argument_the_forward_does_not_take_is_refused_naming_the_accepted_ones():
    keep = featx.truncate(OptionalArgument().eval(), "b", keep_glue=True).eval()
    with pytest.raises(
        FeatxError, match=r"takes the arguments of the forward of `OptionalArgument` \(`x`, `scale`\)"
    ):
        keep(BUILD, size=2)


class ModeArgument(nn.Module):
    """A container whose caller passes it the root's mode as an argument (``train=self.training``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = conv()
        self.b = conv()

    def forward(self, x, train: bool = False):
        x = self.a(x)
        if train:
            x = x * 2
        return self.b(x)


class PassesItsMode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = ModeArgument()
        self.head = conv()

    def forward(self, x):
        return self.head(self.blocks(x, train=self.training))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_container_given_an_argument_per_mode_is_kept_in_each_mode(mode):
    model = PassesItsMode().train(mode == "train")
    keep = featx.truncate(model, "blocks.b", keep_glue=True)
    with torch.no_grad():
        for training in (mode == "train", mode != "train"):  # as it comes back, then switched
            keep.train(training)
            assert torch.equal(keep(FRESH[0]), model.blocks(FRESH[0], train=training))


# -- real models: tracing leaves every buffer as found, and the cut runs the buffer updates ------------------
@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_050"])
def test_a_dotted_cut_inside_batchnormact_leaves_every_buffer_as_found(name, untouched):
    model = timm.create_model(name, pretrained=False)
    with untouched(model):
        featx.truncate(model, "bn1.act", keep_glue=True)
    assert int(model.bn1.num_batches_tracked) == 0


def test_the_cut_inside_batchnormact_advances_num_batches_tracked_as_the_model_does():
    model = timm.create_model("mobilenetv3_small_050", pretrained=False).train()
    reference = copy.deepcopy(model)
    keep = featx.truncate(model, "bn1.act", keep_glue=True).train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(keep(x), _at(reference, "bn1", x))
    assert int(model.bn1.num_batches_tracked) == int(reference.bn1.num_batches_tracked) == 2
    assert torch.equal(model.bn1.running_mean, reference.bn1.running_mean)


def test_hiera_cut_at_patch_embed_proj_takes_the_mask_keyword():
    model = timm.create_model("hiera_tiny_224", pretrained=False, img_size=64).eval()
    keep = featx.truncate(model, "patch_embed.proj", keep_glue=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(keep(x), _at(model, "patch_embed.proj", x))


# -- the property: generated roots, some writing state, are left as found and kept or refused -------------
class Stateful(Planted):
    """``Planted`` with glue kinds that write state."""

    def __init__(self, children: list[ChildPlan], glue: list[GluePlan]) -> None:
        super().__init__(children, glue)
        self.calls = 0
        self.cache: dict[int, torch.Tensor] = {}

    def apply_glue(self, g: GluePlan, x, outputs):
        if g.kind == "count_calls":
            self.calls += 1
            return x
        if g.kind == "set_child_attribute":
            self.c0.seen = True
            return x
        if g.kind == "cache":
            self.cache[g.boundary] = x
            return x
        return super().apply_glue(g, x, outputs)


STATEFUL = ["count_calls", "set_child_attribute", "cache"]


@st.composite
def stateful_plans(draw) -> tuple[list[ChildPlan], list[GluePlan]]:
    children, glue = draw(plans())
    for _ in range(draw(st.integers(0, 2))):
        glue.append(GluePlan(draw(st.integers(0, len(children))), draw(st.sampled_from(STATEFUL))))
    return children, glue


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],  # a pure context
)
@given(plan=stateful_plans(), seed=st.integers(0, 2**16), cut=st.integers(1, 12))
def test_keep_glue_leaves_generated_roots_as_found_and_keeps_or_refuses_their_state(
    plan, seed, cut, untouched
):
    children, glue = plan
    torch.manual_seed(seed)
    model = Stateful(children, glue).eval()
    upto = f"c{min(cut, len(children)) - 1}"
    writes = any(g.kind in STATEFUL for g in glue)
    with untouched(model):
        try:
            keep = featx.truncate(model, upto, keep_glue=True)
        except FeatxError as err:
            assert writes, str(err)
            return
    assert not writes
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(
            keep.eval()(x.clone()), _at(copy.deepcopy(model), upto, x.clone())
        )  # glue may add_ to x


assert set(GLUE).isdisjoint(STATEFUL)


@pytest.mark.parametrize(
    ("how", "named"),
    [
        ("rebind, then put back", "sets `b.factor` (test_verify.py:"),
        ("rebind, left changed", "sets `b.factor` (test_verify.py:"),
        ("item written in place", "changes `b.settings` (what it holds)"),
    ],
)
def test_verify_and_sweep_with_keep_glue_refuse_a_root_setting_a_childs_state(how, named, untouched):
    model, x = SetsScale(how), torch.randn(2, 4)
    with untouched(model):
        for run in (featx.verify, featx.sweep):
            with pytest.raises(FeatxError, match=r"^keep_glue: the forward of `SetsScale` ") as raised:
                run(model, *(["b"] if run is featx.verify else []), x, keep_glue=True)
            assert named in str(raised.value)
