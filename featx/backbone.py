"""Config-driven multi-scale backbones for detection and segmentation heads.

``build_backbone`` cuts a model where the config says, taps the named children, freezes and normalises as
asked, and measures each output's channels and stride on a dry run — nothing is hand-written. With an
``fpn`` section it wraps the result in torchvision's ``FeaturePyramidNetwork``, so it drops into
torchvision's ``FasterRCNN``/``MaskRCNN`` as their ``backbone``.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from featx.config import BackboneConfig, load_config
from featx.errors import FeatxError, listing, one_line
from featx.files import replacing
from featx.models import default_input_shape, load_model, load_weights
from featx.truncate import CutPath, child_names, resolve_path, truncated

_STAGES = ("layer1", "layer2", "layer3", "layer4")  # ResNet stages, as torchvision and timm name them


class Backbone(nn.ModuleDict):
    """The kept children of a model, run in order, returning the tapped feature maps by output name.

    Children keep their names, so ``state_dict()`` keys are the full model's. A container that a nested
    tap or cut reaches into (``stages`` for ``outputs: [stages.1, stages.2]``) is an ``nn.Sequential`` of
    its kept children, the same module objects under the same names, and runs them one by one so the taps
    inside it see their outputs. Frozen children have ``requires_grad=False`` and stay in eval mode under
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
        self.source_params = 0  # parameters of the whole model the children were cut from
        self.upto = list(self.keys())[-1] if len(self) else ""  # the last module run (dotted if nested)
        for name in self.frozen:
            self[name].requires_grad_(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not torch.jit.is_scripting() and self.nested:  # TorchScript takes the children loop below
            return _run_nested(self, x)
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.taps:
                for output in self.taps[name]:
                    out[output] = x
        return out

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        for name in self.frozen:
            self[name].eval()
        if self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


def _run_nested(backbone: Backbone, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``backbone``'s forward when containers run child by child: each kept module in turn, tapped."""
    out: dict[str, torch.Tensor] = OrderedDict()
    expanded = set(backbone.expanded)

    def run(container: nn.Module, prefix: str, x: torch.Tensor) -> torch.Tensor:
        for name, module in container.named_children():
            dotted = prefix + name
            x = run(module, dotted + ".", x) if dotted in expanded else module(x)
            for output in backbone.taps.get(dotted, ()):
                out[output] = x
        return x

    run(backbone, "", x)
    return out


class BackboneWithFPN(nn.Module):
    """A ``Backbone`` followed by torchvision's ``FeaturePyramidNetwork``; ``out_channels`` is an int."""

    def __init__(self, body: Backbone, out_channels: int, extra_pool: bool) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            list(body.out_channels.values()),
            out_channels,
            extra_blocks=LastLevelMaxPool() if extra_pool else None,
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def build_backbone(config: str | os.PathLike[str] | Mapping[str, object] | BackboneConfig) -> nn.Module:
    """Build the backbone a config describes (a YAML path, or the same mapping as a dict).

    Returns a ``Backbone`` — or, with ``fpn:``, a ``BackboneWithFPN`` — in eval mode, whose forward
    returns an ordered dict of feature maps. ``freeze`` counts children from the first, inclusive; the
    torchvision (``trainable_layers``), mmdetection (``frozen_stages``) and detectron2 (``freeze_at``)
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
    cfg = config if isinstance(config, BackboneConfig) else load_config(config)
    model, kept = _kept_model(cfg)
    names = child_names(model)
    path, taps = plan(model, cfg)
    frozen = resolve_freeze(names, kept, cfg)
    source_params = sum(p.numel() for p in model.parameters())
    children = OrderedDict(truncated(model, path).named_children())
    if cfg.norm == "frozen":
        children = OrderedDict((name, _frozen_norms(child)) for name, child in children.items())
    backbone = Backbone(
        children, taps, names[:frozen], norm_eval=cfg.norm == "eval", expanded=tuple(path.containers()[1:])
    )
    backbone.source_params = source_params
    backbone.upto = path.upto
    try:
        shape = cfg.verify.input_shape or default_input_shape(model, batch=1)
    except FeatxError:
        raise FeatxError(
            f"{cfg.source}: `{cfg.model}` declares no input size; set `verify.input_shape`"
        ) from None
    _measure(backbone, shape)
    if cfg.fpn is not None:
        return BackboneWithFPN(backbone, cfg.fpn.out_channels, cfg.fpn.extra_pool).eval()
    return backbone.eval()


def resolve_taps(model: nn.Module, kept: int, cfg: BackboneConfig) -> dict[str, list[str]]:
    """The config's ``outputs`` as tapped module -> output names, in the config's order (see ``plan``);
    ``kept`` is the number of root children the config's cut keeps."""
    return plan(model, cfg)[1]


def plan(model: nn.Module, cfg: BackboneConfig) -> tuple[CutPath, dict[str, list[str]]]:
    """The cut the backbone runs and its taps (module -> output names, in the config's order).

    An integer output is a 0-based index into the children, as in ``list(model.children())[i]``; a
    string is a child name or a dotted path into one (``stages.2``). Every tap must be run by the cut.
    Each container a tap or the cut reaches into runs child by child (``CutPath.expanded``); a tap, or the
    cut, that names such a container itself takes the output of its last child, so that is what the
    cut's ``upto`` and the tap's module say (``upto: stages`` with ``outputs: [stages.1, stages]`` runs
    and checks ``stages.0``..``stages.3`` and taps ``stages.3``).
    """
    names = child_names(model)
    cut = _path(model, cfg.upto, cfg, "upto")
    tapped: list[tuple[str, CutPath]] = []
    for output, child in cfg.outputs:
        if isinstance(child, int):  # an index into the children, as in list(model.children())[i]
            if not -len(names) <= child < len(names):
                raise FeatxError(
                    f"{cfg.source}: key `outputs.{output}`: index {child} is out of range for "
                    f"{len(names)} children ({listing(names, len(names))})"
                )
            child = names[child % len(names)]
        tapped.append((output, _path(model, child, cfg, f"outputs.{output}")))
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


def source_model(
    cfg: BackboneConfig,
    *,
    upto: str | int | None = None,
    weights: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
) -> tuple[nn.Module, int]:
    """The whole source model a config cuts, with the weights file loaded into its kept children, and how
    many children the cut keeps: what ``featx verify CONFIG`` and ``featx check`` compare against.

    A backbone checkpoint need not hold the tail, so the children after the cut keep their own init; the
    full forward still runs them. ``upto``, ``weights`` and ``model_kwargs`` override the config's.
    """
    model = _model_of(cfg, model_kwargs)
    cut = _path(model, cfg.upto, cfg, "upto") if upto is None else resolve_path(model, upto)
    if weights is not None:  # from the command line: its errors name the file, not the config key
        load_weights(model, weights, prefix=cfg.weights_prefix, children=cut.units(), strict=cfg.strict)
    elif cfg.weights is not None:
        _load(model, cut, cfg)
    return model, cut.kept


def export(config: str | os.PathLike[str] | Mapping[str, object], out: str | os.PathLike[str]) -> Path:
    """Write the kept children's weights of the configured backbone to a safetensors file, atomically.

    The keys are the full model's, so ``weights: FILE`` in the same config rebuilds the backbone
    bit-exactly. Metadata: featx version, source model, cut, outputs and the config as JSON.
    """
    from safetensors.torch import save_file

    import featx

    cfg = load_config(config)
    if cfg.fpn is not None:
        raise FeatxError(
            f"{cfg.source}: key `fpn`: export writes the kept weights of the model, and an FPN is "
            "not part of it (it trains with the head); export the config without `fpn`"
        )
    out = Path(out)
    if out.suffix != ".safetensors":
        raise FeatxError(f"--out `{out}` must end in .safetensors")
    if not out.parent.is_dir():
        raise FeatxError(f"--out `{out}`: folder `{out.parent}` does not exist")
    body = build_backbone(cfg)
    metadata = {
        "format": "pt",
        "featx_version": featx.__version__,
        "source_model": cfg.model,
        "upto": body.upto,
        "outputs": json.dumps(dict(cfg.outputs)),
        # the config that rebuilds this backbone from this file
        "config": json.dumps({**cfg.raw, "weights": out.name, "weights_prefix": None}, default=str),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in body.state_dict().items()}
    with replacing(out) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return out


def _kept_model(cfg: BackboneConfig) -> tuple[nn.Module, int]:
    """The model with its kept children materialised and loaded, and how many children the cut keeps.

    With a weights file, the model is built on the ``meta`` device, only the kept children get memory, and
    only their tensors are read from the file: peak memory tracks the kept part, not the whole model. When
    that cannot be exact — a kept module holds buffers that are not in any state dict, or ``strict: false``
    leaves some kept tensor without a value — the model is built for real instead.
    """
    if cfg.weights is None:
        return source_model(cfg)
    try:
        with torch.device("meta"):
            model = _model_of(cfg)
    except FeatxError:  # some constructors need real data (they compute from their own weights)
        model = None
    if model is not None:
        cut = _path(model, cfg.upto, cfg, "upto")
        kept_children = [child for _, child in list(model.named_children())[: cut.kept]]
        if not any(m._non_persistent_buffers_set for child in kept_children for m in child.modules()):
            for child in kept_children:
                child.to_empty(device="cpu")
            if not _load(model, cut, cfg):
                return model, cut.kept
    return source_model(cfg)


def _model_of(cfg: BackboneConfig, model_kwargs: Mapping[str, object] | None = None) -> nn.Module:
    try:
        return load_model(cfg.model, **{**cfg.model_kwargs, **(model_kwargs or {})})
    except FeatxError as err:
        raise FeatxError(f"{cfg.source}: {err}") from None


def _load(model: nn.Module, cut: CutPath, cfg: BackboneConfig) -> list[str]:
    """Load the config's weights into the modules the cut runs (a nested cut's dropped blocks need none)."""
    try:
        return load_weights(
            model, cfg.weights, prefix=cfg.weights_prefix, children=cut.units(), strict=cfg.strict
        )
    except FeatxError as err:
        raise FeatxError(f"{cfg.source}: key `weights`: {err}") from None


def _path(model: nn.Module, upto: str | int, cfg: BackboneConfig, key: str) -> CutPath:
    try:
        return resolve_path(model, upto)
    except FeatxError as err:
        raise FeatxError(f"{cfg.source}: key `{key}`: {err}") from None


def resolve_freeze(names: list[str], kept: int, cfg: BackboneConfig) -> int:
    """How many leading children the config freezes."""
    if cfg.freeze is None:
        return 0
    spelling, value = cfg.freeze
    if spelling == "freeze":
        if value is False:
            return 0
        count = _resolve_name(names, value, cfg)
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
            f"`{names[kept - 1]}`"
        )
    return count


def _resolve_name(names: list[str], value: object, cfg: BackboneConfig) -> int:
    if isinstance(value, str) and value in names:
        return names.index(value) + 1
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= len(names):
        return value
    raise FeatxError(
        f"{cfg.source}: key `freeze` is {value!r}; accepted: null, a child name "
        f"({listing(names, len(names))}) or a count 0..{len(names)}"
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


def _measure(backbone: Backbone, input_shape: tuple[int, ...]) -> None:
    """Channels and stride of every output, from one dry run at ``input_shape``.

    The dry run uses fake tensors — shapes only, no kernel runs and nothing is allocated, so a detection
    config's 800x1333 input costs no memory — and falls back to a real run where a module cannot run fake.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    param = next(backbone.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            try:
                with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                    outputs = backbone(
                        mode.from_tensor(torch.empty(input_shape, device="meta")).to(device, dtype)
                    )
            except Exception:
                x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
                outputs = backbone(x)
    except Exception as err:
        raise FeatxError(
            f"the backbone cannot run on an input of shape {list(input_shape)}: "
            f"{type(err).__name__}: {one_line(err)}; set `verify.input_shape`"
        ) from None
    finally:
        backbone.train(was_training)
    for name, out in outputs.items():
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
        backbone.out_channels[name] = int(out.shape[1])
        backbone.shapes[name] = list(out.shape)
        backbone.strides[name] = max(1, round(input_shape[-1] / out.shape[-1]))
