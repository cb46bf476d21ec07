"""The backbone config a verb builds from its model argument and keywords (``backbone_config``), by one rule
for the Python API and the command line: a config (a ``.yaml`` path, a mapping, a ``BackboneConfig``, a featx
``.safetensors`` export) with the keywords over its keys, or a model SPEC or ``ModelSource`` (``is_spec``) cut
where the keywords say. ``featx.backbone.backbone_config`` is this one."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from featx.backbone.paths import FLAGS
from featx.config import BackboneConfig, is_config_path, load_config
from featx.errors import FeatxError
from featx.glue import leaf_functions_for
from featx.model_sources import KEYWORDS, ModelSource, SourceNames, model_source

# what a backbone is built from: a config (its path, a mapping, a featx .safetensors export) or a model
Model = str | os.PathLike[str] | Mapping[str, object] | BackboneConfig | ModelSource


def is_spec(model: object) -> bool:
    """Whether a verb's model argument is a model SPEC or a ``ModelSource`` rather than a config: a string
    that names no config (``featx.config.is_config_path``, the question every verb asks)."""
    return isinstance(model, ModelSource) or (isinstance(model, str) and not is_config_path(model))


def backbone_config(
    model: Model,
    *,
    upto: str | int | None = None,
    outputs: Sequence[str | int] | None = None,
    keep_glue: bool | None = None,
    leaf_functions: Sequence[Callable[..., Any]] | None = None,
    weights: str | os.PathLike[str] | None = None,
    weights_prefix: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
    input_shape: Sequence[int] | None = None,
    seed: int | None = None,
    names: SourceNames = KEYWORDS,
) -> BackboneConfig:
    """The backbone config a verb builds, by one rule for the Python API and the command line.

    A config (a ``.yaml`` path, a mapping, a ``BackboneConfig``, a featx ``.safetensors`` export) gets the
    keywords over its keys (``BackboneConfig.override``, as ``featx build|export CONFIG --upto ...`` does;
    None leaves a key as the config has it). A model SPEC or ``featx.models.ModelSource`` (``is_spec``) is
    the source ``featx.models.model_source`` makes of it and the source keywords (``names`` says what its
    errors call them), cut at ``upto`` (required) with the taps ``outputs`` (default: the cut), as a config
    of those keys whose errors name the flags that set them (its source is the command line's). ``seed``, when
    given, seeds what no weights cover (kept as the weights' ``seed``, as ``featx.models.model_source``
    keeps it).

    Raises:
        FeatxError: a SPEC without ``upto``; what ``load_config``, ``BackboneConfig.override`` and
            ``featx.models.model_source`` refuse.
    """
    if not is_spec(model):
        assert not isinstance(model, ModelSource)
        cfg = model if isinstance(model, BackboneConfig) else load_config(model)
        cfg = cfg.override(
            upto=upto,
            outputs=outputs,
            keep_glue=keep_glue,
            leaf_functions=leaf_functions,
            weights=weights,
            weights_prefix=weights_prefix,
            model_kwargs=model_kwargs,
            input_shape=input_shape,
        )
        return cfg if seed is None else cfg.with_source(model_source(cfg.model_source, seed=seed))
    assert isinstance(model, (str, ModelSource))
    given = model_source(
        model,
        weights=weights,
        weights_prefix=weights_prefix,
        model_kwargs=model_kwargs,
        seed=seed,
        names=names,
    )
    if upto is None:
        raise FeatxError(
            f"`{given.spec}` is a model spec, not a backbone config (.yaml, a featx .safetensors export); "
            "give upto, the cut"
        )
    glue = bool(keep_glue)
    leaves = leaf_functions_for(leaf_functions or (), glue)
    if isinstance(model, ModelSource):  # what it holds, the keywords over it
        held = given.weights
        weights = str(held.file) if held.file is not None else held.text
        weights_prefix, model_kwargs = held.prefix, given.model_kwargs
    # the SPEC alone, then each argument over its key (`BackboneConfig.override`, the rule a CONFIG's flags
    # follow): the keys hold what was given (an export embeds them) and errors name the flag that set them
    cfg = dataclasses.replace(load_config({"model": given.spec, "upto": upto}), source=FLAGS)
    cfg = cfg.override(
        upto=upto,
        outputs=outputs or None,  # without them the one output is the cut, named as resolved
        keep_glue=glue or None,
        leaf_functions=leaves or None,
        weights=weights,
        weights_prefix=weights_prefix,
        model_kwargs=dict(model_kwargs or {}) or None,
        input_shape=input_shape,
    )
    return cfg.with_source(given)  # the source as parsed: its seed, where each kwarg came from
