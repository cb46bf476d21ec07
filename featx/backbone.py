"""Config-driven multi-scale backbones for detection and segmentation heads.

``build_backbone`` cuts a model where the config says, taps the named children, freezes and normalises as
asked, and measures each output's channels and stride on a dry run — nothing is hand-written. With an
``fpn`` section it wraps the result in torchvision's ``FeaturePyramidNetwork``, so it drops into
torchvision's ``FasterRCNN``/``MaskRCNN`` as their ``backbone``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import NoReturn, TypeAlias

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from featx.config import BackboneConfig, VerifySpec, load_config
from featx.cut import CutPath, child_names, resolve_path
from featx.errors import FeatxError, FeatxWarning, did_you_mean, listing, one_line
from featx.glue import KeepGlue, captured, chain_break, trace_root
from featx.models import (
    Checkpoint,
    build_model,
    check_input_shape,
    default_input_shape,
    load_weights,
    read_state_dict,
)
from featx.truncation import truncated

_STAGES = ("layer1", "layer2", "layer3", "layer4")  # ResNet stages, as torchvision and timm name them


class Backbone(nn.ModuleDict):
    """The kept children of a model, run in order, returning the tapped feature maps by output name.

    Children keep their names, so ``state_dict()`` keys are the full model's. A container that a nested
    tap or cut reaches into (``stages`` for ``outputs: [stages.1, stages.2]``) is an ``nn.Sequential`` of
    its kept children, the same module objects under the same names, and runs them one by one so the taps
    inside it see their outputs; the build refuses a container whose own forward does more than that (a
    residual block's add). Each tap is what its module returned: a later module that writes to its input
    in place does not change it. Frozen children have ``requires_grad=False`` and stay in eval mode under
    ``.train()``; with ``norm_eval`` every BatchNorm does (mmdetection's ``norm_eval``). ``out_channels``
    and ``strides`` map output names to what a dry run measured.
    """

    def __init__(
        self,
        children: Mapping[str, nn.Module],
        taps: Mapping[str, list[str]],
        frozen: list[str],
        norm_eval: bool,
        expanded: tuple[str, ...] = (),
    ) -> None:
        super().__init__(children)
        self.taps = dict(taps)  # dotted module name -> output names
        self.expanded = tuple(expanded)  # containers run child by child (dotted names)
        self.nested = bool(self.expanded)
        self.frozen = list(frozen)
        self.norm_eval = norm_eval
        self.out_channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        self.shapes: dict[str, list[int]] = {}  # at the dry run's input shape
        self.input_shape: tuple[int, ...] = ()  # the dry run's input shape
        self.output_names: list[str] = [o for outputs in self.taps.values() for o in outputs]  # config order
        self.source_params = 0  # parameters of the whole model the children were cut from
        self.upto = list(self.keys())[-1] if len(self) else ""  # the last module run (dotted if nested)
        for name in self.frozen:
            self.get_submodule(name).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not torch.jit.is_scripting() and self.nested:  # TorchScript takes the children loop below
            return _run_nested(self, x)
        # A module may write to its input in place (torchvision's `relu` after `bn1` is ReLU(inplace=True)),
        # so a tap is copied just before the next module runs; the last module's taps are not copied.
        # Copying only before a module seen to write in place would save the copy, but no attribute says
        # so soundly: any forward may (`x += y`, `x.mul_(g)`), in one mode or for some inputs. The cost is
        # one copy of each earlier tap: 28 MiB and ~4% of the forward for resnet50 layer1..layer4 at 512x512.
        out = OrderedDict()
        held: list[str] = []  # the outputs that hold `x` itself: cloned before the next module runs
        for name, module in self.items():
            if len(held) > 0:
                value = x.clone() if torch.jit.is_scripting() else captured(x)  # TorchScript's are tensors
                for output in held:
                    out[output] = value
                held = []
            x = module(x)
            if name in self.taps:
                for output in self.taps[name]:
                    out[output] = x
                held = self.taps[name]
        return out

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        _hold_frozen(self, self.frozen, self.norm_eval)
        return self


class GlueBackbone(KeepGlue):
    """``Backbone`` for a config with ``keep_glue: true``: the root's own forward up to the cut (see
    ``featx.glue.KeepGlue``), returning the value of each tapped module in the full forward by output name.

    A cut or tap inside a container (``stages.2``) is made by that container's own traced forward, so
    its glue is kept too, and the tap is exactly what the named module returns in the full forward — at
    the last child too, where ``truncate(..., keep_glue=True)`` returns the model's output instead. Same
    attributes as ``Backbone`` (``taps``, ``frozen``, ``out_channels``, ``strides``, ``shapes``,
    ``keys()``); ``state_dict()`` keys are the full model's.
    """

    def __init__(
        self, keep: KeepGlue, taps: Mapping[str, list[str]], frozen: list[str], norm_eval: bool
    ) -> None:
        nn.Module.__init__(self)
        self.__dict__.update(keep.__dict__)  # its mode too: that of the model it was cut from
        self.taps: dict[str, list[str]] = dict(taps)  # tapped child -> output names, as Backbone's
        self.frozen = list(frozen)
        self.norm_eval = norm_eval
        self.out_channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        self.shapes: dict[str, list[int]] = {}
        self.input_shape: tuple[int, ...] = ()  # the dry run's input shape
        self.output_names: list[str] = [o for outputs in self.taps.values() for o in outputs]  # config order
        self.source_params = 0
        for name in self.frozen:
            self.get_submodule(name).requires_grad_(False)

    def keys(self) -> list[str]:
        """The kept children's names, in the model's order (as ``Backbone.keys()``)."""
        return [name for name, _ in self.named_children()]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        values = super().forward(x)
        if not isinstance(values, dict):  # one tap, at the cut
            values = {self.upto: values}
        return OrderedDict(
            (output, values[child]) for child, outputs in self.taps.items() for output in outputs
        )

    def train(self, mode: bool = True) -> GlueBackbone:
        super().train(mode)
        _hold_frozen(self, self.frozen, self.norm_eval)
        return self


def _hold_frozen(backbone: nn.Module, frozen: list[str], norm_eval: bool) -> None:
    """Frozen modules stay in eval mode; with ``norm_eval`` every BatchNorm does."""
    for name in frozen:
        backbone.get_submodule(name).eval()
    if norm_eval:
        for module in backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _run_nested(backbone: Backbone, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``backbone``'s forward when containers run child by child: each kept module in turn, tapped (each
    tap copied before the next module runs, as in ``Backbone.forward``)."""
    out: dict[str, torch.Tensor] = OrderedDict()
    expanded = set(backbone.expanded)
    held: list[str] = []  # the outputs that hold `x` itself: cloned before the next module runs

    def run(container: nn.Module, prefix: str, x: torch.Tensor) -> torch.Tensor:
        for name, module in container.named_children():
            dotted = prefix + name
            if dotted in expanded:
                x = run(module, dotted + ".", x)
            else:
                if held:
                    value = captured(x)
                    out.update(dict.fromkeys(held, value))
                    held.clear()
                x = module(x)
            for output in backbone.taps.get(dotted, ()):
                out[output] = x
                held.append(output)
        return x

    run(backbone, "", x)
    return out


class BackboneWithFPN(nn.Module):
    """A ``Backbone`` followed by torchvision's ``FeaturePyramidNetwork``, named as torchvision names its maps.

    Like torchvision's own ``BackboneWithFPN``, the forward returns the pyramid under the names ``'0'``,
    ``'1'``, ... in the order the body returns its taps (the children's order), then ``'pool'`` (the extra max-pool level, with
    ``extra_pool``), whatever the config calls its outputs: torchvision's default ``MultiScaleRoIAlign``
    pools ``'0'``..``'3'``, so four taps drop into ``FasterRCNN(backbone, num_classes)`` as they are.
    ``map_names`` maps the config's output names to these; ``body(x)`` still returns the taps under the
    config's names. ``out_channels`` is an int, as torchvision's heads expect; ``strides`` maps each map
    name to its measured stride (``'pool'`` is twice the last). For another number of taps, pass the
    anchor generator and RoI pooler the backbone makes for its own maps::

        FasterRCNN(backbone, num_classes, rpn_anchor_generator=backbone.anchor_generator(),
                   box_roi_pool=backbone.roi_pooler())
    """

    def __init__(self, body: Backbone | GlueBackbone, out_channels: int, extra_pool: bool) -> None:
        super().__init__()
        self.body = body
        outputs = list(body.out_channels)  # in the order the body returns them, as the dry run measured
        self.map_names = {output: str(i) for i, output in enumerate(outputs)}
        self.fpn = FeaturePyramidNetwork(
            [body.out_channels[output] for output in outputs],
            out_channels,
            extra_blocks=LastLevelMaxPool() if extra_pool else None,
        )
        self.out_channels = out_channels
        self.strides = {self.map_names[output]: body.strides[output] for output in outputs}
        if extra_pool:
            self.strides["pool"] = 2 * body.strides[outputs[-1]]
        self.fpn_loaded = False  # True when the weights file held the FPN's tensors (else: its own init)
        # where the FPN's tensors came from (`backbone.fpn.*`, torchvision's layout), or why it is at its init
        self.fpn_source = "`weights: null`"

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        taps = self.body(x)
        return self.fpn(OrderedDict((self.map_names[name], feature) for name, feature in taps.items()))

    def anchor_generator(self, aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)) -> AnchorGenerator:
        """An RPN anchor generator with one anchor size per map, 8 times its stride: torchvision's
        Faster R-CNN default (32..512 at strides 4..64) for the usual four taps and ``pool``, and its
        continuation for any other taps (strides 8, 16, 32, 64 get 64..512)."""
        sizes = tuple((8 * stride,) for stride in self.strides.values())
        return AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(sizes))

    def roi_pooler(self, output_size: int = 7, sampling_ratio: int = 2) -> MultiScaleRoIAlign:
        """torchvision's ``MultiScaleRoIAlign`` over this backbone's maps, ``'pool'`` excluded, as Faster
        R-CNN's default does; ``output_size=14`` is Mask R-CNN's ``mask_roi_pool``."""
        names = [name for name in self.strides if name != "pool"]
        return MultiScaleRoIAlign(names, output_size=output_size, sampling_ratio=sampling_ratio)


BuiltBackbone: TypeAlias = "Backbone | GlueBackbone | BackboneWithFPN"  # what build_backbone returns


def build_backbone(
    config: str | os.PathLike[str] | Mapping[str, object] | BackboneConfig,
) -> BuiltBackbone:
    """Build the backbone a config describes (a YAML path, or the same mapping as a dict): ``resolve(config).build()``.

    Returns a ``Backbone`` (a ``GlueBackbone`` with ``keep_glue: true``) — or, with ``fpn:``, a
    ``BackboneWithFPN`` around it — in eval mode, whose forward returns an ordered dict of feature maps.
    ``freeze`` freezes up to and including the named module: a child name or count freezes the children
    from the first, a dotted name (``stages.1``) the children before its container and, inside it, the
    children up to and including the named one, at any depth;
    the torchvision (``trainable_layers``), mmdetection (``frozen_stages``) and detectron2 (``freeze_at``)
    spellings are translated on ResNet stage names (``layer1``..``layer4``).

    Example:
        >>> backbone = featx.build_backbone({"model": "torchvision/resnet50", "upto": "layer4",
        ...                                  "outputs": ["layer2", "layer3", "layer4"]})
        >>> backbone.out_channels, backbone.strides
        ({'layer2': 512, 'layer3': 1024, 'layer4': 2048}, {'layer2': 8, 'layer3': 16, 'layer4': 32})

    Raises:
        FeatxError: a bad config (naming the file and key), a tap after the cut or not a child, ``freeze``
            past the cut, a bad weights file.
    """
    return resolve(config).build()


@dataclasses.dataclass(frozen=True)
class Tap:
    """One output of a backbone, as timm's ``FeatureInfo`` lists them, as a value: its name, the module it
    taps (``child``: a child name, or a dotted path such as ``stages.2``), and once a dry run has measured
    it (``measured``), its channels, stride and shape (at the plan's input shape). ``resolve`` makes the
    taps of a config once; build, check, export, extract and the JSON read them. ``featx.Feature`` is this
    value, measured."""

    name: str
    child: str
    channels: int | None = None
    stride: int | None = None
    shape: tuple[int, ...] | None = None

    @property
    def module(self) -> str:
        """The tapped module's dotted name (``child``)."""
        return self.child

    @property
    def measured(self) -> bool:
        return self.shape is not None

    def measure(self, channels: int, stride: int, shape: Iterable[int]) -> Tap:
        """This tap with what a dry run measured."""
        return dataclasses.replace(self, channels=channels, stride=stride, shape=tuple(shape))

    def to_dict(self) -> dict[str, object]:
        """``{"name", "child", "channels", "stride", "shape"}``: an entry of ``featx build --json``'s
        ``outputs`` (None where not measured)."""
        return {
            "name": self.name,
            "child": self.child,
            "channels": self.channels,
            "stride": self.stride,
            "shape": None if self.shape is None else list(self.shape),
        }


Feature = Tap  # the public name of a measured tap (``BackbonePlan.features``)


def by_module(taps: Iterable[Tap]) -> dict[str, list[str]]:
    """The taps as the backbone runs them: tapped module -> its output names, modules in the order they
    are first tapped."""
    grouped: dict[str, list[str]] = {}
    for tap in taps:
        grouped.setdefault(tap.child, []).append(tap.name)
    return grouped


class PlanError(FeatxError):
    """A config that resolves as far as its cut and taps and then fails (``freeze`` past the cut): the cut
    and the ``(output, child)`` taps ride along, so ``featx check`` still shows them."""

    def __init__(self, message: str, upto: str, outputs: tuple[tuple[str, str], ...]) -> None:
        super().__init__(message)
        self.upto = upto
        self.outputs = outputs


@dataclasses.dataclass(frozen=True, eq=False)
class BackbonePlan:
    """What a config means for its concrete model, resolved once (``resolve``): the one place a config
    gets its meaning, which ``build_backbone``, ``featx check``, ``featx verify CONFIG``, ``featx build``
    and ``featx export`` all read.

    ``model`` is the whole source model with the weights loaded into the children the cut keeps (with
    ``resolve(..., whole_model=False)`` and a weights file, the parameters of the children after the cut stay on
    the ``meta`` device); ``cut`` is the cut the backbone runs (``upto: stages`` with taps inside: ``stages.3``) and
    ``kept`` how many root children it keeps; ``tapped`` holds the taps (``Tap``: output name and module), in
    the config's order, which ``taps``, ``outputs`` and ``features`` show in other shapes;
    ``frozen`` lists the frozen modules in forward order; ``cuts`` are the cuts a check verifies (the taps
    and the cut, shallowest first, ``cut`` last); ``verify`` is the config's ``verify`` with the overrides
    merged in. ``build()`` makes the backbone from ``model``'s own children (once: later calls return the
    same module, whose children are ``model``'s) and ``features`` reads what its dry run measured.
    """

    config: BackboneConfig
    model: nn.Module
    kept: int
    cut: CutPath
    tapped: tuple[Tap, ...]
    frozen: tuple[str, ...]
    cuts: tuple[CutPath, ...]
    verify: VerifySpec
    keep_glue: bool
    source_params: int  # parameters of the whole model
    builds: bool = True  # False when `upto` was overridden: a cut to verify, not the config's backbone
    _built: list[BuiltBackbone] = dataclasses.field(default_factory=list, repr=False)

    @property
    def taps(self) -> Mapping[str, tuple[str, ...]]:
        """Each tapped module -> its output names (the order the modules are first tapped)."""
        return {child: tuple(outputs) for child, outputs in by_module(self.tapped).items()}

    @property
    def outputs(self) -> tuple[tuple[str, str], ...]:
        """``(output name, tapped module)`` in the config's order."""
        return tuple((tap.name, tap.child) for tap in self.tapped)

    @property
    def features(self) -> tuple[Tap, ...]:
        """The taps as measured by the backbone's dry run (``build()`` runs, once), in ``taps`` order."""
        body = body_of(self.build())
        return tuple(
            Tap(output, child).measure(body.out_channels[output], body.strides[output], body.shapes[output])
            for child, outputs in self.taps.items()
            for output in outputs
        )

    @property
    def maps(self) -> tuple[tuple[str, int, int], ...]:
        """What the built backbone returns, in the order an artifact returns it, as ``(name, channels,
        stride)``: each output in the config's order; with ``fpn``, each pyramid map as torchvision names
        them (``'0'``, ``'1'``, ... for the taps in the order the body returns them, then ``'pool'`` at twice
        the last stride with ``extra_pool``). Builds the backbone."""
        backbone = self.build()
        if isinstance(backbone, BackboneWithFPN):
            return tuple((name, backbone.out_channels, stride) for name, stride in backbone.strides.items())
        body = body_of(backbone)
        return tuple((name, body.out_channels[name], body.strides[name]) for name, _ in self.outputs)

    @property
    def fpn_loaded(self) -> bool:
        """Whether the FPN's weights came from the config's weights file (where torchvision, mmdetection,
        detectron2 or ``featx export`` store them); False without ``fpn`` or when the FPN keeps its own
        (random) init. Builds the backbone."""
        backbone = self.build()
        return isinstance(backbone, BackboneWithFPN) and backbone.fpn_loaded

    @property
    def fpn(self) -> str | None:
        """``loaded`` (the FPN's tensors came from the weights file), ``random`` (its own init) or None
        (no ``fpn``): what ``featx build`` and ``featx check`` show. Builds the backbone."""
        backbone = self.build()
        if not isinstance(backbone, BackboneWithFPN):
            return None
        return "loaded" if backbone.fpn_loaded else "random"

    @property
    def fpn_source(self) -> str | None:
        """Where the FPN's tensors came from, or why it is at its init; None without ``fpn``."""
        backbone = self.build()
        return backbone.fpn_source if isinstance(backbone, BackboneWithFPN) else None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The backbone's tensors as a weights file for this config holds them, which ``build_backbone``
        reads back: the kept children's under the full model's keys, with keep_glue the own tensors of the
        root and of each container on the cut's path (what rebuilding loads: ``_loaded_modules``), an
        FPN's under ``fpn.`` (contiguous, on the CPU; builds the backbone)."""
        backbone = self.build()
        tensors = {k: v.detach().contiguous().cpu() for k, v in body_of(backbone).state_dict().items()}
        if self.keep_glue:  # a traced forward that reads none of them still gets them back when rebuilt
            state = self.model.state_dict()
            own = [n for n in _loaded_modules(self.model, self.cut, self.config) if n in state]
            tensors.update({n: state[n].detach().contiguous().cpu() for n in own if n not in tensors})
        if isinstance(backbone, BackboneWithFPN):
            tensors.update(
                {f"fpn.{k}": v.detach().contiguous().cpu() for k, v in backbone.fpn.state_dict().items()}
            )
        return tensors

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The input shape the backbone is measured at (and an export made at): ``verify.input_shape``,
        else the model's own size at batch 1.

        Raises:
            FeatxError: no ``verify.input_shape`` and the model declares no input size.
        """
        try:
            return tuple(self.verify.input_shape or default_input_shape(self.model, batch=1))
        except FeatxError:
            raise FeatxError(
                f"{self.config.source}: `{self.config.model}` declares no input size; set `verify.input_shape`"
            ) from None

    def build(self) -> BuiltBackbone:
        """The backbone: the kept children of ``model``, tapped, frozen and normalised as configured,
        measured on a dry run and (with ``fpn``) wrapped, in eval mode. Made on the first call."""
        if self._built:
            return self._built[0]
        if not self.builds:
            raise FeatxError(
                f"{self.config.source}: the cut `{self.cut.upto}` overrides `upto`; it builds no backbone"
            )
        backbone = _build(self)
        self._built.append(backbone)
        return backbone

    def to_dict(self) -> dict[str, object]:
        """What ``featx build --json`` prints: each output measured, the parameters kept of the whole
        model's, the frozen modules and the FPN's channels (builds the backbone)."""
        backbone = self.build()
        frozen = list(self.frozen)
        return {
            "config": self.config.source,
            "outputs": [
                {
                    **f.to_dict(),
                    # a tap inside a frozen module is frozen with it
                    "frozen": any(f.child == n or f.child.startswith(n + ".") for n in frozen),
                }
                for f in self.features
            ],
            "params_kept": sum(p.numel() for p in body_of(backbone).parameters()),
            "params_total": self.source_params,
            "frozen": frozen,
            "fpn_out_channels": backbone.out_channels if isinstance(backbone, BackboneWithFPN) else None,
            "fpn": self.fpn,  # loaded | random | None
            "fpn_source": self.fpn_source,
        }


def resolve(
    config: str | os.PathLike[str] | Mapping[str, object] | BackboneConfig,
    *,
    upto: str | int | None = None,
    weights: str | os.PathLike[str] | None = None,
    weights_prefix: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
    keep_glue: bool | None = None,
    input_shape: tuple[int, ...] | None = None,
    modes: tuple[str, ...] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    whole_model: bool = False,
) -> BackbonePlan:
    """Resolve a config against its model, built once with its weights loaded once: a ``BackbonePlan``.

    The keywords override the config's (``featx verify CONFIG``'s flags): ``upto`` verifies another cut
    (the plan has no taps or freeze then, and builds no backbone), ``weights``, ``weights_prefix`` and
    ``model_kwargs`` change the model, ``keep_glue`` the cut, ``input_shape``, ``modes``, ``atol`` and
    ``rtol`` the ``verify`` settings. ``whole_model`` builds every child for real (what a check against the
    full forward needs); otherwise only the kept children get memory when a weights file is loaded.

    Raises:
        FeatxError: what ``build_backbone`` raises before its dry run (``PlanError`` for a ``freeze`` past
            the cut).
    """
    cfg = config if isinstance(config, BackboneConfig) else load_config(config)
    given = cfg.verify
    verify = VerifySpec(
        input_shape if input_shape is not None else given.input_shape,
        modes if modes is not None else given.modes,
        atol if atol is not None else given.atol,
        rtol if rtol is not None else given.rtol,
    )
    glue = cfg.keep_glue if keep_glue is None else keep_glue
    changed = upto is not None or weights is not None or weights_prefix is not None or bool(model_kwargs)
    if whole_model or changed or glue != cfg.keep_glue:
        model, kept = source_model(
            cfg, upto=upto, weights=weights, weights_prefix=weights_prefix, model_kwargs=model_kwargs
        )
    else:
        model, kept = _kept_model(cfg)
    if weights_prefix is not None:
        cfg = dataclasses.replace(cfg, weights_prefix=weights_prefix)
    source_params = sum(p.numel() for p in model.parameters())
    if upto is not None:  # a cut of its own: the config's taps and freeze are its backbone's
        cut = resolve_path(model, upto)
        return BackbonePlan(cfg, model, kept, cut, (), (), (cut,), verify, glue, source_params, builds=False)
    written = _path(model, cfg.upto, cfg, "upto")  # the cut, resolved once (loading the model resolved it)
    if not cfg.outputs:  # no `outputs:` and a count for `upto`: the one output is the child it cuts at
        cfg = dataclasses.replace(cfg, outputs=((written.upto, written.upto),))
    if glue:  # each tap is its module's value in the full forward, each a keep_glue cut
        cut, taps, paths = glue_plan(model, cfg, written)
        cuts = tuple(paths[name] for name in _made_order(model, set(taps) | {cut.upto}))
    else:
        cut, taps = plan(model, cfg, written)
        # the taps and the cut as the backbone runs them: prefixes of one chain of modules
        order = {unit: i for i, unit in enumerate(cut.units())}
        cuts = tuple(cut.prefix(unit) for unit in sorted(set(taps) | {cut.upto}, key=order.__getitem__))
    child_of = {output: child for child, outputs in taps.items() for output in outputs}
    tapped = tuple(Tap(output, child_of[output]) for output, _ in cfg.outputs if output in child_of)
    try:
        frozen = tuple(resolve_freeze(model, cfg, written))
    except FeatxError as err:
        raise PlanError(str(err), cut.upto, tuple((t.name, t.child) for t in tapped)) from None
    return BackbonePlan(cfg, model, kept, cut, tapped, frozen, cuts, verify, glue, source_params)


def _build(resolved: BackbonePlan) -> BuiltBackbone:
    """``plan.build()``: the backbone made from the plan's model, measured, wrapped."""
    cfg, model, path = resolved.config, resolved.model, resolved.cut
    taps = by_module(resolved.tapped)
    frozen = list(resolved.frozen)
    backbone: Backbone | GlueBackbone
    if resolved.keep_glue:
        backbone = _glue_backbone(model, path, taps, frozen, cfg)
    else:
        _require_chains(model, path, taps, cfg)
        children = OrderedDict(truncated(model, path).named_children())
        if cfg.norm == "frozen":
            children = OrderedDict((name, _frozen_norms(child)) for name, child in children.items())
        backbone = Backbone(
            children,
            taps,
            frozen,
            norm_eval=cfg.norm == "eval",
            expanded=tuple(path.containers()[1:]),
        )
    backbone.source_params = resolved.source_params
    backbone.upto = path.upto
    shape = resolved.input_shape
    try:
        if resolved.verify.input_shape is not None:  # the model's own size fits it
            check_input_shape(model, shape, cfg.model, "key `verify.input_shape`")
        _measure(backbone, shape)
    except FeatxError as err:
        raise FeatxError(f"{cfg.source}: {err}") from None
    backbone.input_shape = shape
    backbone.output_names = [output for output, _ in cfg.outputs]
    if cfg.fpn is not None:
        wrapped = BackboneWithFPN(backbone, cfg.fpn.out_channels, cfg.fpn.extra_pool)
        if cfg.weights is not None:
            _load_fpn(wrapped, cfg)
            if not wrapped.fpn_loaded:  # the body came from the file and the FPN did not: say so
                warnings.warn(
                    FeatxWarning(f"{cfg.source}: the FPN stays at random init: {wrapped.fpn_source}"),
                    stacklevel=4,
                )
        return wrapped.eval()
    return backbone.eval()


def _require_chains(
    model: nn.Module, path: CutPath, taps: Mapping[str, list[str]], cfg: BackboneConfig
) -> None:
    """Each container the plain backbone runs child by child (``path``'s, below the root) does, in its own
    forward, just that — else a tap inside it, and every value after it, would not be what the full model
    computes (a residual block's add dropped). The root's own glue is not refused here: losing it is what
    a plain cut is, and ``featx check`` reports it."""
    units = path.units()
    for container in path.containers()[1:]:
        inside = [u for u in units if u.startswith(container + ".")]
        whole = not units[-1].startswith(container + ".")  # the backbone runs on from its last unit
        module = model.get_submodule(container)
        broken = chain_break(module, container, inside, whole)
        if broken is None:
            continue
        tapped = {output: unit for unit in inside for output in taps.get(unit, ())}
        first = next((o for o, _ in cfg.outputs if o in tapped), None)  # else the cut alone goes inside
        what = (
            f"key `outputs.{first}`: `{tapped[first]}`"
            if first is not None
            else f"key `upto`: the cut `{path.upto}`"
        )
        instead = f"tap `{container}`" if whole else f"cut at `{container}`"  # a tap there runs it whole
        if broken.glue_keeps:
            instead += " or set `keep_glue: true`"
        raise FeatxError(
            f"{cfg.source}: {what} is inside `{container}` ({type(module).__name__}), whose children the plain "
            f"backbone runs one after the other, but {broken.why}; {instead}"
        )


def _made_order(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Module names in the order the forward finishes them: a module after everything inside it
    (``stages.1`` before ``stages``), so the cut, which every tap precedes or lies in, comes last."""
    modules = [name for name, _ in model.named_modules(remove_duplicate=False)]
    ends = {}
    for i, name in enumerate(modules):  # a module ends where the last module inside it is listed
        for prefix in [name, *(name[:j] for j, c in enumerate(name) if c == ".")]:
            ends[prefix] = i
    return sorted(names, key=lambda n: (ends[n], -n.count(".")))


def body_of(backbone: BuiltBackbone) -> Backbone | GlueBackbone:
    """The kept children's part of what ``build_backbone`` returned: itself, or an FPN's ``body``."""
    return backbone.body if isinstance(backbone, BackboneWithFPN) else backbone


def _glue_backbone(
    model: nn.Module, path: CutPath, taps: Mapping[str, list[str]], frozen: list[str], cfg: BackboneConfig
) -> GlueBackbone:
    try:
        # each tap, the cut's included, is what its module returns: at the last child, not the model's output
        taps_before = [name for name in taps if name != path.upto]
        keep = trace_root(model).cut(path, taps=taps_before, model_output=False)
    except FeatxError as err:
        raise FeatxError(f"{cfg.source}: key `keep_glue`: {err}") from None
    backbone = GlueBackbone(keep, taps, frozen, norm_eval=cfg.norm == "eval")
    if cfg.norm == "frozen":
        for name, child in list(backbone.named_children()):
            replaced = _frozen_norms(child)
            if replaced is not child:
                setattr(backbone, name, replaced)
    return backbone


def plan(model: nn.Module, cfg: BackboneConfig, cut: CutPath) -> tuple[CutPath, dict[str, list[str]]]:
    """The cut the backbone runs and its taps (module -> output names, in the config's order), from the
    config's ``upto`` resolved against ``model`` (``cut``).

    An output is a child name or a dotted path into one (``stages.2``); an integer is refused, since
    mmdetection's ``out_indices`` habit reads it as a stage where a child index would tap ``conv1``. Every
    tap must be run by the cut.
    Each container a tap or the cut reaches into runs child by child (``CutPath.expanded``); a tap, or the
    cut, that names such a container itself takes the output of its last child, so that is what the
    cut's ``upto`` and the tap's module say (``upto: stages`` with ``outputs: [stages.1, stages]`` runs
    and checks ``stages.0``..``stages.3`` and taps ``stages.3``).
    """
    tapped = _tap_paths(model, cfg, cut)
    reach = {c for _, p in tapped for c in p.containers()[1:]}
    path = cut.expanded(model, sorted(reach, key=lambda c: c.count(".")))
    units = path.units()
    taps: dict[str, list[str]] = {}
    for output, tap in tapped:
        target = tap.upto
        unit = next((u for u in reversed(units) if u == target or u.startswith(target + ".")), None)
        if unit is None:
            raise FeatxError(
                f"{cfg.source}: key `outputs.{output}` taps `{target}`, after the cut at `{cut.upto}`; "
                f"the cut runs {listing(units, 8)}"
            )
        taps.setdefault(unit, []).append(output)
    return path, taps


def _tap_paths(model: nn.Module, cfg: BackboneConfig, cut: CutPath) -> list[tuple[str, CutPath]]:
    """Each output's tapped module resolved against ``model``, in the config's order (integers refused)."""
    tapped: list[tuple[str, CutPath]] = []
    for i, (output, child) in enumerate(cfg.outputs):
        if isinstance(child, int):
            raise _integer_output(model, cut, cfg, i, output, child)
        tapped.append((output, _path(model, child, cfg, f"outputs.{output}")))
    return tapped


def _integer_output(
    model: nn.Module, cut: CutPath, cfg: BackboneConfig, i: int, output: str, index: int
) -> FeatxError:
    """The refusal of an integer in ``outputs``: mmdetection's ``out_indices: [0, 1, 2, 3]`` means the
    four stages, where a child index taps ``conv1``, ``bn1``, ``relu``, ``maxpool``; it names the model's
    stage-like children (those with modules inside, up to the cut) to write instead."""
    key = f"outputs[{i}]" if isinstance(cfg.raw.get("outputs"), list) else f"outputs.{output}"
    kept = list(model.named_children())[: cut.kept]
    stages = [name for name, child in kept if next(child.children(), None) is not None]
    lists = [(len(child), name) for name, child in kept if isinstance(child, (nn.Sequential, nn.ModuleList))]
    inside = f"{max(lists, key=lambda item: item[0])[1]}.0" if lists else None  # the longest: the stages
    return FeatxError(
        f"{cfg.source}: key `{key}` is the integer {index}; outputs are module names, not indices: "
        f"name the modules to tap, such as this model's stage-like children "
        f"{listing(stages or [name for name, _ in kept], 8)}"
        + (f" (a dotted name such as `{inside}` taps inside one)" if inside else "")
        + "; stage indices (mmdetection's `out_indices`) are not read yet"
    )


def glue_plan(
    model: nn.Module, cfg: BackboneConfig, cut: CutPath
) -> tuple[CutPath, dict[str, list[str]], dict[str, CutPath]]:
    """The cut and taps of a ``keep_glue: true`` config, as written: each tap is the module it names,
    whose value in the full forward the backbone returns (a container a tap reaches into is not run child
    by child, so ``stages`` is what ``stages`` returns), and the cut is ``upto`` itself (``cut``); and
    each tapped module's path and the cut's, by dotted name.

    Raises:
        FeatxError: what ``plan`` refuses, and a tap on a container the cut goes into (``stages`` with
            ``upto: stages.2``): the full forward makes its value after the cut.
    """
    plan(model, cfg, cut)  # the same names, taps after the cut and indices refused the same way
    taps: dict[str, list[str]] = {}
    paths = {cut.upto: cut}
    for output, path in _tap_paths(model, cfg, cut):
        tap = path.upto
        paths.setdefault(tap, path)
        if cut.upto.startswith(tap + "."):
            raise FeatxError(
                f"{cfg.source}: key `outputs.{output}` taps `{tap}`, which the cut at `{cut.upto}` goes into: "
                f"with `keep_glue` a tap is what its module returns, made after the cut; tap `{cut.upto}` or "
                f"cut at `{tap}`"
            )
        taps.setdefault(tap, []).append(output)
    return cut, taps, paths


def source_model(
    cfg: BackboneConfig,
    *,
    upto: str | int | None = None,
    weights: str | os.PathLike[str] | None = None,
    weights_prefix: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
) -> tuple[nn.Module, int]:
    """The whole source model a config cuts, with the weights file loaded into its kept children, and how
    many children the cut keeps: what ``featx verify CONFIG`` and ``featx check`` compare against.

    A backbone checkpoint need not hold the tail, so the children after the cut keep their own init; the
    full forward still runs them. ``upto``, ``weights``, ``weights_prefix`` and ``model_kwargs`` override
    the config's.
    """
    if weights_prefix is not None:
        cfg = dataclasses.replace(cfg, weights_prefix=weights_prefix)
    model, checkpoint = _model_of(cfg, model_kwargs, weights)
    cut = _path(model, cfg.upto, cfg, "upto") if upto is None else resolve_path(model, upto)
    if checkpoint is None or checkpoint.loaded:  # torchvision's builder loaded its own weights
        return model, cut.kept
    if weights is not None:  # from the command line: its errors name the file, not the config key
        children = _loaded_modules(model, cut, cfg)
        load_weights(model, checkpoint, prefix=cfg.weights_prefix, children=children, strict=cfg.strict)
    else:
        _load(model, cut, cfg, checkpoint)
    return model, cut.kept


def _kept_model(cfg: BackboneConfig) -> tuple[nn.Module, int]:
    """The model with its kept children materialised and loaded, and how many children the cut keeps.

    With a weights file (or pretrained weights, read from their cache), the model is built with its
    parameters on the ``meta`` device (``_parameters_on_meta``), only the kept children's parameters get
    memory, and only their tensors are read from the file: peak memory tracks the kept part, not the whole
    model. Buffers and whatever else the constructor computes are made for real, so a buffer no state dict
    holds (a blur filter) is exact and a constructor that computes with tensors (regnet's widths) runs.
    When that cannot be exact — the constructor reads its own parameters' values, a buffer is made from a
    parameter, or ``strict: false`` leaves some kept parameter without a value — the model is built a
    second time, for real: only a real build gives those values.
    """
    if cfg.weights is None:
        return source_model(cfg)
    try:
        with _parameters_on_meta():
            model, checkpoint = _model_of(cfg)
    except FeatxError:  # a constructor that computes from its own parameters' values
        return source_model(cfg)
    if checkpoint is not None and not checkpoint.loaded:
        cut = _path(model, cfg.upto, cfg, "upto")
        modules = [m for _, child in list(model.named_children())[: cut.kept] for m in child.modules()]
        if cfg.keep_glue:  # keep_glue runs the root's forward, which may read the root's own tensors
            modules.append(model)
        # a buffer no state dict holds is exact only if the constructor made it for real
        made_from_parameters = any(
            buffer is not None and buffer.is_meta and name in m._non_persistent_buffers_set
            for m in modules
            for name, buffer in m._buffers.items()
        )
        if not made_from_parameters:
            materialised: dict[int, nn.Parameter] = {}
            for module in modules:
                _materialise_own_tensors(module, materialised)
            if not _load(model, cut, cfg, checkpoint):
                return model, cut.kept
    return source_model(cfg)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While active, each ``nn.Parameter`` a module registers moves to the ``meta`` device as it is
    registered: its memory is freed and its initialisation skipped. Buffers and every other tensor are
    made on the CPU as usual (what ``torch.device("meta")`` would leave without data). A parameter
    registered twice (tied) stays one parameter; ``nn.Parameter`` subclasses stay as made."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and type(param) is nn.Parameter and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _materialise_own_tensors(module: nn.Module, materialised: dict[int, nn.Parameter]) -> None:
    """The module's own parameters and buffers moved off ``meta`` (uninitialised, to be loaded); a
    parameter another module shares (tied) is the one already in ``materialised`` (by the meta one's id)."""
    for name, param in list(module._parameters.items()):
        if param is not None and param.is_meta:
            if id(param) not in materialised:
                materialised[id(param)] = nn.Parameter(
                    torch.empty_like(param, device="cpu"), requires_grad=param.requires_grad
                )
            module._parameters[name] = materialised[id(param)]
    for name, buf in list(module._buffers.items()):
        if buf is not None and buf.is_meta:
            module._buffers[name] = torch.empty_like(buf, device="cpu")


def _loaded_modules(model: nn.Module, cut: CutPath, cfg: BackboneConfig) -> list[str]:
    """What the backbone runs and so needs from the weights file: the cut's modules, and with keep_glue
    the own tensors of the root and of each container on the path, which the traced forwards may read."""
    names = cut.units()
    if cfg.keep_glue:
        for container in cut.containers():
            module = model.get_submodule(container)
            own = [*(n for n, t in module._parameters.items() if t is not None), *module._buffers]
            names += [f"{container}.{n}" if container else n for n in own]
    return names


def _model_of(
    cfg: BackboneConfig,
    model_kwargs: Mapping[str, object] | None = None,
    weights: str | os.PathLike[str] | None = None,
) -> tuple[nn.Module, Checkpoint | None]:
    """The config's model, and the checkpoint its weights (``weights`` overriding the config's) resolve to;
    nothing is read from a file here except by torchvision's builder for its own pretrained weights."""
    try:
        return build_model(
            cfg.model,
            weights if weights is not None else cfg.weights,
            {**cfg.model_kwargs, **(model_kwargs or {})},
            weights_prefix=cfg.weights_prefix,
        )
    except FeatxError as err:
        raise FeatxError(f"{cfg.source}: {err}") from None


def _load(model: nn.Module, cut: CutPath, cfg: BackboneConfig, checkpoint: Checkpoint) -> list[str]:
    """Load the config's weights into the modules the cut runs (a nested cut's dropped blocks need none)."""
    names = child_names(model)
    try:
        return load_weights(
            model,
            checkpoint,
            prefix=cfg.weights_prefix,
            children=_loaded_modules(model, cut, cfg),
            strict=cfg.strict,
            # a featx export of an FPN config stores the FPN beside the kept children, under `fpn.`
            skip=("fpn",) if cfg.fpn is not None and "fpn" not in names else (),
        )
    except FeatxError as err:
        raise FeatxError(f"{cfg.source}: key `weights`: {err}") from None


def _load_fpn(wrapped: BackboneWithFPN, cfg: BackboneConfig) -> None:
    """The FPN's weights from the config's weights file, found where each ecosystem stores them
    (``_fpn_keys``); a backbone checkpoint without them leaves the FPN at its init, to train with the
    head, and ``wrapped.fpn_source`` says what was looked for.

    Raises:
        FeatxError: an FPN found in the file that does not fit torchvision's over these taps (a tensor
            missing or mis-shaped; with ``strict``, tensors it has no place for: more levels, extra convs).
    """
    if cfg.weights is None or not os.path.isfile(cfg.weights):  # a pretrained weights name holds no FPN
        wrapped.fpn_source = f"`weights: {cfg.weights}` names pretrained weights, which hold no FPN"
        return
    keys = list(read_state_dict(cfg.weights))
    looked, found = _fpn_keys(keys, cfg.weights_prefix, wrapped.fpn.state_dict())
    if found is None:
        wrapped.fpn_source = f"`{cfg.weights}` holds no FPN tensors; looked for {listing(looked)}"
        return
    where, mapping, namespace = found
    key = f"{cfg.source}: key `weights` (its `{where}` keys, for `fpn`)"
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
        load_weights(wrapped.fpn, Checkpoint(Path(cfg.weights), cfg.weights, keys=mapping))
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
    blocks, index, _, tensor = key.split(".", 3)
    level = int(index) if levels is None else (levels[int(index)] if int(index) < len(levels) else -1)
    return (lateral if blocks == "inner_blocks" else output).format(level) + tensor


# The paths `_path` resolved, per model: the model's loading resolves the cut (to read the kept children's
# weights) before `resolve` plans with it, and both get the one CutPath.
_RESOLVED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str | int], CutPath]] = (
    weakref.WeakKeyDictionary()
)


def _path(model: nn.Module, upto: str | int, cfg: BackboneConfig, key: str) -> CutPath:
    """``upto`` (the config's ``key``) resolved against ``model``, once per model; an error names the key."""
    what = "upto" if key == "upto" else "output"
    known = _RESOLVED.setdefault(model, {})
    if (what, upto) not in known:
        try:
            known[(what, upto)] = resolve_path(model, upto, what=what)
        except FeatxError as err:
            raise FeatxError(f"{cfg.source}: key `{key}`: {err}") from None
    return known[(what, upto)]


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
            f"`{cut.upto}`"
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
            f"{cfg.source}: key `freeze` freezes through `{value}`, past the cut at `{cut.upto}`; freeze a "
            f"module up to `{cut.upto}`"
        )
    return frozen.units()


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


def _frozen_norms(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d in it (itself included) replaced by a frozen one, same statistics."""
    from timm.layers import BatchNormAct2d, freeze_batch_norm_2d

    if isinstance(module, BatchNormAct2d):  # timm's BN with its activation fused in: keep the activation
        return freeze_batch_norm_2d(module)
    if type(module) is nn.BatchNorm2d and module.track_running_stats:  # subclasses keep their own behaviour
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        replaced = _frozen_norms(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


# The least the second dry run changes the input's height and width by (``_growth``): multiples of every
# power-of-two stride up to 128, so a map's size changes by exactly GROW / stride whatever the padding
# rounds, and different from each other, so a dim that follows the height is told from one that follows
# the width.
_GROW = (128, 256)


def _growth(outputs: Iterable[torch.Tensor], height: int, width: int) -> tuple[int, int]:
    """How much the second dry run changes the input's height and width: ``_GROW`` scaled by a power of
    two so that it is a multiple of every power-of-two stride an output could have. A map of ``n`` rows
    (``ceil(H / stride)``, n >= 2) has a stride below ``2 * H / n``; the smallest dim of any output bounds
    them all (a channel dim only makes the bound larger). Smaller where the input is large (a cheaper real
    run, if it comes to one)."""
    smallest = min((n for out in outputs for n in out.shape[1:]), default=1)
    bound = 2 * max(height, width) / max(smallest, 1)
    scale = 1
    while _GROW[0] * scale < bound:
        scale *= 2
    grow = (_GROW[0] * scale, _GROW[1] * scale)
    return (
        grow[0] if height <= 2 * grow[0] else -grow[0],
        grow[1] if width <= 2 * grow[1] else -grow[1],
    )


def _measure(backbone: Backbone | GlueBackbone, input_shape: tuple[int, ...]) -> None:
    """Channels and stride of every output, from dry runs at ``input_shape`` and at a second input size.

    A stride is exact, never a rounded ratio: between the two runs the input's H and W change by 128 and
    256 (multiples of every power-of-two stride up to 128; scaled up by a power of two where an output's
    size allows a larger stride, ``_growth``), so an NCHW map's H and W change by exactly 128/stride and
    256/stride, however the convolutions round an odd size. Which dims change also gives the
    layout: NCHW changes dims 2 and 3; NHWC (swin) dims 1 and 2; tokens (B, N, C) dim 1; an output that is
    not an NCHW map is refused, naming the layout found. A model that runs at one input size only (a fixed
    ``img_size``) is measured at that size alone: a layout is taken when exactly one of NCHW and NHWC
    divides the input by one power-of-two stride, else refused. Then the input must be a multiple of the
    largest stride (a map of ``ceil(H / stride)`` rows no longer lines up with the input): else refused,
    naming the sizes that are.

    The dry runs use fake tensors — shapes only, no kernel runs and nothing is allocated, so a detection
    config's 800x1333 input costs no memory — and fall back to a real run where a module cannot run fake.
    """
    first = _dry_run(backbone, input_shape)
    for name, out in first.items():
        if not isinstance(out, torch.Tensor) or out.dim() < 3:
            got = (
                f"a tensor of shape {list(out.shape)}"
                if isinstance(out, torch.Tensor)
                else type(out).__name__
            )
            raise FeatxError(
                f"output `{name}` is not a feature map (got {got}, expected N, C, H, W); "
                "tap a child that returns one"
            )
    if len(input_shape) != 4:
        raise FeatxError(
            f"`verify.input_shape` {list(input_shape)} is not an image batch (N, C, H, W); featx measures "
            "the stride of each output against the input's H and W"
        )
    height, width = input_shape[2:]
    grow = _growth((out for out in first.values() if isinstance(out, torch.Tensor)), height, width)
    other = (*input_shape[:2], height + grow[0], width + grow[1])
    why = ""
    try:
        second: Mapping[str, object] | None = _dry_run(backbone, other)
    except _CannotRun as err:  # a model with a fixed input size: measured at the one size
        second, why = None, err.reason
    child_of = {output: child for child, outputs in backbone.taps.items() for output in outputs}
    for name, out in first.items():
        assert isinstance(out, torch.Tensor)  # checked above
        child = child_of.get(name, name)
        tap = f"output `{name}`" + (f" (`{child}`)" if child != name else "")
        shape = list(out.shape)
        again = second[name] if second is not None else None
        if isinstance(again, torch.Tensor):
            stride = _stride_of(tap, shape, list(again.shape), (height, width), grow)
        else:
            why = why or f"it returns {type(again).__name__} there"
            stride = _stride_at_one_size(tap, shape, (height, width), (other[2], other[3]), why)
        backbone.out_channels[name] = shape[1]
        backbone.shapes[name] = shape
        backbone.strides[name] = stride
    largest = max(backbone.strides.values(), default=1)
    if height % largest or width % largest:
        name = next(n for n, s in backbone.strides.items() if s == largest)
        up = f"{-(-height // largest) * largest}x{-(-width // largest) * largest}"
        down = f"{height // largest * largest}x{width // largest * largest}"
        sizes = f"{down} or {up}" if height >= largest and width >= largest else up
        raise FeatxError(
            f"input {height}x{width} (`verify.input_shape` {list(input_shape)}) is not a multiple of "
            f"{largest}, the largest stride (output `{name}`): its maps would not line up with the input; "
            f"use {sizes}"
        )


class _CannotRun(FeatxError):
    """A dry run failed; ``reason`` is what the model raised (``ValueError: input size ...``)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@contextlib.contextmanager
def _quiet_fake_tensors() -> Iterator[None]:
    """torch's fake-tensor logger off: it logs a traceback for every op whose meta kernel fails (a shape
    mismatch the real run below reports in one line)."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    was = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = was


def _dry_run(backbone: Backbone | GlueBackbone, input_shape: tuple[int, ...]) -> Mapping[str, object]:
    """The backbone's outputs on an input of ``input_shape``, in eval mode: fake tensors where the modules
    allow, else a real run on a seeded input."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    param = next(backbone.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            try:
                with _quiet_fake_tensors(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
                    return backbone(
                        mode.from_tensor(torch.empty(input_shape, device="meta")).to(device, dtype)
                    )
            except Exception:
                x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
                return backbone(x)
    except Exception as err:
        reason = f"{type(err).__name__}: {one_line(err)}"
        raise _CannotRun(
            f"the backbone cannot run on an input of shape {list(input_shape)}: {reason}; set "
            "`verify.input_shape`",
            reason,
        ) from None
    finally:
        backbone.train(was_training)


def _stride_of(
    tap: str, shape: list[int], again: list[int], size: tuple[int, int], grow: tuple[int, int]
) -> int:
    """The stride of an output measured at two input sizes (``size``, and ``size`` + ``grow``): the
    layout from the dims that change, the stride from how much they change. Refuses anything that is not
    an NCHW map reduced by one power-of-two stride in both H and W."""
    changed = [d for d in range(1, len(shape)) if shape[d] != again[d]]
    if len(shape) == 4 and changed == [2, 3]:
        steps = [again[d] - shape[d] for d in (2, 3)]
        strides = {g / step for g, step in zip(grow, steps, strict=True)}
        (stride,) = strides if len(strides) == 1 else (0.0,)
        if stride >= 1 and stride.is_integer() and _power_of_two(int(stride)):
            return int(stride)
        grown = f"{size[0] + grow[0]}x{size[1] + grow[1]}"
        raise FeatxError(
            f"{tap} is not reduced by one power-of-two stride: its H x W is {shape[2]}x{shape[3]} at input "
            f"{size[0]}x{size[1]} and {again[2]}x{again[3]} at {grown}; featx taps maps at a stride of "
            "1, 2, 4, ... in both H and W"
        )
    if len(shape) == 4 and changed == [1, 2]:
        _refuse_layout(tap, "NHWC (B, H, W, C)", shape, size, "NHWC (channels-last) maps")
    if len(shape) == 3 and changed == [1]:
        _refuse_layout(tap, "tokens (B, N, C)", shape, size, "tokens")
    if len(shape) == 3 and changed == [2]:
        _refuse_layout(tap, "tokens (B, C, N)", shape, size, "tokens")
    follow = f"only its dims {', '.join(map(str, changed))} follow" if changed else "none of its dims follows"
    raise FeatxError(
        f"{tap} is a {len(shape)}-D tensor {shape} at input {size[0]}x{size[1]} and {again} at "
        f"{size[0] + grow[0]}x{size[1] + grow[1]}: {follow} the input's H and W as an NCHW map's 2 and 3 "
        "do; featx taps NCHW maps (B, C, H, W)"
    )


def _stride_at_one_size(
    tap: str, shape: list[int], size: tuple[int, int], other: tuple[int, int], why: str
) -> int:
    """The stride of an output of a model that runs at one input size only: NCHW when its H and W (and
    not dims 1 and 2, as NHWC) divide the input by one power-of-two stride."""
    if len(shape) == 3:
        _refuse_layout(tap, "a 3-D (B, N, C) or (B, C, N) sequence of tokens", shape, size, "tokens")
    nchw = _divides(size, shape[2], shape[3]) if len(shape) == 4 else None
    nhwc = _divides(size, shape[1], shape[2]) if len(shape) == 4 else None
    if nchw is not None and nhwc is None:
        return nchw
    if nhwc is not None and nchw is None:
        _refuse_layout(tap, "NHWC (B, H, W, C)", shape, size, "NHWC (channels-last) maps")
    raise FeatxError(
        f"{tap} has shape {shape} at input {size[0]}x{size[1]}, and featx cannot tell its layout and "
        f"stride: the backbone does not run at a second input size ({other[0]}x{other[1]}: {why}) and "
        f"{'both NCHW and NHWC' if nchw is not None else 'neither NCHW nor NHWC'} divide the input by one "
        "power-of-two stride; let the model run at another input size (timm: `strict_img_size: false`) so "
        "featx can measure it"
    )


def _refuse_layout(tap: str, layout: str, shape: list[int], size: tuple[int, int], kind: str) -> NoReturn:
    raise FeatxError(
        f"{tap} is {layout} {shape} at input {size[0]}x{size[1]}, not an NCHW map (B, C, H, W); featx "
        f"taps NCHW maps and does not convert {kind} yet: tap a module that returns an NCHW map"
    )


def _divides(size: tuple[int, int], h: int, w: int) -> int | None:
    """The power-of-two stride that makes ``h`` x ``w`` of an input of ``size`` exactly, if one does."""
    if h < 1 or w < 1 or size[0] % h or size[1] % w or size[0] // h != size[1] // w:
        return None
    stride = size[0] // h
    return stride if _power_of_two(stride) else None


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0
