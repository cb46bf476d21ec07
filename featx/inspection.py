"""What a model's full forward shows with no cut: ``inspect`` (its children, glue and residuals, an
``Anatomy``), the anatomy with the numeric environment it was recorded in (``_anatomy``, also every
verdict's), and the input every verb runs on by default (``example``, whose shape is ``example_shape``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from featx.anatomy import anatomy_of
from featx.anatomy_values import Anatomy
from featx.errors import FeatxError
from featx.guard import device_of, preserved
from featx.input_checks import _model, _modes, _require_any_child
from featx.input_shapes import default_input_shape
from featx.model_sources import ModelSource
from featx.numerics import Numerics, environment
from featx.record import record
from featx.recording import Recording
from featx.vocab import MODES


def inspect(
    model: nn.Module | str | ModelSource,
    example_input: Any = None,
    *,
    modes: Sequence[str] = MODES,
    seed: int = 0,
    label: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    weights_prefix: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
) -> Anatomy:
    """The children, glue and residuals of ``model`` as its full forward shows them, with no cut;
    ``label`` and the model's source keywords as in ``verify``."""
    model, label = _model(model, label, seed, weights, weights_prefix, model_kwargs)
    modes = _modes(modes)
    x = example(model, example_input, seed, label=label)
    with preserved(model) as snapshot:
        recordings = record(model, x, modes, seed, snapshot)
    _require_any_child(recordings)
    return _anatomy(model, label, x, recordings, snapshot.by_name)


def _anatomy(
    model: nn.Module,
    label: str,
    x: Any,
    recordings: dict[str, Recording],
    modules: dict[str, nn.Module],
    numerics: Numerics | None = None,
) -> Anatomy:
    """``anatomy_of`` with the numeric environment the forwards ran in: the device of the input (else of
    the model's parameters) and the numeric setting (float32 eager unless ``numerics`` says otherwise)."""
    anatomy = anatomy_of(model, label, x, recordings, modules)
    return dataclasses.replace(anatomy, environment=environment(device_of(x, model), numerics))


def example(
    model: nn.Module,
    example_input: Any,
    seed: int,
    shape: Sequence[int] | None = None,
    *,
    label: str | None = None,
) -> Any:
    """``example_input``, or a seeded normal batch of ``shape`` (default: batch 2 at the model's own input
    size) on the model's device, in its dtype. ``label`` names the model when it declares no input size."""
    if example_input is not None:
        return example_input
    shape = tuple(shape) if shape is not None else default_input_shape(model, label=label)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    return x


def example_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The shape ``example`` makes by default (batch included), or None when the model declares none: what
    a given input shape's number of dimensions is checked against."""
    try:
        return default_input_shape(model)
    except FeatxError:
        return None
