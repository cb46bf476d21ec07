"""A backbone with torchvision's ``FeaturePyramidNetwork`` on top (``BackboneWithFPN``), and the FPN's
weights found where torchvision, mmdetection, detectron2 or ``featx export`` store them."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import TypeAlias

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from featx.backbone.body import Backbone, GlueBackbone
from featx.checkpoints import Checkpoint, load_weights, read_state_dict
from featx.config import BackboneConfig
from featx.errors import FeatxError, listing


class BackboneWithFPN(nn.Module):
    """A ``Backbone`` followed by torchvision's ``FeaturePyramidNetwork``, named as torchvision names its maps.

    Like torchvision's own ``BackboneWithFPN``, the forward returns the pyramid under the names ``'0'``,
    ``'1'``, ... in the order the body returns its taps (the children's order), then the extra levels
    (``extra_blocks``): ``'pool'`` (``LastLevelMaxPool``, stride twice the last tap's), or ``'p6'`` and
    ``'p7'`` (``LastLevelP6P7``, strides 2 and 4 times the last tap's), whatever the config calls its
    outputs: torchvision's default ``MultiScaleRoIAlign`` pools ``'0'``..``'3'``, so four taps drop into
    ``FasterRCNN(backbone, num_classes)`` as they are. ``map_names`` maps the config's output names to
    these; ``body(x)`` still returns the taps under the config's names. ``out_channels`` is an int, as
    torchvision's heads expect; ``strides`` maps each map name to its measured stride. For another number
    of taps, pass the anchor generator and RoI pooler the backbone makes for its own maps::

        FasterRCNN(backbone, num_classes, rpn_anchor_generator=backbone.anchor_generator(),
                   box_roi_pool=backbone.roi_pooler())
        RetinaNet(backbone, num_classes, anchor_generator=backbone.anchor_generator())  # extra_blocks: p6p7

    ``extra_blocks``: ``pool``, ``p6p7`` (P6 from P5, in ``out_channels``: torchvision's
    ``retinanet_resnet50_fpn`` and ``fcos_resnet50_fpn``), ``p6p7_c5`` (P6 from the last tap, in its
    channels: ``retinanet_resnet50_fpn_v2``) or ``none``; ``True``/``False`` are the old ``extra_pool``.
    """

    def __init__(
        self, body: Backbone | GlueBackbone, out_channels: int, extra_blocks: str | bool = "pool"
    ) -> None:
        super().__init__()
        if isinstance(extra_blocks, bool):  # the old `extra_pool`
            extra_blocks = "pool" if extra_blocks else "none"
        self.body = body
        outputs = list(body.channels)  # in the order the body returns them, as the dry run measured
        self.map_names = {output: str(i) for i, output in enumerate(outputs)}
        self.extra_blocks = extra_blocks
        self.fpn = FeaturePyramidNetwork(
            [body.channels[output] for output in outputs],
            out_channels,
            extra_blocks=_extra_blocks(extra_blocks, body.channels[outputs[-1]], out_channels),
        )
        self.out_channels = out_channels
        self.strides = {self.map_names[output]: body.strides[output] for output in outputs}
        last = body.strides[outputs[-1]]
        if extra_blocks == "pool":
            self.strides["pool"] = 2 * last
        elif extra_blocks in ("p6p7", "p6p7_c5"):
            self.strides.update(p6=2 * last, p7=4 * last)
        self.fpn_loaded = False  # True when the weights file held the FPN's tensors (else: its own init)
        # where the FPN's tensors came from (`backbone.fpn.*`, torchvision's layout), or why it is at its init
        self.fpn_source = "`weights: null`"

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        taps = self.body(x)
        return self.fpn(OrderedDict((self.map_names[name], feature) for name, feature in taps.items()))

    def anchor_generator(
        self,
        aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        *,
        sizes: tuple[tuple[int, ...], ...] | None = None,
    ) -> AnchorGenerator:
        """An anchor generator with one tuple of anchor sizes per map, the extra levels included, in the
        default of the detector the extra levels are for:

        - ``pool``/``none`` (Faster R-CNN's RPN): one size per map, 8 times its stride — torchvision's
          default (32..512 at strides 4..64) for the usual four taps and ``pool``, its continuation for
          any other taps (strides 8, 16, 32, 64 get 64..512);
        - ``p6p7``/``p6p7_c5`` (RetinaNet, FCOS): three sizes per map an octave apart from 4 times its
          stride, ``(x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3)))`` — torchvision's RetinaNet default
          (x = 32..512 at strides 8..128) for taps at strides 8, 16, 32.

        ``sizes`` gives the sizes per map instead (one tuple per map, in ``strides`` order).

        Raises:
            FeatxError: ``sizes`` with another number of tuples than the backbone has maps.
        """
        if sizes is None:
            if self.extra_blocks.startswith("p6p7"):
                base = [4 * stride for stride in self.strides.values()]
                sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in base)
            else:
                sizes = tuple((8 * stride,) for stride in self.strides.values())
        elif len(sizes) != len(self.strides):
            raise FeatxError(
                f"anchor_generator(sizes=...) has {len(sizes)} tuples of sizes; the backbone has "
                f"{len(self.strides)} maps ({listing(list(self.strides), len(self.strides))}), one tuple each"
            )
        return AnchorGenerator(tuple(sizes), (tuple(aspect_ratios),) * len(sizes))

    def roi_pooler(self, output_size: int = 7, sampling_ratio: int = 2) -> MultiScaleRoIAlign:
        """torchvision's ``MultiScaleRoIAlign`` over the maps of this backbone's taps, the extra levels
        (``'pool'``, ``'p6'``, ``'p7'``) excluded, as Faster R-CNN's default does; ``output_size=14`` is
        Mask R-CNN's ``mask_roi_pool``."""
        names = list(self.map_names.values())
        return MultiScaleRoIAlign(names, output_size=output_size, sampling_ratio=sampling_ratio)


def _extra_blocks(extra_blocks: str, last_channels: int, out_channels: int) -> ExtraFPNBlock | None:
    """torchvision's block for the levels after the taps. ``LastLevelP6P7`` picks P5 or C5 by whether its
    in and out channels are equal; here the config says which (``use_P5``), so a last tap that happens to
    have ``out_channels`` channels still feeds P6 from where the config asked."""
    if extra_blocks == "pool":
        return LastLevelMaxPool()
    if extra_blocks == "none":
        return None
    from_p5 = extra_blocks == "p6p7"
    block = LastLevelP6P7(out_channels if from_p5 else last_channels, out_channels)
    block.use_P5 = from_p5
    return block


BuiltBackbone: TypeAlias = "Backbone | GlueBackbone | BackboneWithFPN"  # what build_backbone returns


def body_of(backbone: BuiltBackbone) -> Backbone | GlueBackbone:
    """The kept children's part of what ``build_backbone`` returned: itself, or an FPN's ``body``."""
    return backbone.body if isinstance(backbone, BackboneWithFPN) else backbone


def _load_fpn(wrapped: BackboneWithFPN, cfg: BackboneConfig) -> None:
    """The FPN's weights from the config's weights file, found where each ecosystem stores them
    (``_fpn_keys``); a backbone checkpoint without them leaves the FPN at its init, to train with the
    head, and ``wrapped.fpn_source`` says what was looked for.

    Raises:
        FeatxError: an FPN found in the file that does not fit torchvision's over these taps (a tensor
            missing or mis-shaped; with ``strict``, tensors it has no place for: more levels, extra convs).
    """
    weights = cfg.model_source.weights
    if weights.file is None:  # a pretrained weights name holds no FPN
        wrapped.fpn_source = f"`weights: {cfg.weights}` names pretrained weights, which hold no FPN"
        return
    keys = list(read_state_dict(weights.file))
    looked, found = _fpn_keys(keys, cfg.weights_prefix, wrapped.fpn.state_dict())
    if found is None:
        wrapped.fpn_source = f"`{cfg.weights}` holds no FPN tensors; looked for {listing(looked)}"
        return
    where, mapping, namespace = found
    key = f"{cfg.source}: key `weights` (its `{where}` keys, for `fpn`)"
    if "neck" in where and wrapped.extra_blocks.startswith("p6p7"):
        # mmdetection's extra convs run P7 on P6 without the ReLU unless `relu_before_extra_convs`, which
        # the file does not record: loaded into LastLevelP6P7 they could compute something else
        raise FeatxError(
            f"{key}: `fpn.extra_blocks: {wrapped.extra_blocks}` is torchvision's LastLevelP6P7 (a ReLU "
            "between P6 and P7), and an mmdetection file does not say whether its extra convs had one "
            "(`relu_before_extra_convs`); featx reads P6/P7 in torchvision's and detectron2's layouts only"
        )
    present = set(keys)
    missing = [file_key for file_key in mapping.values() if file_key not in present]
    if missing:
        raise FeatxError(
            f"{key}: the file has no {listing(missing, 4)}, which torchvision's FeaturePyramidNetwork over "
            f"{len(wrapped.map_names)} taps needs"
        )
    extra = sorted(set(namespace) - set(mapping.values()))
    if extra and cfg.strict:
        raise FeatxError(
            f"{key}: torchvision's FeaturePyramidNetwork over {len(wrapped.map_names)} taps has no place for "
            f"{listing(extra, 4)} (more levels, extra convs or norms); tap as many levels as the "
            "file's FPN has, or set `strict: false` to leave those out"
        )
    try:
        load_weights(wrapped.fpn, Checkpoint(weights.file, str(weights.text), keys=mapping))
    except FeatxError as err:
        raise FeatxError(f"{key}: {err}") from None
    wrapped.fpn_loaded = True
    wrapped.fpn_source = f"from `{where}` in `{cfg.weights}`"


def _fpn_keys(
    keys: list[str], prefix: str | None, own: Mapping[str, torch.Tensor]
) -> tuple[list[str], tuple[str, dict[str, str], list[str]] | None]:
    """Where a checkpoint stores the FPN, as ``(the patterns looked for, found)``; ``found`` is the pattern
    that matched, torchvision's FPN key -> file key, and every file key of that FPN (None: no FPN).

    The FPN is looked for beside the body's ``prefix`` and under each of its parents, nearest first
    (``backbone.body.`` -> ``backbone.``, ``''``), in three layouts, mapped onto torchvision's
    ``FeaturePyramidNetwork`` (``inner_blocks.N.0.*``, ``layer_blocks.N.0.*``):
    torchvision and ``featx export`` (``fpn.inner_blocks.N.0.*``; torchvision's detectors store the body at
    ``backbone.body.`` and the FPN at ``backbone.fpn.``), mmdetection (``neck.lateral_convs.N.conv.*``,
    ``neck.fpn_convs.N.conv.*``) and detectron2 (``fpn_lateral{2..5}.*``, ``fpn_output{2..5}.*`` beside
    ``bottom_up.``, levels in order).
    """
    dotted = (prefix or "").strip().rstrip(".")
    parts = dotted.split(".") if dotted else []
    scopes = [".".join(parts[:n]) + "." if n else "" for n in range(len(parts), -1, -1)]
    looked: list[str] = []
    for scope in scopes:
        for pattern, namespace in (
            (f"{scope}fpn.*", (f"{scope}fpn.",)),
            (f"{scope}neck.lateral_convs.*", (f"{scope}neck.",)),
            (f"{scope}fpn_lateral*", (f"{scope}fpn_lateral", f"{scope}fpn_output", f"{scope}top_block.")),
        ):
            looked.append(pattern)
            held = [k for k in keys if k.startswith(namespace)]
            if not any(k.startswith(pattern[:-1]) for k in held):
                continue
            if pattern.endswith("fpn.*"):
                mapping = {k: f"{scope}fpn.{k}" for k in own}
            elif "neck" in pattern:
                mapping = {
                    k: _renamed(
                        k, f"{scope}neck.lateral_convs.{{}}.conv.", f"{scope}neck.fpn_convs.{{}}.conv.", None
                    )
                    for k in own
                }
            else:
                levels = sorted(
                    {
                        int(m.group(1))
                        for k in held
                        if (m := re.match(re.escape(scope) + r"fpn_lateral(\d+)\.", k))
                    }
                )
                mapping = {
                    k: _renamed(k, f"{scope}fpn_lateral{{}}.", f"{scope}fpn_output{{}}.", levels) for k in own
                }
            return looked, (pattern, mapping, held)
    return looked, None


def _renamed(key: str, lateral: str, output: str, levels: list[int] | None) -> str:
    """torchvision's FPN key (``inner_blocks.1.0.weight``) in another layout: ``lateral``/``output`` with
    ``{}`` for the level (the index, or the index-th of ``levels``)."""
    if key.startswith("extra_blocks."):  # LastLevelP6P7: detectron2 stores it as `top_block.p6.*`
        return lateral.split("fpn_lateral")[0] + "top_block." + key.split(".", 1)[1]
    blocks, index, _, tensor = key.split(".", 3)
    level = int(index) if levels is None else (levels[int(index)] if int(index) < len(levels) else -1)
    return (lateral if blocks == "inner_blocks" else output).format(level) + tensor
