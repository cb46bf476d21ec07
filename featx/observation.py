"""Observing a forward: every module call of one eval-mode run at an input size (shapes only, on meta
tensors where the model allows), and from two sizes each module's output measured as a tap candidate
(``TapCandidate``: shape, layout, channels, exact stride). ``featx.discovery`` builds on it."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from featx.errors import FeatxError, one_line

LAYOUTS = ("NCHW", "NHWC", "tokens", "vector", "other")

# How much the second observed run grows the input's H and W: multiples of every power-of-two stride up to
# 128, and different from each other so a dim that follows H is told from one that follows W (as
# ``featx.backbone.taps`` measures).
GROW = (128, 256)


def grow_by(smallest: int, height: int, width: int, cap: float = math.inf) -> tuple[int, int]:
    """How much a second run grows the input's height and width: ``GROW`` scaled by a power of two so that
    it is a multiple of every power-of-two stride an output could have. A map of ``n`` rows (``ceil(H /
    stride)``, n >= 2) has a stride below ``2 * H / n``, so the ``smallest`` dim of any output bounds them
    all; ``cap`` bounds the growth (a run that large is no longer cheap)."""
    bound = 2 * max(height, width) / max(smallest, 1)
    scale = 1
    while GROW[0] * scale < min(bound, cap):
        scale *= 2
    return GROW[0] * scale, GROW[1] * scale


def divides(size: tuple[int, int], h: int, w: int) -> int | None:
    """The one stride that makes ``h`` x ``w`` of an input of ``size`` exactly, if one does."""
    if h < 1 or w < 1 or size[0] % h or size[1] % w or size[0] // h != size[1] // w:
        return None
    return size[0] // h


@contextlib.contextmanager
def quiet_fake_tensors() -> Iterator[None]:
    """torch's fake-tensor logger off: it logs a traceback for every op whose meta kernel fails (a shape
    mismatch a later run reports in one line)."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    was = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = was


@dataclass(frozen=True)
class TapCandidate:
    """One module whose output could be tapped: measured at the first input size, with its layout, exact
    stride (None where the output is not a map of the input), and whether a cut there is faithful
    (``faithful``: None when not checked), needs keep_glue, or is refused (``reason``)."""

    name: str
    shape: tuple[int, ...] | None
    channels: int | None
    stride: int | None
    layout: str
    faithful: bool | None = None
    keep_glue: bool | None = None  # None: not checked
    reason: str | None = None
    calls: int = 1

    @property
    def verdict(self) -> str:
        """``plain``, ``keep_glue``, ``refused`` or ``unchecked``."""
        if self.faithful is None:
            return "unchecked"
        if not self.faithful:
            return "refused"
        return "keep_glue" if self.keep_glue else "plain"

    def to_dict(self) -> dict[str, object]:
        """``{"name", "channels", "stride", "shape", "layout", "faithful", "keep_glue", "reason"}``: an entry
        of ``featx taps --json``'s ``taps`` (docs/json.md)."""
        return {
            "name": self.name,
            "channels": self.channels,
            "stride": self.stride,
            "shape": None if self.shape is None else list(self.shape),
            "layout": self.layout,
            "faithful": self.faithful,
            "keep_glue": self.keep_glue,
            "reason": self.reason,
        }


# --- observing one forward --------------------------------------------------------------------------


@dataclass
class Call:
    name: str
    order: int  # when the call began
    inputs: tuple[torch.Tensor, ...]
    input_version: int = -1  # the first input's version counter when the call began
    output: Any = None
    output_version: int = -1  # the output's version counter when the call returned
    end: int = -1  # when it returned


@dataclass
class Observation:
    calls: dict[str, list[Call]]  # module name -> its calls, in order
    ended: list[str]  # module names in the order their calls returned (first call each)


def on_meta(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> Any:
    """``model``'s output on a meta input of ``shape``, its parameters and buffers swapped for meta ones for
    the call: only shapes are computed, at a cost that does not grow with the input. Raises what the model
    raises where a module cannot run on meta (a tensor attribute that is not a buffer)."""
    from torch.func import functional_call

    swapped = {
        name: torch.empty_like(t, device="meta")
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
    }
    return functional_call(model, swapped, (torch.empty(shape, device="meta", dtype=dtype),))


def observe(model: nn.Module, shape: tuple[int, ...], label: str) -> Observation:
    """Every module call of one eval-mode forward at ``shape``. Only shapes are needed, so the forward runs
    on meta tensors where the model allows (its parameters and buffers swapped for meta ones for the call:
    no kernel runs and the cost does not grow with the input), else on fake tensors, else on a seeded real
    input. The modules' modes are restored afterwards."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    modes = {m: m.training for m in model.modules()}
    names = {id(m): n for n, m in model.named_modules() if n}
    calls: dict[str, list[Call]] = {}
    ended: list[str] = []
    clock = [0]
    stack: list[Call] = []

    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        name = names[id(module)]
        inputs = tuple(a for a in args if isinstance(a, torch.Tensor))
        call = Call(name, clock[0], inputs, inputs[0]._version if inputs else -1)
        clock[0] += 1
        calls.setdefault(name, []).append(call)
        stack.append(call)

    def post(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        call = stack.pop()
        call.output = output
        out = output_tensor(output)
        call.output_version = out._version if out is not None else -1
        call.end = clock[0]
        clock[0] += 1
        if len(calls[call.name]) == 1:
            ended.append(call.name)

    handles = []
    for module in model.modules():
        if id(module) in names:
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
    try:
        model.eval()
        with torch.no_grad(), quiet_fake_tensors():  # torch logs each op meta cannot run; the run is retried
            try:  # meta tensors: the model's own weights swapped for shapes, no kernel runs (cheapest)
                on_meta(model, shape, dtype)
            except Exception:
                _forget(calls, ended, stack)
                try:  # fake tensors: what meta cannot run (a tensor attribute that is not a buffer)
                    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                        model(mode.from_tensor(torch.empty(shape, device="meta")).to(device, dtype))
                except Exception:
                    _forget(calls, ended, stack)
                    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
                    model(x)
    except Exception as err:
        raise FeatxError(
            f"`{label}` does not run on an input of shape {list(shape)}: {type(err).__name__}: "
            f"{one_line(err)}; give --input-shape (Python: input_shape=) a size it takes{_fixed_size(model)}"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return Observation(calls, ended)


def _forget(calls: dict[str, list[Call]], ended: list[str], stack: list[Call]) -> None:
    """Drop what a failed attempt recorded before the next one runs."""
    calls.clear()
    ended.clear()
    stack.clear()


def _fixed_size(model: nn.Module) -> str:
    """For a timm token model built for one input size: which, and how to build it for another."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or getattr(model.patch_embed, "dynamic_img_size", False)
    ):
        return ""
    return f" (it was built for {size[0]}x{size[1]} only; for another size build it with --model-kwarg img_size=N)"


def growth(first: Observation, height: int, width: int) -> tuple[int, int]:
    """``grow_by`` for an observed forward: bounded by the smallest dim of any output (1x1 pooled maps left
    out)."""
    sizes = [
        n
        for call_list in first.calls.values()
        for out in [output_tensor(call_list[0].output)]
        if out is not None and out.dim() >= 3
        for n in out.shape[1:]
        if n > 1
    ]
    return grow_by(min(sizes, default=1), height, width, cap=4096)


def output_tensor(output: Any) -> torch.Tensor | None:
    """A module's output tensor: the tensor itself, or the first of a tuple or list (timm's blocks that
    return (x, aux))."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


# --- measuring ----------------------------------------------------------------------------------------


def measured(
    model: nn.Module,
    first: Observation,
    second: Observation | None,
    shape: tuple[int, ...],
    grow: tuple[int, int],
) -> dict[str, TapCandidate]:
    """Each called module's candidate, in the order its first call returned."""
    found: dict[str, TapCandidate] = {}
    patch, prefix = _token_geometry(model)
    for name in first.ended:
        out = output_tensor(first.calls[name][0].output)
        calls = len(first.calls[name])
        if out is None:
            found[name] = TapCandidate(name, None, None, None, "other", calls=calls)
            continue
        again = None
        if second is not None and name in second.calls:
            again = output_tensor(second.calls[name][0].output)
        size = (shape[2], shape[3])
        layout, stride = _layout(list(out.shape), None if again is None else list(again.shape), size, grow)
        if layout == "tokens" and stride is None:
            stride = _token_stride(list(out.shape), size, patch, prefix)
        channels = _channels(list(out.shape), layout)
        found[name] = TapCandidate(name, tuple(out.shape), channels, stride, layout, calls=calls)
    return found


def measure_odd_strides(
    model: nn.Module,
    first: Observation,
    second: Observation,
    shape: tuple[int, ...],
    grow: tuple[int, int],
    candidates: dict[str, TapCandidate],
    label: str,
) -> None:
    """Maps whose size does not change by growth / stride for a power-of-two stride (a stride of 3, 6, 14)
    measured again at a third size, grown by a multiple of every such stride: exact there, or no stride."""
    estimates = {}
    for name, c in candidates.items():
        if c.layout in ("NCHW", "NHWC") and c.stride is None and c.shape is not None:
            again = output_tensor(second.calls[name][0].output) if name in second.calls else None
            h = 2 if c.layout == "NCHW" else 1
            if again is not None and again.shape[h] > c.shape[h]:
                estimates[name] = max(1, round(grow[0] / (again.shape[h] - c.shape[h])))
    if not estimates:
        return
    factor = 1
    for estimate in set(estimates.values()):
        factor = factor * estimate // math.gcd(factor, estimate)
    if factor > 64:  # a growth that large is no longer a cheap run; such maps keep no stride
        return
    wider = (grow[0] * factor, grow[1] * factor)
    try:
        third = observe(model, (*shape[:2], shape[2] + wider[0], shape[3] + wider[1]), label)
    except FeatxError:
        return
    for name in estimates:
        c = candidates[name]
        out = output_tensor(third.calls[name][0].output) if name in third.calls else None
        if out is None or c.shape is None:
            continue
        layout, stride = _layout(list(c.shape), list(out.shape), (shape[2], shape[3]), wider)
        if layout == c.layout and stride is not None:
            candidates[name] = dataclasses.replace(c, stride=stride)


def _layout(
    shape: list[int], again: list[int] | None, size: tuple[int, int], grow: tuple[int, int]
) -> tuple[str, int | None]:
    """The layout of an output and its exact stride (None when not a map of the input)."""
    if len(shape) == 2:
        return "vector", None
    if again is None:  # one size only: a layout where the sizes divide the input by one stride
        if len(shape) == 4:
            nchw, nhwc = divides(size, shape[2], shape[3]), divides(size, shape[1], shape[2])
            if nchw is not None and nhwc is None:
                return "NCHW", nchw
            if nhwc is not None and nchw is None:
                return "NHWC", nhwc
            return "other", None
        return ("tokens", None) if len(shape) == 3 else ("other", None)
    changed = [d for d in range(1, len(shape)) if len(again) == len(shape) and shape[d] != again[d]]
    if len(shape) == 4 and changed in ([2, 3], [1, 2]):
        layout = "NCHW" if changed == [2, 3] else "NHWC"
        h, w = changed
        steps = (again[h] - shape[h], again[w] - shape[w])
        strides = {g / step for g, step in zip(grow, steps, strict=True) if step}
        if len(strides) == 1:
            (stride,) = strides
            if stride >= 1 and stride.is_integer():
                return layout, int(stride)
        return layout, None
    if len(shape) == 3 and changed == [1]:
        grown = (size[0] + grow[0]) * (size[1] + grow[1]) - size[0] * size[1]
        step = again[1] - shape[1]
        if step > 0 and grown % step == 0:
            square = grown // step
            stride = round(square**0.5)
            if stride * stride == square:
                return "tokens", stride
        return "tokens", None
    if len(shape) == 4 and not changed:
        return "other", None  # pooled to a fixed size (adaptive pooling): no stride
    return "other", None


def _token_geometry(model: nn.Module) -> tuple[int | None, int]:
    """A timm token model's patch size and number of prefix tokens (class, registers, distillation)."""
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if isinstance(patch, (tuple, list)):
        patch = patch[0] if len(set(patch)) == 1 else None
    prefix = getattr(model, "num_prefix_tokens", 0)
    return (patch if isinstance(patch, int) else None), (prefix if isinstance(prefix, int) else 0)


def _token_stride(shape: list[int], size: tuple[int, int], patch: int | None, prefix: int) -> int | None:
    """The stride of tokens at one input size: the patch size, when the tokens past the prefix are the
    patch grid of the input, or the tokens are the grid alone (CaiT appends its class token after the
    blocks, ConViT after its local blocks)."""
    if patch is None or size[0] % patch or size[1] % patch:
        return None
    grid = (size[0] // patch) * (size[1] // patch)
    return patch if shape[1] in (grid + prefix, grid) else None


def _channels(shape: list[int], layout: str) -> int | None:
    if layout in ("NCHW", "vector"):
        return shape[1]
    if layout in ("NHWC", "tokens"):
        return shape[-1]
    return None
