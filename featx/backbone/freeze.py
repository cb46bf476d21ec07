"""What a config freezes: ``freeze`` (a child name, a count, a dotted name) and the torchvision,
mmdetection and detectron2 spellings on ResNet stages, resolved to module names."""

from __future__ import annotations

from torch import nn

from featx.config import BackboneConfig
from featx.cut import CutPath, child_names, resolve_path
from featx.errors import FeatxError, did_you_mean, listing

_STAGES = ("layer1", "layer2", "layer3", "layer4")  # ResNet stages, as torchvision and timm name them


def resolve_freeze(model: nn.Module, cfg: BackboneConfig, cut: CutPath) -> list[str]:
    """The modules the config freezes, in forward order: up to and including the named one (``cut`` is
    the config's ``upto`` resolved against ``model``).

    A child name or a count freezes the leading children (``freeze: layer1``: ``conv1`` .. ``layer1``); a
    dotted name freezes the children before its container and, inside it, the children up to and
    including the named module, level by level (``freeze: stages.1``: ``stem``, ``stages.0``,
    ``stages.1``) — what a cut at that name keeps. The other spellings count ResNet stages.

    Raises:
        FeatxError: a name that names no module (with the container's children), a freeze past the cut.
    """
    names = child_names(model)
    if cfg.freeze is None:
        return []
    spelling, value = cfg.freeze
    if spelling == "freeze" and isinstance(value, str) and "." in value and value not in names:
        return _resolve_dotted_freeze(model, value, cut, cfg)
    kept = cut.kept
    if spelling == "freeze":
        if value is False:
            return []
        count = _resolve_name(model, names, value, cfg)
    else:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FeatxError(f"{cfg.source}: key `{spelling}` must be an int, got {value!r}")
        missing = [s for s in _STAGES if s not in names]
        if missing:
            raise FeatxError(
                f"{cfg.source}: key `{spelling}` counts ResNet stages, but the model has no "
                f"{listing(missing)} child; use `freeze: <child name>`"
            )
        stage = {s: names.index(s) for s in _STAGES}
        if spelling == "trainable_layers":  # torchvision: train the last k of conv1, layer1..layer4
            if not 0 <= value <= 5:
                raise FeatxError(
                    f"{cfg.source}: key `trainable_layers` is {value}; accepted: 0..5 (torchvision)"
                )
            count = len(names) if value == 0 else [0, *stage.values()][5 - value]
        elif spelling == "frozen_stages":  # mmdetection: -1 none, 0 the stem, n the stem and stages 1..n
            if not -1 <= value <= 4:
                raise FeatxError(
                    f"{cfg.source}: key `frozen_stages` is {value}; accepted: -1..4 (mmdetection)"
                )
            count = 0 if value == -1 else stage["layer1"] if value == 0 else stage[f"layer{value}"] + 1
        else:  # detectron2: 0 none, 1 the stem, n the stem and res2..res(n)
            if not 0 <= value <= 5:
                raise FeatxError(f"{cfg.source}: key `freeze_at` is {value}; accepted: 0..5 (detectron2)")
            count = 0 if value == 0 else stage["layer1"] if value == 1 else stage[f"layer{value - 1}"] + 1
        count = min(count, kept) if spelling == "trainable_layers" else count
    if count > kept:
        raise FeatxError(
            f"{cfg.source}: key `{spelling}` freezes through `{names[count - 1]}`, past the cut at "
            f"`{cut.upto}`{_cut_from(cfg)}"
        )
    return names[:count]


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
