"""Config-driven multi-scale backbones for detection and segmentation heads.

``build_backbone`` cuts a model where the config says, taps the named children, freezes and normalises as
asked, and measures each output's channels and stride on a dry run — nothing is hand-written. With an
``fpn`` section it wraps the result in torchvision's ``FeaturePyramidNetwork``, so it drops into
torchvision's ``FasterRCNN``/``MaskRCNN`` as their ``backbone``.

One job per module: ``configured`` (the config a verb builds from a config or a SPEC and its keywords:
``backbone_config``), ``plan`` (a config resolved against its model: ``resolve`` -> ``BackbonePlan``),
``paths`` (the cut and taps resolved once per model), ``freeze`` (what ``freeze`` and its spellings
freeze), ``loading`` (the model built, the kept children's weights loaded), ``build`` (a plan made into a
backbone), ``body`` (the ``Backbone``/``GlueBackbone`` modules), ``taps`` (the ``Tap`` value and the dry
runs that measure it), ``tokens`` (a ViT's tokens and a Swin's NHWC stages made into NCHW maps),
``fpn`` (``BackboneWithFPN`` and finding its weights).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from featx.backbone.body import Backbone, GlueBackbone
from featx.backbone.configured import Model, backbone_config
from featx.backbone.configured import is_spec as is_spec
from featx.backbone.fpn import BackboneWithFPN, BuiltBackbone, body_of
from featx.backbone.plan import BackbonePlan, PlanError, resolve
from featx.backbone.taps import Feature, Tap
from featx.config import BackboneConfig, load_config
from featx.glue import leaf_functions_for

__all__ = [
    "Backbone",
    "BackbonePlan",
    "BackboneWithFPN",
    "BuiltBackbone",
    "Feature",
    "GlueBackbone",
    "PlanError",
    "Tap",
    "backbone_config",
    "body_of",
    "build_backbone",
    "resolve",
]


def build_backbone(
    config: Model,
    *,
    upto: str | int | None = None,
    outputs: Sequence[str | int] | None = None,
    keep_glue: bool | None = None,
    weights: str | os.PathLike[str] | None = None,
    weights_prefix: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
    seed: int = 0,
    leaf_functions: Sequence[Callable[..., Any]] | None = None,
) -> BuiltBackbone:
    """Build the backbone a config describes (a YAML path, or the same mapping as a dict): ``resolve(config).build()``.

    Returns a ``Backbone`` (a ``GlueBackbone`` with ``keep_glue: true``) — or, with ``fpn:``, a
    ``BackboneWithFPN`` around it — in eval mode, whose forward returns an ordered dict of feature maps.
    ``freeze`` freezes up to and including the named module: a child name or count freezes the children
    from the first, a dotted name (``stages.1``) the children before its container and, inside it, the
    children up to and including the named one, at any depth;
    the torchvision (``trainable_layers``), mmdetection (``frozen_stages``) and detectron2 (``freeze_at``)
    spellings count the model's stages (``layer1``..``layer4`` on a ResNet; on any other model its trunk
    split where the stride changes, ``featx.backbone.freeze.stages``). A backbone with one output has an
    int ``out_channels`` (as torchvision's heads read it), with several the mapping output -> channels;
    ``channels`` is that mapping in both cases.
    ``weights`` (a file, a torchvision weights name, a timm tag, ``hf-hub:org/name``), ``weights_prefix``
    and ``model_kwargs`` replace the config's, as ``featx build CONFIG --weights FILE`` does: a shipped
    config builds on one's own weights without being copied. What no weights cover (a config with
    ``weights: null``, a new FPN) is initialised from ``seed``, as ``featx build --seed`` does: one seed,
    one backbone; the caller's random state is left as it was. ``leaf_functions`` (a config with
    ``keep_glue: true`` only) replace the config's ``leaf_functions``: the functions keep_glue's trace keeps
    whole, as ``featx.truncate(..., keep_glue=True, leaf_functions=...)`` takes them. ``upto``,
    ``outputs`` and ``keep_glue`` replace the config's keys, as ``--upto``, ``--outputs`` and
    ``--keep-glue`` do.

    ``config`` may also be a model, as ``featx build SPEC --upto X`` takes it: a spec
    (``torchvision/resnet50``) or a ``featx.models.ModelSource``, with the keywords above; ``upto`` is then
    required and ``outputs`` default to the cut (``backbone_config``).

    Example:
        >>> backbone = featx.build_backbone({"model": "torchvision/resnet50", "upto": "layer4",
        ...                                  "outputs": ["layer2", "layer3", "layer4"]})
        >>> backbone.out_channels, backbone.strides
        ({'layer2': 512, 'layer3': 1024, 'layer4': 2048}, {'layer2': 8, 'layer3': 16, 'layer4': 32})

    Raises:
        FeatxError: a bad config (naming the file and key), a tap after the cut or not a child, ``freeze``
            past the cut, a bad weights file.
    """
    spec = is_spec(config)
    cfg = backbone_config(
        config,
        upto=upto,
        outputs=outputs,
        keep_glue=keep_glue,
        leaf_functions=leaf_functions if spec else None,
        weights=weights,
        weights_prefix=weights_prefix,
        model_kwargs=model_kwargs,
    )
    if leaf_functions is not None and not spec:
        cfg = _with_leaf_functions(cfg, leaf_functions)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return resolve(cfg).build()


def _with_leaf_functions(
    config: str | os.PathLike[str] | Mapping[str, object] | BackboneConfig,
    leaf_functions: Sequence[Callable[..., Any]],
) -> BackboneConfig:
    """The config with ``leaf_functions`` in place of its own (refused for a config without keep_glue)."""
    cfg = config if isinstance(config, BackboneConfig) else load_config(config)
    leaves = leaf_functions_for(leaf_functions, cfg.keep_glue)
    changed = dataclasses.replace(cfg, leaf_functions=leaves)
    changed.__dict__["model_source"] = cfg.model_source  # parsed already: the cached value
    return changed
