"""The input a model takes: its own input size (``default_input_shape``: timm's ``pretrained_cfg``,
torchvision's 224, the size it was built for), the one size a model runs at only (``fixed_input_size``), and
an input shape refused before anything runs when the model cannot take it (``check_input_shape``)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from featx.errors import FeatxError
from featx.model_sources import source_of


def default_input_shape(model: nn.Module, batch: int = 2, *, label: str | None = None) -> tuple[int, ...]:
    """Batch ``batch`` at the model's own input size: timm's ``pretrained_cfg``, torchvision's 224 (299 for
    Inception v3), overridden by the size ``load_model`` built it for (``img_size`` and ``in_chans`` in
    timm, ``image_size`` in torchvision's ViTs; an int or (height, width)). ``label`` (a spec) names the
    model in the error; by default its class does.

    Raises:
        FeatxError: the model declares no input size (pass an example input / ``--input-shape``).
    """
    shape: tuple[int, ...] | None = None
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Mapping) and cfg.get("input_size"):
            shape = tuple(int(d) for d in cfg["input_size"])
            break
    if shape is None and type(model).__module__.startswith("torchvision.models"):
        shape = (3, 299, 299) if type(model).__name__ == "Inception3" else (3, 224, 224)
    if shape is not None and len(shape) == 3:
        source = source_of(model)
        kwargs = dict(source.model_kwargs) if source is not None else {}
        channels, height, width = shape
        size = next((kwargs[k] for k in ("img_size", "image_size") if kwargs.get(k) is not None), None)
        if isinstance(size, int) and not isinstance(size, bool):
            height = width = size
        elif isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(d, int) for d in size):
            height, width = size
        in_chans = kwargs.get("in_chans")
        if isinstance(in_chans, int):
            channels = in_chans
        shape = (channels, height, width)
    if shape is not None:
        return (batch, *shape)
    name = label if label is not None else type(model).__qualname__
    raise FeatxError(
        f"`{name}` declares no input size (no timm pretrained_cfg, not a torchvision model); "
        "pass an example input (command line: --input-shape, e.g. 2,3,224,224)"
    )


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The one (height, width) ``model`` runs at, or None when it takes other sizes too: timm's patch
    embedding with ``strict_img_size`` (ViT, DeiT, Swin: it asserts the size), torchvision's
    VisionTransformer (it asserts ``image_size``)."""
    patch = getattr(model, "patch_embed", None)
    size = getattr(patch, "img_size", None)
    if getattr(patch, "strict_img_size", False) and isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    image_size = getattr(model, "image_size", None)
    if (
        type(model).__module__.startswith("torchvision.models")
        and type(model).__name__ == "VisionTransformer"
        and isinstance(image_size, int)
    ):
        return image_size, image_size
    return None


def check_input_shape(model: nn.Module, shape: tuple[int, ...], spec: str, key: str | None = None) -> None:
    """Refuse, before anything runs, an input shape ``model`` cannot take: the wrong number of dimensions
    (against its own input size, when it declares one) or, for a model that runs at one size only
    (``fixed_input_size``), another height and width. ``key`` names where the shape came from in a config
    (``"key `verify.input_shape`"``); None (or ``"--input-shape"``) is the command line's ``--input-shape``.

    Raises:
        FeatxError: one sentence, the same from every command: what was given, what the model takes.
    """
    try:
        expected: tuple[int, ...] | None = default_input_shape(model)
    except FeatxError:
        expected = None
    fixed = fixed_input_size(model)
    if expected is not None and fixed is not None and len(expected) == 4:
        expected = (*expected[:2], *fixed)
    if key is None or key == "--input-shape":
        given, example = f"--input-shape {','.join(map(str, shape))}", ",".join(map(str, expected or ()))
    else:
        given, example = f"{key} {list(shape)}", str(list(expected or ()))
    if expected is not None and len(shape) != len(expected):
        raise FeatxError(
            f"{given} has {len(shape)} dimensions; `{spec}` takes {len(expected)}, batch included "
            f"(e.g. {example})"
        )
    if fixed is not None and len(shape) == 4 and tuple(shape[2:]) != fixed:
        raise FeatxError(
            f"{given} is {shape[2]}x{shape[3]}; `{spec}` runs at {fixed[0]}x{fixed[1]} only"
            + (f" (e.g. {example})" if expected is not None else "")
        )
