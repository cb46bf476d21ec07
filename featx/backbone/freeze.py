"""What a config freezes: ``freeze`` (a child name, a count, a dotted name) and the torchvision,
mmdetection and detectron2 spellings counted over the model's stages, resolved to module names."""

from __future__ import annotations

import re

import torch
from torch import nn

from featx.config import BackboneConfig
from featx.cut import CutPath, child_names, resolve_path
from featx.errors import FeatxError, did_you_mean, listing
from featx.guard import preserved
from featx.models import default_input_shape


def resolve_freeze(model: nn.Module, cfg: BackboneConfig, cut: CutPath) -> list[str]:
    """The modules the config freezes, in forward order: up to and including the named one (``cut`` is
    the config's ``upto`` resolved against ``model``).

    A child name or a count freezes the leading children (``freeze: layer1``: ``conv1`` .. ``layer1``); a
    dotted name freezes the children before its container and, inside it, the children up to and
    including the named module, level by level (``freeze: stages.1``: ``stem``, ``stages.0``,
    ``stages.1``) — what a cut at that name keeps. The other spellings count the model's stages
    (``stages``): ResNet's ``layer1``..``layer4``, or any trunk split where its stride changes.

    Raises:
        FeatxError: a name that names no module (with the container's children), a freeze past the cut.
    """
    names = child_names(model)
    if cfg.freeze is None:
        return []
    spelling, value = cfg.freeze
    if spelling == "freeze" and isinstance(value, str) and "." in value and value not in names:
        return _resolve_dotted_freeze(model, value, cut, cfg)
    if spelling != "freeze":
        return _resolve_stages(model, cfg, cut, spelling, value)
    if value is False:
        return []
    count = _resolve_name(model, names, value, cfg)
    if count > cut.kept:
        raise FeatxError(
            f"{cfg.source}: key `{spelling}` freezes through `{names[count - 1]}`, past the cut at "
            f"`{cut.upto}`{_cut_from(cfg)}"
        )
    return names[:count]


# each framework's range of the value, for K stages: the word for it and its (lowest, highest)
_RANGES = {
    "trainable_layers": ("torchvision", lambda k: (0, k + 1)),
    "frozen_stages": ("mmdetection", lambda k: (-1, k)),
    "freeze_at": ("detectron2", lambda k: (0, k + 1)),
}


def _resolve_stages(
    model: nn.Module, cfg: BackboneConfig, cut: CutPath, spelling: str, value: object
) -> list[str]:
    """The torchvision, mmdetection and detectron2 spellings, counted over the model's stages (``stages``:
    the stem is every module before the first stage). With K stages: ``frozen_stages`` -1 freezes
    nothing, 0 the stem, n the stem and stages 1..n; ``freeze_at`` 0 nothing, 1 the stem, n the stem and
    stages 1..n-1 (detectron2's res2..); ``trainable_layers`` k trains the last k of [stem, stage 1, ...,
    stage K] and freezes the rest (K + 1 trains all; 0 freezes all the cut keeps)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise FeatxError(f"{cfg.source}: key `{spelling}` must be an int, got {value!r}")
    starts, last = stages(model, cfg)
    framework, bounds = _RANGES[spelling]
    low, high = bounds(len(starts))
    if not low <= value <= high:
        raise FeatxError(
            f"{cfg.source}: key `{spelling}` is {value}; accepted: {low}..{high} ({framework}, over the "
            f"{len(starts)} stages of `{cfg.model}`: {listing(starts, len(starts))})"
        )
    if spelling == "frozen_stages" and value == 0 and "ConvNeXt" in type(model).__name__:
        # mmdetection's ResNet, RegNet and Swin read 0 as the stem; the ConvNeXt its configs use
        # (mmpretrain's) as nothing: which one a ported config meant is not knowable here
        raise FeatxError(
            f"{cfg.source}: key `frozen_stages: 0` is ambiguous on a ConvNeXt: mmdetection's ResNet/Swin read "
            "it as the stem, mmpretrain's ConvNeXt (the one mmdetection's ConvNeXt configs use) as nothing; "
            f"write `frozen_stages: -1` for nothing or `freeze: {_before(model, starts[0])[-1]}` for the stem"
        )
    frozen = {"trainable_layers": len(starts) - value, "frozen_stages": value, "freeze_at": value - 1}[
        spelling
    ]
    if frozen < 0:  # nothing
        return []
    units = _before(model, starts[frozen]) if frozen < len(starts) else resolve_path(model, last).units()
    kept = cut.units()
    if spelling == "trainable_layers":  # torchvision: 0 freezes whatever the backbone keeps
        return [u for u in units if _kept(u, kept)]
    if units and not _kept(units[-1], kept):
        raise FeatxError(
            f"{cfg.source}: key `{spelling}` freezes through `{units[-1]}`, past the cut at "
            f"`{cut.upto}`{_cut_from(cfg)}"
        )
    return units


def _kept(unit: str, kept: list[str]) -> bool:
    """Whether the cut runs all of ``unit``: it is one of ``kept`` or inside one."""
    return any(unit == k or unit.startswith(k + ".") for k in kept)


def _before(model: nn.Module, start: str) -> list[str]:
    """The modules that run before ``start`` (a dotted name), as freeze units: the root's children before
    its top-level module, then, inside each container on the way, the children before."""
    return resolve_path(model, start).units()[:-1]


_RESNET = ("layer1", "layer2", "layer3", "layer4")  # ResNet stages, as torchvision and timm name them


def stages(model: nn.Module, cfg: BackboneConfig) -> tuple[list[str], str]:
    """The first module of each of the model's stages, in forward order, and the trunk's last module.

    A ResNet's stages are its children ``layer1``..``layer4``. Any other model's are its trunk split at
    each change of stride, the trunk being the children of its stage container: the root's children
    named like ``s1``/``stage1`` (RegNet), else the children of a child ``stages``, ``layers``, ``blocks``
    or ``features`` (timm ConvNeXt, Swin, EfficientNet, MobileNetV3; torchvision's MobileNet, ConvNeXt,
    EfficientNet), whose first child goes to the stem when its type differs from the second's
    (torchvision's stem conv inside ``features``). Strides are measured with one forward at the
    config's ``verify.input_shape`` (or the model's own size).

    Raises:
        FeatxError: a model with no such container, or whose trunk has no spatial outputs.
    """
    names = child_names(model)
    if all(s in names for s in _RESNET):
        return list(_RESNET), _RESNET[-1]
    trunk = _trunk(model, names)
    if len(trunk) < 2:
        raise FeatxError(
            f"{cfg.source}: `{cfg.model}` has no stages featx can count (no `layer1`..`layer4`, no "
            "child `stages`, `layers`, `blocks` or `features` holding them); name the last frozen "
            f"module with `freeze: <module name>` instead of `{cfg.freeze[0] if cfg.freeze else 'freeze'}`"
        )
    strides = _strides(model, trunk, cfg)
    starts = [unit for i, unit in enumerate(trunk) if i == 0 or strides[unit] != strides[trunk[i - 1]]]
    return starts, trunk[-1]


def _trunk(model: nn.Module, names: list[str]) -> list[str]:
    numbered = [n for n in names if re.fullmatch(r"(s|stage|layer|res)\d+", n)]
    if len(numbered) >= 2:
        return numbered
    for container in ("stages", "layers", "blocks", "features"):
        if container in names:
            module = model.get_submodule(container)
            inside = [
                f"{container}.{n}"
                for n, child in module.named_children()
                if not isinstance(child, nn.Identity)
            ]
            if len(inside) >= 2 and type(model.get_submodule(inside[0])) is not type(
                model.get_submodule(inside[1])
            ):
                inside = inside[1:]  # a stem inside the container (torchvision's `features.0`)
            return inside
    return []


def _strides(model: nn.Module, trunk: list[str], cfg: BackboneConfig) -> dict[str, int]:
    """Each trunk module's stride (input height / its output's), from one forward without gradients."""
    shape = cfg.verify.input_shape or default_input_shape(model, batch=1)
    sizes: dict[str, int] = {}
    handles = [
        model.get_submodule(unit).register_forward_hook(
            lambda _m, _i, out, unit=unit: (
                sizes.__setitem__(unit, out.shape[2])
                if isinstance(out, torch.Tensor) and out.dim() == 4
                else None
            )
        )
        for unit in trunk
    ]
    try:
        with preserved(model), torch.no_grad():
            # square, so an NHWC output (timm's Swin) gives the stride from its dim 2 as NCHW does
            model.eval()(torch.zeros(1, shape[1], shape[2], shape[2]))
    finally:
        for handle in handles:
            handle.remove()
    missing = [unit for unit in trunk if unit not in sizes]
    if missing:
        raise FeatxError(
            f"{cfg.source}: key `{cfg.freeze[0] if cfg.freeze else 'freeze'}` counts stages by stride, and "
            f"{listing(missing)} of `{cfg.model}` return no feature map; name the last frozen module with "
            "`freeze: <module name>`"
        )
    return {unit: shape[2] // size for unit, size in sizes.items()}


def _resolve_dotted_freeze(model: nn.Module, value: str, cut: CutPath, cfg: BackboneConfig) -> list[str]:
    try:
        frozen = resolve_path(model, value)
    except FeatxError as err:
        message = str(err).replace(f"upto `{value}`", f"`{value}`", 1)
        raise FeatxError(f"{cfg.source}: key `freeze`: {message}") from None
    where, at = _position(frozen), _position(cut)
    # up to and including the cut's module, or inside it; a container the cut goes into counts as kept
    if where > at and where[: len(at)] != at:
        raise FeatxError(
            f"{cfg.source}: key `freeze` freezes through `{value}`, past the cut at `{cut.upto}`{_cut_from(cfg)}; "
            f"freeze a module up to `{cut.upto}`"
        )
    return frozen.units()


def _cut_from(cfg: BackboneConfig) -> str:
    """`` (from --upto)`` when the command line set the cut, so the error names the flag that moved it."""
    flag = cfg.overridden.get("upto")
    return f" (from {flag})" if flag else ""


def _position(path: CutPath) -> tuple[int, ...]:
    """Where a cut's module sits in registration order: its child index at each level."""
    return tuple(level.kept - 1 for level in path.levels)


def _resolve_name(model: nn.Module, names: list[str], value: object, cfg: BackboneConfig) -> int:
    if isinstance(value, str) and value in names:
        return names.index(value) + 1
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= len(names):
        return value
    # the example of a dotted name is one this model has: the first child's first child
    dotted = next(
        (f"{name}.{inner}" for name, child in model.named_children() for inner, _ in child.named_children()),
        None,
    )
    inside = f", a dotted name inside one (such as `{dotted}`)" if dotted else ""
    raise FeatxError(
        f"{cfg.source}: key `freeze` is {value!r}{did_you_mean(str(value), names)}; accepted: null, a child "
        f"name ({listing(names, len(names))}){inside} or a count 0..{len(names)}"
    )
