"""A plan made into a backbone: the kept children (or the traced root) tapped, frozen, normalised,
measured on a dry run and, with ``fpn``, wrapped."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from featx.backbone.body import Backbone, GlueBackbone, take_maps
from featx.backbone.fpn import BackboneWithFPN, BuiltBackbone, _load_fpn
from featx.backbone.paths import FLAGS
from featx.backbone.taps import NotMaps, _measure, by_module
from featx.backbone.tokens import TokenMap, final_norm, grid_of, last_stage
from featx.config import BackboneConfig
from featx.cut import CutPath
from featx.errors import FeatxError, FeatxWarning, listing
from featx.glue import trace_root
from featx.glue_chain import chain_break
from featx.input_shapes import check_input_shape
from featx.truncation import truncated

if TYPE_CHECKING:
    from featx.backbone.plan import BackbonePlan

M = TypeVar("M", bound=nn.Module)


def _build(resolved: BackbonePlan, device: torch.device | None = None) -> BuiltBackbone:
    """``plan.build()``: the backbone made from the plan's model, measured (on ``device`` when given),
    wrapped."""
    return _measured(resolved, _assemble(resolved), device)


def _assemble(resolved: BackbonePlan, model_output: bool = False) -> Backbone | GlueBackbone:
    """The plan's tapped module over its model's own children (the traced root with keep_glue), frozen
    and normalised: not measured, not wrapped (``model_output``: a keep_glue cut at the last child
    returns the model's output, as ``truncate`` does, rather than the child's)."""
    cfg, model, path = resolved.config, resolved.model, resolved.cut
    taps = by_module(resolved.tapped)
    frozen = list(resolved.frozen)
    backbone: Backbone | GlueBackbone
    if resolved.keep_glue:
        backbone = _glue_backbone(model, path, taps, frozen, cfg, model_output)
    else:
        _require_chains(model, path, taps, cfg)
        children = OrderedDict(truncated(model, path).named_children())
        if cfg.norm == "frozen":
            children = OrderedDict((name, frozen_norms(child)) for name, child in children.items())
        backbone = Backbone(
            children,
            taps,
            frozen,
            norm_eval=cfg.norm == "eval",
            expanded=tuple(path.containers()[1:]),
        )
    if cfg.norm != "train":
        _warn_without_batch_norm(backbone, cfg)
    backbone.source_params = resolved.source_params
    backbone.upto = path.upto
    return backbone


def _warn_without_batch_norm(backbone: nn.Module, cfg: BackboneConfig) -> None:
    """``norm: frozen`` and ``norm: eval`` act on BatchNorm only (its running statistics); on a backbone
    without one they do nothing, which the config's author should hear once rather than find out. A
    warning, not an error: mmdetection's ``norm_eval`` is as silently a no-op on LayerNorm backbones
    (ConvNeXt, Swin), and configs carry it across backbones."""
    if any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) or "FrozenBatchNorm" in type(m).__name__
        for m in backbone.modules()  # `norm: frozen` has replaced them already (torchvision's, timm's)
    ):
        return
    norms = sorted({type(m).__name__ for m in backbone.modules() if "Norm" in type(m).__name__})
    uses = f"it uses {listing(norms)}" if norms else "it has no norm layer at all"
    warnings.warn(
        FeatxWarning(
            f"{cfg.source}: norm: {cfg.norm} does nothing: `{cfg.model}` has no BatchNorm ({uses}), "
            "so there are no running statistics to hold; `norm: train` builds the same backbone"
        ),
        stacklevel=5,
    )


def _measured(
    resolved: BackbonePlan, backbone: Backbone | GlueBackbone, device: torch.device | None = None
) -> BuiltBackbone:
    """``backbone`` measured on its dry runs (each output an NCHW map: channels, stride, shape) and, with
    ``fpn``, wrapped; in eval mode, on ``device`` when given (the dry runs run there)."""
    cfg, model, shape = resolved.config, resolved.model, resolved.input_shape
    if resolved.verify.input_shape is not None:  # the model's own size fits it
        check_input_shape(model, shape, cfg.model, cfg.key("verify.input_shape"))
    # the errors name the flags of a SPEC (`--input-shape`), a config's keys, or the flag over one
    flags = cfg.source == FLAGS
    shape_key = "--input-shape" if flags or "verify.input_shape" in cfg.overridden else "`verify.input_shape`"
    glue_key = "--keep-glue" if flags else "--keep-glue / `keep_glue: true`"
    try:
        try:
            _measure(_on(backbone, device), shape, shape_key, glue_key)
        except NotMaps as not_maps:  # token outputs (ViT, Swin): made into NCHW maps, then measured as maps
            maps, norm = _token_maps(resolved, not_maps, shape)
            take_maps(backbone, maps, norm)  # the final norm it takes is the model's, where the model is
            _measure(_on(backbone, device), shape, shape_key, glue_key)
        if cfg.final_norm and not backbone.token_maps:
            raise FeatxError(
                "key `final_norm` is true, and no output is a token map the final norm applies to "
                "(every output is an NCHW map already); set `final_norm: false`"
            )
    except FeatxError as err:
        raise FeatxError(str(err) if flags else f"{cfg.source}: {err}") from None
    backbone.input_shape = shape
    backbone.output_names = [output for output, _ in cfg.outputs]
    if cfg.fpn is not None:
        wrapped = BackboneWithFPN(backbone, cfg.fpn.out_channels, cfg.fpn.extra_blocks)
        if cfg.weights is not None:
            _load_fpn(wrapped, cfg)
            if not wrapped.fpn_loaded:  # the body came from the file and the FPN did not: say so
                warnings.warn(
                    FeatxWarning(f"{cfg.source}: the FPN stays at random init: {wrapped.fpn_source}"),
                    stacklevel=5,
                )
        return _on(wrapped, device).eval()
    return backbone.eval()


def _on(module: M, device: torch.device | None) -> M:
    return module if device is None else module.to(device)


def _token_maps(
    resolved: BackbonePlan, not_maps: NotMaps, shape: tuple[int, ...]
) -> tuple[dict[str, TokenMap], tuple[str, nn.Module] | None]:
    """How each output a dry run found not to be an NCHW map becomes one (``featx.backbone.tokens``), and
    the final norm the maps apply (``final_norm: true``): its name and module. Tokens need the model's
    token grid (timm's ``patch_embed`` and ``num_prefix_tokens``) and the root's glue (the class token and
    position embedding it adds before the blocks: ``keep_glue: true``), and their count must be the grid's
    at the input; NHWC maps (Swin) are permuted, the final norm applied to the last stage only.

    Raises:
        FeatxError: an output that is neither (the dry run's refusal), or tokens that cannot be laid out.
    """
    cfg, model = resolved.config, resolved.model
    child_of = dict(resolved.outputs)
    grid, last = grid_of(model), last_stage(model)
    norm = (NORM, final_norm(model, "key `final_norm`")) if cfg.final_norm else None
    maps: dict[str, TokenMap] = {}
    for name, found in not_maps.found.items():
        child = child_of.get(name, name)
        if found.layout == "NHWC":
            at_last = last is not None and child in (last, last.rsplit(".", 1)[0])
            maps[name] = TokenMap("NHWC", None, cfg.final_norm and at_last)
            continue
        if found.layout != "tokens" or grid is None:
            raise FeatxError(str(found))
        if not resolved.keep_glue:
            raise FeatxError(
                f"output `{name}` (`{child}`) is tokens {found.shape}, which `{type(model).__name__}`'s own "
                "forward makes with glue a plain cut loses (the class token, the position embedding); "
                + (
                    "pass --keep-glue"
                    if cfg.source == FLAGS
                    else "set `keep_glue: true` (or pass --keep-glue)"
                )
            )
        rows, columns = grid.size(shape[2], shape[3])
        if len(found.shape) != 3 or found.shape[1] != grid.prefix + rows * columns:
            raise FeatxError(
                f"output `{name}` (`{child}`) has {found.shape[1]} tokens at input {shape[2]}x{shape[3]}, "
                f"not the {grid.prefix} prefix tokens and the {rows}x{columns} grid of "
                f"{grid.patch[0]}x{grid.patch[1]} patches `{type(model).__name__}` declares; featx cannot "
                "lay them out as a map"
            )
        maps[name] = TokenMap("tokens", grid, cfg.final_norm)
    if cfg.final_norm and not any(m.norm for m in maps.values()):
        raise FeatxError(
            f"key `final_norm` is true, and `{type(model).__name__}` applies its final norm to the last "
            f"stage `{last}` only, which no output taps; tap it or set `final_norm: false`"
        )
    return maps, norm if any(m.norm for m in maps.values()) else None


NORM = "norm"  # the final norm's name in timm's models


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
        # the flags of `featx extract SPEC`, or a flag over the config's key, are named as the flag
        flagged = cfg.source == FLAGS or ("outputs" if first is not None else "upto") in cfg.overridden
        if first is not None:
            what = (
                f"--outputs `{first}`"
                if flagged
                else f"{cfg.source}: key `outputs.{first}`: `{tapped[first]}`"
            )
        else:
            what = f"--upto `{path.upto}`" if flagged else f"{cfg.source}: key `upto`: the cut `{path.upto}`"
        instead = f"tap `{container}`" if whole else f"cut at `{container}`"  # a tap there runs it whole
        if broken.glue_keeps:
            instead += " or pass --keep-glue" if flagged else " or set `keep_glue: true`"
        raise FeatxError(
            f"{what} is inside `{container}` ({type(module).__name__}), whose children the plain "
            f"backbone runs one after the other, but {broken.why}; {instead}"
        )


def _glue_backbone(
    model: nn.Module,
    path: CutPath,
    taps: Mapping[str, list[str]],
    frozen: list[str],
    cfg: BackboneConfig,
    model_output: bool = False,
) -> GlueBackbone:
    try:
        # each tap, the cut's included, is what its module returns: at the last child, not the model's
        # output (unless `model_output`: truncate's value at the cut)
        taps_before = [name for name in taps if name != path.upto]
        keep = trace_root(model, cfg.leaf_functions).cut(path, taps=taps_before, model_output=model_output)
    except FeatxError as err:
        if cfg.source == FLAGS:  # --keep-glue: truncate's own refusal
            raise
        raise FeatxError(f"{cfg.key('keep_glue')}: {err}") from None
    backbone = GlueBackbone(keep, taps, frozen, norm_eval=cfg.norm == "eval")
    if cfg.norm == "frozen":
        for name, child in list(backbone.named_children()):
            replaced = frozen_norms(child)
            if replaced is not child:
                setattr(backbone, name, replaced)
    return backbone


def frozen_norms(module: nn.Module) -> nn.Module:
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
        replaced = frozen_norms(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module
