"""The taps of a backbone: one value per output (``Tap``: its name, the module it taps, and the channels,
stride and shape a dry run measured), and the measuring: dry runs at two input sizes that give each
output's layout and exact stride."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, NoReturn

import torch

from featx.errors import FeatxError, one_line
from featx.observation import divides, grow_by, on_meta, quiet_fake_tensors

if TYPE_CHECKING:
    from featx.backbone.body import Backbone, GlueBackbone


@dataclasses.dataclass(frozen=True)
class Tap:
    """One output of a backbone, as timm's ``FeatureInfo`` lists them, as a value: its name, the module it
    taps (``child``: a child name, or a dotted path such as ``stages.2``), and once a dry run has measured
    it (``measured``), its channels, stride and shape (at the plan's input shape). ``resolve`` makes the
    taps of a config once; build, check, export, extract and the JSON read them. ``featx.Feature`` is this
    value, measured."""

    name: str
    child: str
    channels: int | None = None
    stride: int | None = None
    shape: tuple[int, ...] | None = None

    @property
    def module(self) -> str:
        """The tapped module's dotted name (``child``)."""
        return self.child

    @property
    def measured(self) -> bool:
        return self.shape is not None

    def measure(self, channels: int, stride: int, shape: Iterable[int]) -> Tap:
        """This tap with what a dry run measured."""
        return dataclasses.replace(self, channels=channels, stride=stride, shape=tuple(shape))

    def to_dict(self) -> dict[str, object]:
        """``{"name", "child", "channels", "stride", "shape"}``: an entry of ``featx build --json``'s
        ``outputs`` (None where not measured)."""
        return {
            "name": self.name,
            "child": self.child,
            "channels": self.channels,
            "stride": self.stride,
            "shape": None if self.shape is None else list(self.shape),
        }


Feature = Tap  # the public name of a measured tap (``BackbonePlan.features``)


def by_module(taps: Iterable[Tap]) -> dict[str, list[str]]:
    """The taps as the backbone runs them: tapped module -> its output names, modules in the order they
    are first tapped."""
    grouped: dict[str, list[str]] = {}
    for tap in taps:
        grouped.setdefault(tap.child, []).append(tap.name)
    return grouped


def _growth(outputs: Iterable[torch.Tensor], height: int, width: int) -> tuple[int, int]:
    """How much the second dry run changes the input's height and width (``featx.observation.grow_by``,
    bounded by the smallest dim of any output: a channel dim only makes the bound larger); negative where the
    input is large (a cheaper real run, if it comes to one)."""
    grow = grow_by(min((n for out in outputs for n in out.shape[1:]), default=1), height, width)
    return (
        grow[0] if height <= 2 * grow[0] else -grow[0],
        grow[1] if width <= 2 * grow[1] else -grow[1],
    )


def _measure(
    backbone: Backbone | GlueBackbone,
    input_shape: tuple[int, ...],
    shape_key: str = "`verify.input_shape`",
    glue_key: str = "--keep-glue / `keep_glue: true`",
) -> None:
    """Channels and stride of every output, from dry runs at ``input_shape`` and at a second input size.

    A stride is exact, never a rounded ratio: between the two runs the input's H and W change by 128 and
    256 (multiples of every power-of-two stride up to 128; scaled up by a power of two where an output's
    size allows a larger stride, ``_growth``), so an NCHW map's H and W change by exactly 128/stride and
    256/stride, however the convolutions round an odd size. Which dims change also gives the
    layout: NCHW changes dims 2 and 3; NHWC (swin) dims 1 and 2; tokens (B, N, C) dim 1; an output that is
    not an NCHW map is refused, naming the layout found. A model that runs at one input size only (a fixed
    ``img_size``) is measured at that size alone: a layout is taken when exactly one of NCHW and NHWC
    divides the input by one power-of-two stride, else refused. Then the input must be a multiple of the
    largest stride (a map of ``ceil(H / stride)`` rows no longer lines up with the input): else refused,
    naming the sizes that are.

    The dry runs use meta tensors, else fake ones — shapes only, no kernel runs and nothing is allocated, so a
    detection config's 800x1333 input costs no memory — and fall back to a real run where a module cannot
    run on either.
    ``shape_key`` and ``glue_key`` name, in the errors, where the input shape comes from and how to keep
    the glue (a config's keys, or the flags of a SPEC).
    """
    first = _dry_run(backbone, input_shape, shape_key, glue_key)
    for name, out in first.items():
        if not isinstance(out, torch.Tensor) or out.dim() < 3:
            got = (
                f"a tensor of shape {list(out.shape)}"
                if isinstance(out, torch.Tensor)
                else type(out).__name__
            )
            raise FeatxError(
                f"output `{name}` is not a feature map (got {got}, expected N, C, H, W); "
                "tap a child that returns one"
            )
    if len(input_shape) != 4:
        raise FeatxError(
            f"{shape_key} {list(input_shape)} is not an image batch (N, C, H, W); featx measures "
            "the stride of each output against the input's H and W"
        )
    height, width = input_shape[2:]
    grow = _growth((out for out in first.values() if isinstance(out, torch.Tensor)), height, width)
    other = (*input_shape[:2], height + grow[0], width + grow[1])
    why = ""
    try:
        second: Mapping[str, object] | None = _dry_run(backbone, other, shape_key, glue_key)
    except _CannotRun as err:  # a model with a fixed input size: measured at the one size
        second, why = None, err.reason
    child_of = {output: child for child, outputs in backbone.taps.items() for output in outputs}
    not_maps: dict[str, NotAMap] = {}
    for name, out in first.items():
        assert isinstance(out, torch.Tensor)  # checked above
        child = child_of.get(name, name)
        tap = f"output `{name}`" + (f" (`{child}`)" if child != name else "")
        shape = list(out.shape)
        again = second[name] if second is not None else None
        how = backbone.token_maps.get(name)
        try:
            if how is not None and how.grid is not None:  # a ViT's tokens laid on its grid: one per patch
                stride = how.grid.stride
            elif isinstance(again, torch.Tensor):
                stride = _stride_of(tap, shape, list(again.shape), (height, width), grow)
            else:
                why = why or f"it returns {type(again).__name__} there"
                stride = _stride_at_one_size(tap, shape, (height, width), (other[2], other[3]), why)
        except NotAMap as err:  # the caller may make it into a map (tokens), then measure again
            not_maps[name] = err
            continue
        backbone.channels[name] = shape[1]
        backbone.shapes[name] = shape
        backbone.strides[name] = stride
    if not_maps:
        raise NotMaps(not_maps)
    largest = max(backbone.strides.values(), default=1)
    if height % largest or width % largest:
        name = next(n for n, s in backbone.strides.items() if s == largest)
        up = f"{-(-height // largest) * largest}x{-(-width // largest) * largest}"
        down = f"{height // largest * largest}x{width // largest * largest}"
        sizes = f"{down} or {up}" if height >= largest and width >= largest else up
        raise FeatxError(
            f"input {height}x{width} ({shape_key} {list(input_shape)}) is not a multiple of "
            f"{largest}, the largest stride (output `{name}`): its maps would not line up with the input; "
            f"use {sizes}"
        )


class _CannotRun(FeatxError):
    """A dry run failed; ``reason`` is what the model raised (``ValueError: input size ...``)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _dry_run(
    backbone: Backbone | GlueBackbone, input_shape: tuple[int, ...], shape_key: str, glue_key: str
) -> Mapping[str, object]:
    """The backbone's outputs on an input of ``input_shape``, in eval mode: on meta tensors where the
    modules allow (its parameters and buffers swapped for meta ones for the call: only shapes are computed,
    at a cost that does not grow with the input), else on fake tensors, else a real run on a seeded input."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    param = next(backbone.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad(), quiet_fake_tensors():
            try:
                return on_meta(backbone, input_shape, dtype)
            except Exception:
                pass
            try:
                with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                    return backbone(
                        mode.from_tensor(torch.empty(input_shape, device="meta")).to(device, dtype)
                    )
            except Exception:
                x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
                return backbone(x)
    except Exception as err:
        reason = f"{type(err).__name__}: {one_line(err)}"
        # a plain cut runs the kept children one after another: a child fed what the root's own forward
        # would have changed first (torchvision's flatten before `fc`) fails at any size
        from featx.backbone.body import GlueBackbone

        glue = (
            ""
            if isinstance(backbone, GlueBackbone)
            else "; or, if the full model runs at this shape, the cut lost glue the root's forward applies "
            f"between children (`featx verify` names it): keep it with {glue_key}"
        )
        raise _CannotRun(
            f"the backbone cannot run on an input of shape {list(input_shape)}: {reason}; set {shape_key}{glue}",
            reason,
        ) from None
    finally:
        backbone.train(was_training)


def _stride_of(
    tap: str, shape: list[int], again: list[int], size: tuple[int, int], grow: tuple[int, int]
) -> int:
    """The stride of an output measured at two input sizes (``size``, and ``size`` + ``grow``): the
    layout from the dims that change, the stride from how much they change. Refuses anything that is not
    an NCHW map reduced by one power-of-two stride in both H and W."""
    changed = [d for d in range(1, len(shape)) if shape[d] != again[d]]
    if len(shape) == 4 and changed == [2, 3]:
        steps = [again[d] - shape[d] for d in (2, 3)]
        strides = {g / step for g, step in zip(grow, steps, strict=True)}
        (stride,) = strides if len(strides) == 1 else (0.0,)
        if stride >= 1 and stride.is_integer() and _power_of_two(int(stride)):
            return int(stride)
        grown = f"{size[0] + grow[0]}x{size[1] + grow[1]}"
        raise FeatxError(
            f"{tap} is not reduced by one power-of-two stride: its H x W is {shape[2]}x{shape[3]} at input "
            f"{size[0]}x{size[1]} and {again[2]}x{again[3]} at {grown}; featx taps maps at a stride of "
            "1, 2, 4, ... in both H and W"
        )
    if len(shape) == 4 and changed == [1, 2]:
        _refuse_layout(tap, "NHWC (B, H, W, C)", shape, size, "NHWC (channels-last) maps", "NHWC")
    if len(shape) == 3 and changed == [1]:
        _refuse_layout(tap, "tokens (B, N, C)", shape, size, "tokens", "tokens")
    if len(shape) == 3 and changed == [2]:
        _refuse_layout(tap, "tokens (B, C, N)", shape, size, "tokens")
    follow = f"only its dims {', '.join(map(str, changed))} follow" if changed else "none of its dims follows"
    raise FeatxError(
        f"{tap} is a {len(shape)}-D tensor {shape} at input {size[0]}x{size[1]} and {again} at "
        f"{size[0] + grow[0]}x{size[1] + grow[1]}: {follow} the input's H and W as an NCHW map's 2 and 3 "
        "do; featx taps NCHW maps (B, C, H, W)"
    )


def _stride_at_one_size(
    tap: str, shape: list[int], size: tuple[int, int], other: tuple[int, int], why: str
) -> int:
    """The stride of an output of a model that runs at one input size only: NCHW when its H and W (and
    not dims 1 and 2, as NHWC) divide the input by one power-of-two stride."""
    if len(shape) == 3:
        _refuse_layout(
            tap, "a 3-D (B, N, C) or (B, C, N) sequence of tokens", shape, size, "tokens", "tokens"
        )
    nchw = _divides(size, shape[2], shape[3]) if len(shape) == 4 else None
    nhwc = _divides(size, shape[1], shape[2]) if len(shape) == 4 else None
    if nchw is not None and nhwc is None:
        return nchw
    if nhwc is not None and nchw is None:
        _refuse_layout(tap, "NHWC (B, H, W, C)", shape, size, "NHWC (channels-last) maps", "NHWC")
    raise FeatxError(
        f"{tap} has shape {shape} at input {size[0]}x{size[1]}, and featx cannot tell its layout and "
        f"stride: the backbone does not run at a second input size ({other[0]}x{other[1]}: {why}) and "
        f"{'both NCHW and NHWC' if nchw is not None else 'neither NCHW nor NHWC'} divide the input by one "
        "power-of-two stride; let the model run at another input size (timm: `strict_img_size: false`) so "
        "featx can measure it"
    )


class NotAMap(FeatxError):
    """An output that is not an NCHW map; ``layout`` (``tokens``, ``NHWC``) when it may be made into one
    (``featx.backbone.tokens``), else None; ``shape`` at the first dry run's input."""

    def __init__(self, message: str, layout: str | None, shape: list[int]) -> None:
        super().__init__(message)
        self.layout = layout
        self.shape = shape


class NotMaps(FeatxError):
    """Outputs that are not NCHW maps, by output name (``_measure``); its message is the first one's."""

    def __init__(self, found: Mapping[str, NotAMap]) -> None:
        super().__init__(str(next(iter(found.values()))))
        self.found = dict(found)


def _refuse_layout(
    tap: str, layout: str, shape: list[int], size: tuple[int, int], kind: str, convertible: str | None = None
) -> NoReturn:
    raise NotAMap(
        f"{tap} is {layout} {shape} at input {size[0]}x{size[1]}, not an NCHW map (B, C, H, W); featx "
        f"makes tokens of a ViT or Swin (timm) into NCHW maps, and cannot convert these {kind}: tap a "
        "module that returns an NCHW map",
        convertible,
        shape,
    )


def _divides(size: tuple[int, int], h: int, w: int) -> int | None:
    """The power-of-two stride that makes ``h`` x ``w`` of an input of ``size`` exactly, if one does."""
    stride = divides(size, h, w)
    return stride if stride is not None and _power_of_two(stride) else None


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0
