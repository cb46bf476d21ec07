"""Tap discovery: every module of a backbone whose output a detection or segmentation head could tap, measured,
and the multi-scale pyramid such heads use (``featx.taps``).

One observed forward per input size (meta or fake tensors where the model allows: shapes only, nothing
runs) records, for every module call, its input and output tensors. From two input sizes each output gets its layout and an
exact stride, as ``featx.backbone.taps`` measures a backbone's outputs: between the runs the input's H and W
grow by multiples of every power-of-two stride up to 128, so a map's size changes by exactly growth / stride.

The **trunk** is read from the same calls. A container is a *chain* when the forward that ran fed its first
child the container's input, each next child the previous child's output, and returned the last child's
output (``nn.Sequential``, timm's ``ConvNeXtStage``; not a ``Bottleneck``, whose residual add is its own
forward's). A *trunk container* is a chain that holds repeated blocks: two children of one class that has
children of its own (``layer1``'s ``Bottleneck`` s, timm's ``stages``, ``blocks``), or a single such block
(``s1`` of a RegNet of depth 1); where a model has no such container (VGG's ``features``: convolutions and
ReLUs), chains of repeated leaf modules count. The trunk blocks are the children of trunk containers, a child
that holds a trunk of its own replaced by its blocks, in the order they ran; a container of stages of one class
(davit's ``stages``, depths 1, 1, 3, 1) keeps a stage of a single block as one block, and a container the parent
iterates without calling it (``for stage in self.stages``) is a chain when its children feed each other. A pyramid level is the last
trunk block whose output is at a stride (Identity modules skipped), named by the outermost chain that ends in
it and holds only blocks at that stride (``layer1``, not ``layer1.2``; ``blocks.6``, not ``blocks``). So the
stem, and the head after the trunk (EfficientNet's ``conv_head``/``bn2``), are never levels. A trunk at one
stride (a ViT's blocks) gives four evenly spaced blocks (12 blocks: 2, 5, 8, 11), as ViTDet and mmsegmentation
tap them.

Whether a cut at each candidate is faithful comes from ``featx.sweep`` at the candidates' depth, plain and with
keep_glue: ``plain`` (a Sequential of the kept children computes the value), ``keep_glue`` (only a keep_glue
cut does), or refused (the reason: the keep_glue sweep's, else the plain one's).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from featx.errors import FeatxError, one_line

if TYPE_CHECKING:
    from featx.report import Report

LAYOUTS = ("NCHW", "NHWC", "tokens", "vector", "other")

# containers that say nothing of what their children are: a child of one of these is a stage only beside others
_GENERIC = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

# How much the second observed run grows the input's H and W: multiples of every power-of-two stride up to
# 128, and different from each other so a dim that follows H is told from one that follows W (as
# ``featx.backbone.taps`` measures).
_GROW = (128, 256)


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


@dataclass(frozen=True)
class Level:
    """One level of the proposed pyramid: the tapped module, its channels and stride, and the trunk block
    whose output it is (``block``; the same as ``name`` unless a stage ends in it)."""

    name: str
    channels: int
    stride: int
    block: str
    faithful: bool | None = (
        None  # a cut there computes the full model's value (plain or keep_glue); None: unchecked
    )
    keep_glue: bool | None = None  # only with keep_glue; None: unchecked
    reason: str | None = None  # why no cut there is faithful

    def to_dict(self) -> dict[str, object]:
        """``{"name", "channels", "stride", "faithful", "keep_glue", "reason"}``: an entry of ``featx taps
        --json``'s ``pyramid``."""
        return {
            "name": self.name,
            "channels": self.channels,
            "stride": self.stride,
            "faithful": self.faithful,
            "keep_glue": self.keep_glue,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Taps:
    """What ``featx.taps`` found: every candidate in execution order, the trunk blocks, the proposed pyramid,
    and, for a timm model that declares them, timm's ``feature_info`` and how the pyramid differs from it."""

    model: str
    input_shape: tuple[int, ...]
    depth: int
    taps: tuple[TapCandidate, ...]
    trunk: tuple[str, ...]
    pyramid: tuple[Level, ...]
    feature_info: tuple[Mapping[str, object], ...] | None = None
    differences: tuple[str, ...] = ()
    checked: bool = True
    notes: tuple[str, ...] = field(default=())

    def __getitem__(self, name: str) -> TapCandidate:
        for tap in self.taps:
            if tap.name == name:
                return tap
        raise KeyError(name)

    @property
    def keep_glue(self) -> bool:
        """Whether a backbone tapping the pyramid needs keep_glue (a level plain cuts do not compute)."""
        return any(level.keep_glue for level in self.pyramid)

    def config(self) -> dict[str, object]:
        """A backbone config (the keys of docs/config.md) tapping the pyramid: ``featx build`` builds it and
        ``featx check`` proves it. The model itself, its weights and kwargs are the caller's to add."""
        if not self.pyramid:
            raise FeatxError(f"`{self.model}` has no pyramid to write as a config: {self.why_no_pyramid()}")
        if any(level.faithful is None for level in self.pyramid):  # keep_glue or not: unknown, so no config
            raise FeatxError(
                f"the pyramid of `{self.model}` was not checked (check=False), so whether it needs keep_glue is "
                "not known; featx.taps(..., check='pyramid') checks its levels alone"
            )
        refused = [level for level in self.pyramid if not level.faithful]
        if refused:
            raise FeatxError(
                f"the pyramid of `{self.model}` has a level no cut computes faithfully (`{refused[0].name}`: "
                f"{refused[0].reason}); name the taps yourself"
            )
        largest = max(level.stride for level in self.pyramid)
        height, width = self.input_shape[2:]
        if height % largest or width % largest:
            up = f"{-(-height // largest) * largest}x{-(-width // largest) * largest}"
            raise FeatxError(
                f"input {height}x{width} is not a multiple of {largest}, the pyramid's largest stride: a config "
                f"checked at it would not line up; measure at a multiple (such as {up})"
            )
        strides = [level.stride for level in self.pyramid]
        outputs: object = [level.name for level in self.pyramid]  # a single-stride trunk: named by module
        if len(set(strides)) == len(strides) and all(s & (s - 1) == 0 for s in strides):
            # C2..C5 at strides 4..32, as the FPN paper and detection configs name them
            outputs = {
                f"C{s.bit_length() - 1}": level.name for s, level in zip(strides, self.pyramid, strict=True)
            }
        cfg: dict[str, object] = {"upto": self.pyramid[-1].name, "outputs": outputs}
        if self.keep_glue:
            cfg["keep_glue"] = True
        cfg["verify"] = {"input_shape": list(self.input_shape)}
        return cfg

    def why_no_pyramid(self) -> str:
        if not any(t.stride for t in self.taps):
            return "no module returns a map of the input (an NCHW, NHWC or token map whose size follows it)"
        if not self.trunk:
            return (
                "featx found no trunk (a container whose forward runs repeated blocks one after another); "
                "name the taps yourself"
            )
        return "no trunk block returns a map of the input"

    def to_dict(self) -> dict[str, object]:
        """The ``featx taps --json`` document (docs/json.md)."""
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "depth": self.depth,
            "checked": self.checked,
            "taps": [tap.to_dict() for tap in self.taps],
            "trunk": list(self.trunk),
            "pyramid": [level.to_dict() for level in self.pyramid],
            "feature_info": None if self.feature_info is None else [dict(f) for f in self.feature_info],
            "differences": list(self.differences),
        }

    def __str__(self) -> str:
        from featx.render.taps_text import render_taps

        return render_taps(self)


def taps(
    model: nn.Module | str,
    input_shape: Sequence[int] | None = None,
    *,
    depth: int | None = None,
    check: bool | str = True,
    seed: int = 0,
    leaf_functions: Sequence[Callable[..., Any]] = (),
    label: str | None = None,
) -> Taps:
    """Every tap candidate of ``model`` and its proposed pyramid, measured (``Taps``).

    ``input_shape`` (batch included) defaults to the model's own size; a second run at a larger size gives
    each stride exactly. ``depth`` limits the candidates to modules that many levels below the root (default:
    deep enough to reach every trunk block). With ``check=True`` (default) each candidate's cut is swept plain
    and with keep_glue in eval and train mode (``featx.sweep``) for its verdict, and so is each pyramid level;
    ``check="pyramid"`` checks the levels alone (what ``Taps.config()`` needs), ``check=False`` nothing
    (verdicts are None).
    ``leaf_functions`` are the functions keep_glue's traces keep whole, as ``verify`` takes them.

    Raises:
        FeatxError: the model has no children, does not run at ``input_shape``, or returns no map at all.
    """
    from featx.verification import _model, example

    model, label = _model(model, label)
    if check not in (True, False, "pyramid"):
        raise FeatxError(f"check {check!r} is not a check; accepted: True, False, 'pyramid'")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise FeatxError(f"depth {depth!r} is not a depth; accepted: an int >= 1 (1: the root's children)")
    x = example(model, None, seed, input_shape, label=label)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise FeatxError(
            f"input shape {list(getattr(x, 'shape', []))} is not an image batch (N, C, H, W); featx measures "
            "each tap's stride against the input's H and W"
        )
    shape = tuple(x.shape)
    first = _observe(model, shape, label)
    grow = _growth(first, shape[2], shape[3])
    other = (*shape[:2], shape[2] + grow[0], shape[3] + grow[1])
    try:
        second: _Observation | None = _observe(model, other, label)
    except FeatxError:
        second = None  # a model with a fixed input size: strides from one size and the model's attributes
    candidates = _measured(model, first, second, shape, grow)
    if second is not None:
        _measure_odd_strides(model, first, second, shape, grow, candidates, label)
    trunk = _trunk(model, first)
    if depth is None:
        depth = max((name.count(".") + 1 for name in trunk), default=1)
    names = [name for name in candidates if name.count(".") < depth]
    if not any(c.stride for c in candidates.values()):
        raise FeatxError(
            f"`{label}` returns no map of the input at any module (input {list(shape)}): featx taps NCHW, "
            "NHWC and token maps whose size follows the input's H and W"
        )
    verdicts: dict[str, tuple[bool, bool, str | None]] = {}
    if check is True:
        verdicts = _verdicts(model, x, depth, seed, leaf_functions, label)
    by_name = {c.name: c for c in candidates.values()}
    pyramid = _pyramid(model, first, trunk, by_name)
    if check:  # every level, also one the listed depth does not reach
        unchecked = [level.name for level in pyramid if level.name not in verdicts]
        if unchecked:
            verdicts |= _cut_verdicts(model, x, unchecked, seed, leaf_functions, label)
        pyramid = [
            dataclasses.replace(
                level,
                faithful=verdicts[level.name][0],
                keep_glue=verdicts[level.name][1],
                reason=verdicts[level.name][2],
            )
            for level in pyramid
        ]
    listed = []
    for name in names:
        c = candidates[name]
        if name in verdicts:
            faithful, keep_glue, reason = verdicts[name]
            c = TapCandidate(
                c.name, c.shape, c.channels, c.stride, c.layout, faithful, keep_glue, reason, c.calls
            )
        listed.append(c)
    info = _feature_info(model)
    return Taps(
        label,
        shape,
        depth,
        tuple(listed),
        tuple(trunk),
        tuple(pyramid),
        info,
        _differences(pyramid, info),
        check is True,
    )


# --- observing one forward --------------------------------------------------------------------------


@dataclass
class _Call:
    name: str
    order: int  # when the call began
    inputs: tuple[torch.Tensor, ...]
    input_version: int = -1  # the first input's version counter when the call began
    output: Any = None
    output_version: int = -1  # the output's version counter when the call returned
    end: int = -1  # when it returned


@dataclass
class _Observation:
    calls: dict[str, list[_Call]]  # module name -> its calls, in order
    ended: list[str]  # module names in the order their calls returned (first call each)


def _observe(model: nn.Module, shape: tuple[int, ...], label: str) -> _Observation:
    """Every module call of one eval-mode forward at ``shape``. Only shapes are needed, so the forward runs
    on meta tensors where the model allows (its parameters and buffers swapped for meta ones for the call:
    no kernel runs and the cost does not grow with the input), else on fake tensors, else on a seeded real
    input. The modules' modes are restored afterwards."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call

    from featx.backbone.taps import quiet_fake_tensors

    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    modes = {m: m.training for m in model.modules()}
    names = {id(m): n for n, m in model.named_modules() if n}
    calls: dict[str, list[_Call]] = {}
    ended: list[str] = []
    clock = [0]
    stack: list[_Call] = []

    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        name = names[id(module)]
        inputs = tuple(a for a in args if isinstance(a, torch.Tensor))
        call = _Call(name, clock[0], inputs, inputs[0]._version if inputs else -1)
        clock[0] += 1
        calls.setdefault(name, []).append(call)
        stack.append(call)

    def post(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        call = stack.pop()
        call.output = output
        out = _tensor(output)
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
                model_on_meta = {
                    name: torch.empty_like(t, device="meta")
                    for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
                }
                functional_call(model, model_on_meta, (torch.empty(shape, device="meta", dtype=dtype),))
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
    return _Observation(calls, ended)


def _forget(calls: dict[str, list[_Call]], ended: list[str], stack: list[_Call]) -> None:
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


def _growth(first: _Observation, height: int, width: int) -> tuple[int, int]:
    """``_GROW`` scaled by a power of two so that it is a multiple of every stride an output could have
    (as ``featx.backbone.taps._growth``)."""
    sizes = [
        n
        for call_list in first.calls.values()
        for out in [_tensor(call_list[0].output)]
        if out is not None and out.dim() >= 3
        for n in out.shape[1:]
        if n > 1
    ]
    smallest = min(sizes, default=1)
    bound = 2 * max(height, width) / max(smallest, 1)
    scale = 1
    while _GROW[0] * scale < min(bound, 4096):
        scale *= 2
    return _GROW[0] * scale, _GROW[1] * scale


def _tensor(output: Any) -> torch.Tensor | None:
    """A module's output tensor: the tensor itself, or the first of a tuple or list (timm's blocks that
    return (x, aux))."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


# --- measuring ----------------------------------------------------------------------------------------


def _measured(
    model: nn.Module,
    first: _Observation,
    second: _Observation | None,
    shape: tuple[int, ...],
    grow: tuple[int, int],
) -> dict[str, TapCandidate]:
    """Each called module's candidate, in the order its first call returned."""
    found: dict[str, TapCandidate] = {}
    patch, prefix = _token_geometry(model)
    for name in first.ended:
        out = _tensor(first.calls[name][0].output)
        calls = len(first.calls[name])
        if out is None:
            found[name] = TapCandidate(name, None, None, None, "other", calls=calls)
            continue
        again = None
        if second is not None and name in second.calls:
            again = _tensor(second.calls[name][0].output)
        size = (shape[2], shape[3])
        layout, stride = _layout(list(out.shape), None if again is None else list(again.shape), size, grow)
        if layout == "tokens" and stride is None:
            stride = _token_stride(list(out.shape), size, patch, prefix)
        channels = _channels(list(out.shape), layout)
        found[name] = TapCandidate(name, tuple(out.shape), channels, stride, layout, calls=calls)
    return found


def _measure_odd_strides(
    model: nn.Module,
    first: _Observation,
    second: _Observation,
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
            again = _tensor(second.calls[name][0].output) if name in second.calls else None
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
        third = _observe(model, (*shape[:2], shape[2] + wider[0], shape[3] + wider[1]), label)
    except FeatxError:
        return
    for name in estimates:
        c = candidates[name]
        out = _tensor(third.calls[name][0].output) if name in third.calls else None
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
            nchw, nhwc = _divides(size, shape[2], shape[3]), _divides(size, shape[1], shape[2])
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


def _divides(size: tuple[int, int], h: int, w: int) -> int | None:
    if h < 1 or w < 1 or size[0] % h or size[1] % w or size[0] // h != size[1] // w:
        return None
    return size[0] // h


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


# --- the trunk and its pyramid ------------------------------------------------------------------------


def _children(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    module = model.get_submodule(name) if name else model
    return [(f"{name}.{n}" if name else n, child) for n, child in module.named_children()]


def _is_chain(model: nn.Module, obs: _Observation, name: str) -> bool:
    """Whether the container ``name`` ran as a chain: each of its children called once, the first fed the
    container's input, each next the previous one's output, and the container returned the last's output
    (a container the root iterates without calling it, a ModuleList, needs only the children's chain)."""
    children = [n for n, _ in _children(model, name)]
    if not children or any(len(obs.calls.get(c, ())) != 1 for c in children):
        return False
    ran = sorted(children, key=lambda c: obs.calls[c][0].order)
    if ran != children:
        return False
    if not all(_feeds(obs.calls[a][0], obs.calls[b][0]) for a, b in itertools.pairwise(ran)):
        return False
    own = obs.calls.get(name)
    if own is None:
        return bool(name)  # iterated by its parent (`for stage in self.stages`): its children's chain is all
    if len(own) != 1:
        return False
    first, last = obs.calls[ran[0]][0], obs.calls[ran[-1]][0]
    return (
        bool(first.inputs)
        and bool(own[0].inputs)
        and first.inputs[0] is own[0].inputs[0]
        and first.input_version == own[0].input_version
        and _tensor(own[0].output) is _tensor(last.output)
        and own[0].output_version == last.output_version  # no in-place add after it (`out += identity`)
    )


def _feeds(before: _Call, after: _Call) -> bool:
    """Whether ``after`` was fed exactly what ``before`` returned: the same tensor, not changed in place
    between the two calls."""
    out = _tensor(before.output)
    return (
        out is not None
        and bool(after.inputs)
        and after.inputs[0] is out
        and after.input_version == before.output_version
    )


def _is_block(module: nn.Module, leaves: bool) -> bool:
    """A module that can be a block of a trunk: one whose children hold parameters (a ``Bottleneck``, a
    ``Sequential`` of blocks; not timm's ``BatchNormAct2d``, whose children are its activation and dropout),
    or with ``leaves`` a leaf with parameters (VGG's convolutions)."""
    children = list(module.children())
    if leaves and not children:
        return any(True for _ in module.parameters(recurse=False))
    return any(True for child in children for _ in child.parameters())


def _repeated(model: nn.Module, obs: _Observation, name: str, leaves: bool) -> list[str] | None:
    """The children of ``name`` that make it hold repeated blocks: the called blocks of a class with two or
    more of them, or a single child block that is not a chain of its own; None when there are none."""
    children = [(c, m) for c, m in _children(model, name) if c in obs.calls]
    by_class: dict[type, list[str]] = {}
    for child, module in children:
        if _is_block(module, leaves):
            by_class.setdefault(type(module), []).append(child)
    repeated = [names for names in by_class.values() if len(names) >= 2]
    if repeated:
        return max(repeated, key=len)
    single = not leaves and len(children) == 1 and _is_block(children[0][1], False)
    if single and not _is_chain(model, obs, children[0][0]):
        return [children[0][0]]
    return None


def _trunk(model: nn.Module, obs: _Observation) -> list[str]:
    """The trunk blocks in the order they ran (see the module docstring)."""
    for leaves in (False, True):
        found = _trunk_blocks(model, obs, "", leaves)
        if found:
            return sorted(found, key=lambda n: obs.calls[n][0].order)
    return []


def _trunk_blocks(model: nn.Module, obs: _Observation, name: str, leaves: bool) -> list[str]:
    """The trunk blocks inside ``name`` (the root, or a chain): the trunks of its children that are chains
    holding one, unless ``name`` itself holds repeated blocks that are not all such chains (then its own
    children are the blocks: torchvision's MobileNet ``features``, whose residual blocks are not chains)."""
    inner: dict[str, list[str]] = {}
    for child, module in _children(model, name):
        if any(True for _ in module.children()) and _is_chain(model, obs, child):
            found = _trunk_blocks(model, obs, child, leaves)
            if found:
                inner[child] = found
    chain = _is_chain(model, obs, name) if name else _is_chain_root(model, obs)
    repeated = _repeated(model, obs, name, leaves) if chain else None
    # blocks with a forward of their own (residuals) make `name` the trunk; chains without a trunk inside
    # (a stem's Sequential, a classifier's) are not blocks of it
    if repeated is not None and (
        any(c not in inner and not _is_chain(model, obs, c) for c in repeated)
        or not any(c in inner for c in repeated)  # Sequentials of a few layers each, repeated
    ):
        return [c for c, _ in _children(model, name) if c in obs.calls]
    if (
        repeated is not None
    ):  # stages: each its trunk, or itself where it holds a single block (davit, starnet)
        ran = [c for c, _ in _children(model, name) if c in obs.calls]
        kind = type(model.get_submodule(repeated[0]))
        stages = not issubclass(kind, _GENERIC) or all(type(model.get_submodule(c)) is kind for c in ran)
        if stages:  # not a stem Sequential beside `layer1..4` in a root of other modules
            return [b for c in ran for b in inner.get(c, [c] if c in repeated else [])]
    return [block for blocks in inner.values() for block in blocks]


def _is_chain_root(model: nn.Module, obs: _Observation) -> bool:
    """The root as a chain of its children (a Sequential model): only the children's calls are seen."""
    children = [n for n, _ in _children(model, "")]
    if not children or any(len(obs.calls.get(c, ())) != 1 for c in children):
        return False
    if sorted(children, key=lambda c: obs.calls[c][0].order) != children:
        return False
    return all(_feeds(obs.calls[a][0], obs.calls[b][0]) for a, b in itertools.pairwise(children))


def _pyramid(
    model: nn.Module, obs: _Observation, trunk: list[str], candidates: Mapping[str, TapCandidate]
) -> list[Level]:
    """One level per stride: the last trunk block at it, named by the stage that ends in it."""
    at: dict[int, str] = {}
    for block in trunk:
        c = candidates.get(block)
        if c is None or c.stride is None or c.channels is None:
            continue
        if isinstance(model.get_submodule(block), nn.Identity):
            continue
        at.pop(c.stride, None)  # dicts keep insertion order: a stride seen again moves to the end
        at[c.stride] = block
    strides = list(at)
    if strides != sorted(strides):  # a trunk whose stride goes down again (a decoder) has no one pyramid
        return []
    if len(at) == 1:
        blocks = [b for b in trunk if candidates.get(b) is not None and candidates[b].stride is not None]
        picks = (
            [blocks[round((i + 1) * len(blocks) / 4) - 1] for i in range(4)] if len(blocks) >= 4 else blocks
        )
        return [_level(candidates[b], b) for b in picks]
    levels = []
    for stride, block in at.items():
        name = _stage_of(model, obs, block, trunk, candidates, stride)
        levels.append(_level(candidates[block], block, name))
    return levels


def _level(candidate: TapCandidate, block: str, name: str | None = None) -> Level:
    assert candidate.channels is not None and candidate.stride is not None
    return Level(name or block, candidate.channels, candidate.stride, block)


def _stage_of(
    model: nn.Module,
    obs: _Observation,
    block: str,
    trunk: list[str],
    candidates: Mapping[str, TapCandidate],
    stride: int,
) -> str:
    """The outermost chain ending in ``block`` whose trunk blocks are all at ``stride`` (else ``block``)."""
    name = block
    parts = block.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:cut])
        if parent not in obs.calls or not _is_chain(model, obs, parent):
            break
        inside = [b for b in trunk if b.startswith(parent + ".")]
        if not inside or inside[-1] != block:
            break
        if any(candidates.get(b) is None or candidates[b].stride != stride for b in inside):
            break
        name = parent
    return name


# --- timm's feature_info ------------------------------------------------------------------------------


def _feature_info(model: nn.Module) -> tuple[Mapping[str, object], ...] | None:
    """timm's ``feature_info`` of the model, as ``{"module", "channels", "stride"}`` entries, or None."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, tuple)) or not info:
        return None
    entries = []
    for entry in info:
        if not isinstance(entry, Mapping) or "module" not in entry:
            return None
        entries.append(
            {
                "module": str(entry["module"]),
                "channels": entry.get("num_chs"),
                "stride": entry.get("reduction"),
            }
        )
    return tuple(entries)


def _differences(pyramid: Sequence[Level], info: Sequence[Mapping[str, object]] | None) -> tuple[str, ...]:
    """How the pyramid differs from timm's ``feature_info`` at strides 4 to 32, one line each."""
    if info is None:
        return ()
    lines, renamed = level_differences(pyramid, info)
    return tuple(
        lines
        + [
            f"stride {stride}: featx taps `{level.name}`, timm `{entry['module']}` (both {level.channels} channels)"
            for stride, level, entry in renamed
        ]
    )


def level_differences(
    pyramid: Sequence[Level],
    reference: Sequence[Mapping[str, object]],
    source: str = "timm",
    reference_strides_only: bool = False,
) -> tuple[list[str], list[tuple[int, Level, Mapping[str, object]]]]:
    """The pyramid against a reference list of levels (``{"module", "channels", "stride"}``: timm's
    ``feature_info``, a detector's ``return_layers``) at strides 4 to 32: a line per missing level, extra
    level or channel count that differs, and apart, the levels with the same channels under another module
    name (``(stride, level, entry)``; the same value or not, only a forward can tell). The reference's last
    entry at a stride is compared, as featx takes the last block; ``reference_strides_only`` compares only
    the strides the reference has (a detector that returns three levels)."""
    ours = {level.stride: level for level in pyramid if 4 <= level.stride <= 32}
    theirs: dict[int, Mapping[str, object]] = {}
    for item in reference:
        stride = item.get("stride")
        if isinstance(stride, int) and 4 <= stride <= 32:
            theirs[stride] = item
    strides = sorted(theirs) if reference_strides_only else sorted(set(ours) | set(theirs))
    lines: list[str] = []
    renamed: list[tuple[int, Level, Mapping[str, object]]] = []
    for stride in strides:
        level, entry = ours.get(stride), theirs.get(stride)
        if level is None and entry is not None:
            lines.append(
                f"stride {stride}: {source} taps `{entry['module']}` ({entry['channels']} channels); "
                "featx found no trunk block at this stride"
            )
        elif level is not None and entry is None:
            lines.append(
                f"stride {stride}: featx taps `{level.name}` ({level.channels} channels); {source} lists nothing"
            )
        elif level is not None and entry is not None and entry["channels"] != level.channels:
            lines.append(
                f"stride {stride}: featx taps `{level.name}` ({level.channels} channels, measured); {source} "
                f"lists `{entry['module']}` with {entry['channels']} channels"
            )
        elif level is not None and entry is not None and entry["module"] not in (level.name, level.block):
            renamed.append((stride, level, entry))
    return lines, renamed


# --- verdicts ------------------------------------------------------------------------------------------


def _verdicts(
    model: nn.Module,
    x: torch.Tensor,
    depth: int,
    seed: int,
    leaf_functions: Sequence[Callable[..., Any]],
    label: str,
) -> dict[str, tuple[bool, bool, str | None]]:
    """Each cut's verdict: faithful plain, faithful with keep_glue, or refused with the reason."""
    from featx.verification import sweep

    plain = sweep(model, x, depth=depth, seed=seed, label=label)
    return _settled(
        model, x, [(c.upto, c.faithful, c.reasons) for c in plain.cuts], seed, leaf_functions, label
    )


def _cut_verdicts(
    model: nn.Module,
    x: torch.Tensor,
    names: list[str],
    seed: int,
    leaf_functions: Sequence[Callable[..., Any]],
    label: str,
) -> dict[str, tuple[bool, bool, str | None]]:
    """The verdicts of a few cuts (the pyramid's levels): one recording for the plain cuts, then keep_glue
    for those a plain cut does not compute."""
    from featx.verification import verify_cuts

    try:
        plain = [
            (r.upto, r.faithful, r.reasons) for r in verify_cuts(model, names, x, seed=seed, label=label)
        ]
    except FeatxError:  # a cut verify refuses: each on its own
        plain = []
        for name in names:
            try:
                (r,) = verify_cuts(model, [name], x, seed=seed, label=label)
                plain.append((r.upto, r.faithful, r.reasons))
            except FeatxError as err:
                plain.append((name, False, (one_line(err),)))
    return _settled(model, x, plain, seed, leaf_functions, label)


def _settled(
    model: nn.Module,
    x: torch.Tensor,
    plain: list[tuple[str, bool, tuple[str, ...]]],
    seed: int,
    leaf_functions: Sequence[Callable[..., Any]],
    label: str,
) -> dict[str, tuple[bool, bool, str | None]]:
    """Plain verdicts (cut, faithful, reasons) settled: faithful plain, else faithful with keep_glue, else
    refused with the reason (keep_glue's, else the plain cut's)."""
    from featx.verification import verify_cuts

    verdicts: dict[str, tuple[bool, bool, str | None]] = {}
    pending = []
    for upto, faithful, reasons in plain:
        if faithful:
            verdicts[upto] = (True, False, None)
        else:
            pending.append((upto, reasons))
    if not pending:
        return verdicts

    def glue_cuts(cuts: list[str]) -> tuple[Report, ...]:
        return verify_cuts(
            model, cuts, x, seed=seed, keep_glue=True, leaf_functions=leaf_functions, label=label
        )

    glued: dict[str, tuple[bool, str | None]] = {}
    try:  # one recording for every cut keep_glue makes
        reports = glue_cuts([upto for upto, _ in pending])
        glued = {r.upto: (r.faithful, r.reasons[0] if r.reasons else None) for r in reports}
    except FeatxError:  # some cut is refused: each on its own, for its own reason
        for upto, _ in pending:
            try:
                (report,) = glue_cuts([upto])
                glued[upto] = (report.faithful, report.reasons[0] if report.reasons else None)
            except FeatxError as err:
                glued[upto] = (False, one_line(err))
    for upto, reasons in pending:
        faithful, reason = glued.get(upto, (False, None))
        if faithful:
            verdicts[upto] = (True, True, None)
        else:
            verdicts[upto] = (False, False, reason or (reasons[0] if reasons else "not faithful"))
    return verdicts
