"""The model's own preprocessing: what turns a decoded image into the tensor the model was trained on.

- timm models: ``timm.data.resolve_data_config`` + ``create_transform`` (eval), from the
  ``pretrained_cfg`` of the weights' tag when the weights were named by one (``--weights a3_in1k``), else
  the model's own;
- torchvision models: the transforms of the weights enum member the weights are (``WeightsSource.member``:
  named, or a file named as torchvision downloads it, e.g. ``resnet50-11ad3fa6.pth``), else the ImageNet
  default eval transform (resize 256, center crop 224, ImageNet mean and std);
- anything else: the ImageNet default at the model's declared input size (224 if none).

A config's ``data:`` section overrides single keys of that, in timm's data-config vocabulary
(``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``); the result is then
built with timm's ``create_transform``. A model that runs at one size only (a ViT built with
``img_size=64``) gets that size, whatever its pretrained config says; a ``data.input_size`` of another
size is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from torch import nn

from featx.errors import FeatxError
from featx.input_shapes import fixed_input_size
from featx.model_sources import ModelSource
from featx.weights import WeightsSource

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataConfig(TypedDict):
    """timm's data config (``timm.data.resolve_data_config``): what ``create_transform`` is built from."""

    input_size: tuple[int, int, int]  # C, H, W
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    crop_mode: str


@dataclass(frozen=True)
class Preprocessing:
    """A transform (PIL image -> tensor) and what it does, in words and as JSON for the fingerprint."""

    source: (
        str  # "timm pretrained_cfg", "torchvision ResNet50_Weights.IMAGENET1K_V1", "ImageNet default", ...
    )
    settings: DataConfig
    transform: Callable

    def to_dict(self) -> dict[str, object]:
        return {"source": self.source, **{k: _plain(v) for k, v in self.settings.items()}}

    def __str__(self) -> str:
        s = self.settings
        size = s["input_size"]
        resize = _resize_size(s)
        return (
            f"{self.source}: resize {resize} {s['interpolation']}, {s['crop_mode']} crop {size[1]}x{size[2]}, "
            f"mean {_numbers(s['mean'])}, std {_numbers(s['std'])}"
        )


def resolve_preprocessing(
    model: nn.Module, source: ModelSource, overrides: Mapping[str, object] | None = None
) -> Preprocessing:
    """The preprocessing ``model`` (built from ``source``: its spec and weights) expects; see the module."""
    overrides = dict(overrides or {})
    described, settings, transform = _own(model, source.spec, source.weights)
    if overrides:
        settings = _data_config({**settings, **overrides})
        described = f"{described}, changed by the config's data section"
        transform = None
    fixed = fixed_input_size(model)  # a ViT built at another size (`img_size=64`) runs at that size only
    size = settings["input_size"]
    if fixed is not None and tuple(size[1:]) != fixed:
        if "input_size" in overrides:
            raise FeatxError(
                f"the config's `data.input_size` {list(size)} is {size[1]}x{size[2]}; `{source.spec}` runs at "
                f"{fixed[0]}x{fixed[1]} only (as built: `img_size`); set `data.input_size` to "
                f"[{size[0]}, {fixed[0]}, {fixed[1]}] or drop it"
            )
        settings = DataConfig({**settings, "input_size": (size[0], *fixed)})
        described = f"{described}, at the model's input size {fixed[0]}x{fixed[1]}"
        transform = None
    if transform is None:
        from timm.data import create_transform

        transform = create_transform(**settings, is_training=False)
    return Preprocessing(described, settings, transform)


def _own(model: nn.Module, spec: str, weights: WeightsSource) -> tuple[str, DataConfig, Callable | None]:
    # the name timm weights were resolved by (`resnet18.a3_in1k`), if any
    named = weights.label if weights.kind in ("timm", "hf-hub") else None
    if getattr(model, "pretrained_cfg", None) and spec.startswith("timm/"):
        from timm.data import resolve_data_config
        from timm.models import get_pretrained_cfg

        # the model is built without its tag: the tag the weights were named by says how they were trained
        tagged = get_pretrained_cfg(named) if named and "." in named and ":" not in named else None
        if tagged is not None:
            data = resolve_data_config({}, pretrained_cfg=tagged.to_dict())
            return f"timm pretrained_cfg of {named}", _data_config(data), None
        return "timm pretrained_cfg", _data_config(resolve_data_config({}, model=model)), None
    if spec.startswith("torchvision/"):
        matched = weights.member
        if matched is not None:
            t = matched.transforms()
            crop, resize = t.crop_size[0], t.resize_size[0]
            settings = DataConfig(
                input_size=(3, crop, crop),
                interpolation=t.interpolation.value,
                mean=tuple(t.mean),
                std=tuple(t.std),
                crop_pct=crop / resize,
                crop_mode="center",
            )
            return f"torchvision {type(matched).__name__}.{matched.name}", settings, t
    size = 224
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("input_size"):
        size = int(cfg["input_size"][-1])
    settings = DataConfig(
        input_size=(3, size, size),
        interpolation="bilinear",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_pct=0.875,
        crop_mode="center",
    )
    return "ImageNet default", settings, None


def _data_config(raw: Mapping[str, Any]) -> DataConfig:
    """A data config from timm's untyped dict, or from one with a config's ``data:`` keys merged in (each
    checked by ``featx.config``)."""
    channels, height, width = raw["input_size"]
    return DataConfig(
        input_size=(int(channels), int(height), int(width)),
        interpolation=str(raw["interpolation"]),
        mean=tuple(float(v) for v in raw["mean"]),
        std=tuple(float(v) for v in raw["std"]),
        crop_pct=float(raw["crop_pct"]),
        crop_mode=str(raw["crop_mode"]),
    )


def _resize_size(settings: DataConfig) -> int:
    import math

    size = settings["input_size"]
    return math.floor(size[-1] / settings["crop_pct"])  # timm's transforms_factory rounds down


def _numbers(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value
