"""What an artifact records about itself, and the inputs it is checked on: its metadata (versions, the
cut, output names, channels and strides, the weights' fingerprint or a random init's seed, the tolerance
and how it is read, the config that rebuilds it), the input shapes it is checked at (``CHECK_SIZES``, or
a fixed-size model's own size), and the seeded example inputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from featx._version import __version__
from featx.artifact_running import device_of, no_grad
from featx.artifact_writing import INPUT_NAME, Outputs, quiet
from featx.backbone.plan import BackbonePlan
from featx.errors import FeatxError
from featx.function_names import function_name
from featx.model_sources import source_of
from featx.numerics import environment
from featx.render.text import shape_text

CHECK_SIZES = ((1, 97, 131), (3, 160, 128))  # (batch, height, width) the artifact is checked at
# What an artifact's `tolerance` metadata says its atol/rtol mean: ELEMENTWISE, ``|a - b| <= atol + rtol * |b|``
# per element (written since this key exists); MAX_SCALED, ``max |a - b| <= atol + rtol * max |b|`` per output
# (the rule of artifacts written before it, which carry no `tolerance` key: they are checked as written).
ELEMENTWISE, MAX_SCALED = "elementwise", "max-scaled"
TOLERANCE_RULES = (ELEMENTWISE, MAX_SCALED)


def fixed_size(plan: BackbonePlan) -> bool:
    """Whether the backbone runs at its own input size only (a timm ViT or Swin asserts its
    ``img_size``): it is then exported and checked at that size, with static height and width. Found by
    running it once at the first of ``CHECK_SIZES``; the build's dry run already ran it at its own size."""
    shape = plan.input_shape
    if len(shape) != 4:
        return False
    batch, height, width = CHECK_SIZES[0]
    wrapped = Outputs(plan).eval()
    x = example_input((batch, shape[1], height, width), None, 0).to(device_of(wrapped))
    try:
        with quiet():
            no_grad(wrapped, x)
    except Exception:
        return True
    return False


def check_shapes(input_shape: tuple[int, ...], fmt: str, fixed: bool = False) -> list[tuple[int, ...]]:
    if len(input_shape) != 4:
        if fmt != "safetensors":
            raise FeatxError(
                f"{fmt} export takes an image batch N x C x H x W with dynamic batch, height and width; "
                f"the config's input shape is {shape_text(input_shape)} (`verify.input_shape`)"
            )
        return [tuple(input_shape)]
    if fixed:  # its own size only
        return [(batch, *input_shape[1:]) for batch, _, _ in CHECK_SIZES]
    return [(batch, input_shape[1], h, w) for batch, h, w in CHECK_SIZES]


def example_input(shape: Sequence[int], batch: int | None, seed: int) -> torch.Tensor:
    shape = (batch, *shape[1:]) if batch is not None else tuple(shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _weights_record(plan: BackbonePlan) -> dict[str, object] | None:
    """The source weights' fingerprint (``WeightsSource.fingerprint()``, as resolved when the model was
    built); None when featx did not build the model."""
    built = source_of(plan.model)
    return None if built is None else built.weights.fingerprint()


def metadata_for(
    plan: BackbonePlan,
    fmt: str,
    out: Path,
    atol: float,
    rtol: float,
    shapes: Sequence[tuple[int, ...]],
    fixed: bool = False,
    seed: int | None = None,
) -> dict[str, str]:
    """What the artifact says about itself (string values: safetensors and ONNX metadata are strings).
    ``seed`` is the seed of a random init (no weights), None when the weights came from somewhere."""
    cfg = plan.config
    raw = {k: v for k, v in cfg.raw.items() if k != "artifacts"}
    weights = cfg.model_source.weights
    # the constructor's own download switches (`weights=`, `pretrained=`) are kept only where they are the
    # weights' one record (`pretrained: true`); everywhere else `weights` says it
    raw["model_kwargs"] = dict(cfg.model_source.model_kwargs)
    if cfg.leaf_functions:  # by name, as the config key takes them (a dict config may hold the functions)
        raw["leaf_functions"] = [function_name(f) for f in cfg.leaf_functions]
    if fmt == "safetensors":  # the config that rebuilds this backbone from this very file
        raw.update(weights=out.name, weights_prefix=None)
        switches = ("weights", "pretrained")  # torchvision's deprecated `pretrained=True` stays in the kwargs
        raw["model_kwargs"] = {k: v for k, v in cfg.model_source.model_kwargs.items() if k not in switches}
    elif weights.file is not None:  # where the weights are, seen from the artifact's folder
        raw["weights"] = os.path.relpath(os.path.abspath(weights.file), os.path.abspath(out.parent))
    elif weights.text is not None:  # a name is recorded as a name (`IMAGENET1K_V1`, `a1_in1k`, `hf-hub:...`)
        raw["weights"] = weights.text
    else:
        raw["model_kwargs"] = dict(cfg.model_kwargs)
    metadata = {
        "featx_version": __version__,
        "featx_format": fmt,
        "torch_version": torch.__version__,
        "source_model": cfg.model,
        "upto": plan.cut.upto,  # the last module run, dotted for a nested cut
        "outputs": json.dumps(dict(cfg.outputs)),
        "output_names": json.dumps([name for name, _, _ in plan.maps]),
        "channels": json.dumps({name: channels for name, channels, _ in plan.maps}),
        "strides": json.dumps({name: stride for name, _, stride in plan.maps}),
        "fpn": json.dumps(
            None
            if cfg.fpn is None
            else {
                "out_channels": cfg.fpn.out_channels,
                "extra_blocks": cfg.fpn.extra_blocks,
                "extra_pool": cfg.fpn.extra_pool,
            }
        ),
        "input_name": INPUT_NAME,
        "input_shape": json.dumps(list(plan.input_shape)),
        "dynamic_axes": json.dumps({"0": "batch"} if fixed else {"0": "batch", "2": "height", "3": "width"}),
        "random_weights": json.dumps(seed is not None),
        "seed": json.dumps(seed),
        # what the weights were: a name as a name, with its cache file's sha256; a file by its sha256
        "weights": json.dumps({"random": True, "seed": seed} if seed is not None else _weights_record(plan)),
        "atol": repr(atol),
        "rtol": repr(rtol),
        "tolerance": ELEMENTWISE,  # how atol/rtol are read; artifacts without this key: MAX_SCALED
        "check_shapes": json.dumps([list(s) for s in shapes]),
        "config": json.dumps(raw, default=str),
        # where it was exported and checked before it was written: the backbone's device (docs/json.md)
        "environment": json.dumps(environment(device_of(plan.build()))),
    }
    if fmt == "safetensors":
        metadata["format"] = "pt"  # safetensors' own key: the tensors are PyTorch's
    return metadata
