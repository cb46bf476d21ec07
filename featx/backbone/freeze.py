"""What a config freezes: ``freeze`` (a child name, a count, a dotted name) and the torchvision,
mmdetection and detectron2 spellings counted over the model's stages, resolved to module names."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from featx.config import BackboneConfig
from featx.cut import CutPath, child_names, resolve_path
from featx.discovery import taps
from featx.errors import FeatxError, did_you_mean, listing


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
    """The torchvision, mmdetection and detectron2 spellings, counted over the model's stages (``stages``).
    With K stages: ``frozen_stages`` -1 freezes nothing, 0 the stem, n the stem and stages 1..n;
    ``freeze_at`` 0 nothing, 1 the stem, n the stem and stages 1..n-1 (detectron2's res2..); and
    ``trainable_layers`` k trains the last k of [stem, stage 1, ..., stage K] and freezes the rest
    (K + 1 trains all; 0 freezes all the cut keeps)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise FeatxError(f"{cfg.source}: key `{spelling}` must be an int, got {value!r}")
    found = stages(model, cfg)
    ends = found.ends
    framework, bounds = _RANGES[spelling]
    low, high = bounds(len(ends))
    if not low <= value <= high:
        raise FeatxError(
            f"{cfg.source}: key `{spelling}` is {value}; accepted: {low}..{high} ({framework}, over the "
            f"{len(ends)} stages of `{cfg.model}`: {listing(ends, len(ends))})"
        )
    if spelling == "frozen_stages" and value == 0 and "ConvNeXt" in type(model).__name__:
        # mmdetection's ResNet, RegNet and Swin read 0 as the stem; the ConvNeXt its configs use
        # (mmpretrain's) as nothing: which one a ported config meant is not knowable here
        stem = (
            f"`freeze: {found.stem[-1]}` for the stem" if found.stem else "nothing for the stem (it has none)"
        )
        raise FeatxError(
            f"{cfg.source}: key `frozen_stages: 0` is ambiguous on a ConvNeXt: mmdetection's ResNet/Swin read "
            "it as the stem, mmpretrain's ConvNeXt (the one mmdetection's ConvNeXt configs use) as nothing; "
            f"write `frozen_stages: -1` for nothing or {stem}"
        )
    frozen = {"trainable_layers": len(ends) - value, "frozen_stages": value, "freeze_at": value - 1}[spelling]
    if frozen < 0:  # nothing
        return []
    units = list(found.stem) if frozen == 0 else resolve_path(model, ends[frozen - 1]).units()
    kept = cut.units()
    if spelling == "trainable_layers":  # torchvision: 0 freezes whatever the backbone keeps
        # a stage the cut goes into is frozen as far as the cut keeps it
        return [
            k for u in units for k in ([u] if _kept(u, kept) else [k for k in kept if k.startswith(u + ".")])
        ]
    if units and not _kept(units[-1], kept):
        raise FeatxError(
            f"{cfg.source}: key `{spelling}` freezes through `{units[-1]}`, past the cut at "
            f"`{cut.upto}`{_cut_from(cfg)}"
        )
    return units


def _kept(unit: str, kept: list[str]) -> bool:
    """Whether the cut runs all of ``unit``: it is one of ``kept`` or inside one."""
    return any(unit == k or unit.startswith(k + ".") for k in kept)


@dataclass(frozen=True)
class Stages:
    """A model's stem and stages, as the stage spellings count them: ``stem`` the modules before the first
    stage (freeze units), ``ends`` the module each stage ends with (its pyramid level: ``layer1``,
    ``stages.0``, ``blocks.4``), in forward order."""

    stem: tuple[str, ...]
    ends: tuple[str, ...]


_RESNET = ("layer1", "layer2", "layer3", "layer4")  # ResNet stages, as torchvision and timm name them


def stages(model: nn.Module, cfg: BackboneConfig) -> Stages:
    """The model's stem and stages (``Stages``).

    A ResNet's stages are its children ``layer1``..``layer4``, its stem the children before. Any other
    model's are its trunk (``featx.discovery``: the blocks of the containers that hold repeated blocks,
    in the order they ran) split where the stride changes: a stage is its pyramid level (``stages.1``,
    ``blocks.4``; so it holds the downsampling before its first block, as mmpretrain's ConvNeXt counts
    it), and runs from the end of the previous one. The stem is every module before the first stage
    (torchvision's stem conv at ``features.0`` of a MobileNet). Strides are measured at the config's
    ``verify.input_shape`` (or the model's own size).

    Raises:
        FeatxError: a model whose stages featx cannot find: no trunk, one stride (a ViT), a stride that
            goes down again.
    """
    names = child_names(model)
    if all(s in names for s in _RESNET):
        return Stages(tuple(names[: names.index(_RESNET[0])]), _RESNET)
    spelling = cfg.freeze[0] if cfg.freeze else "freeze"
    instead = f"name the last frozen module with `freeze: <module name>` instead of `{spelling}`"
    try:
        found = taps(model, cfg.verify.input_shape, check=False, label=cfg.model)
    except FeatxError as err:
        raise FeatxError(f"{cfg.source}: counting the stages of `{cfg.model}`: {err}; {instead}") from None
    strides = {level.stride for level in found.pyramid}
    if len(strides) < 2:
        why = (
            f"its trunk runs at one stride ({next(iter(strides))})"
            if strides
            else "featx finds no trunk of blocks whose stride only grows"
        )
        raise FeatxError(f"{cfg.source}: `{cfg.model}` has no stages featx can count: {why}; {instead}")
    ends = tuple(level.name for level in found.pyramid)
    stem = resolve_path(model, ends[0]).units()[:-1]  # the modules before the first stage
    return Stages(tuple(stem), ends)


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
    accepted = (
        f"accepted: null, a child name ({listing(names, len(names))}){inside} or a count 0..{len(names)}"
    )
    if isinstance(value, (list, tuple, dict)):  # freeze names the last module frozen: one, not several
        (only,) = value if isinstance(value, (list, tuple)) and len(value) == 1 else (None,)
        write = f" (write `freeze: {only}`)" if isinstance(only, (str, int)) else ""
        raise FeatxError(
            f"{cfg.source}: key `freeze` is the {type(value).__name__} {value!r}: it takes one module, the last "
            f"frozen with all before it{write}; {accepted}"
        )
    raise FeatxError(f"{cfg.source}: key `freeze` is {value!r}{did_you_mean(str(value), names)}; {accepted}")
