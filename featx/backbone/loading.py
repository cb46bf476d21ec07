"""A config's model built and its weights loaded into the children the cut keeps: the whole source model,
or (with a weights file) only the kept children given memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from featx.backbone.paths import FLAGS, _path
from featx.builders import BuildFailed
from featx.checkpoints import Checkpoint, load_weights
from featx.config import BackboneConfig
from featx.cut import CutPath, child_names
from featx.errors import FeatxError


def source_model(cfg: BackboneConfig) -> tuple[nn.Module, int]:
    """The whole source model a config cuts, with the weights file loaded into its kept children, and how
    many children the cut keeps: what ``featx verify CONFIG`` and ``featx check`` compare against. The
    command line's flags are in ``cfg`` already (``BackboneConfig.override``).

    A backbone checkpoint need not hold the tail, so the children after the cut keep their own init; the
    full forward still runs them.
    """
    model, checkpoint = _model_of(cfg)
    cut = _path(model, cfg.upto, cfg, "upto")
    if checkpoint is None or checkpoint.loaded:  # torchvision's builder loaded its own weights
        return model, cut.kept
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
    if cfg.weights is None or cfg.final_norm:  # the final norm, after the cut, is read too
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


def _fpn(model: nn.Module, cfg: BackboneConfig) -> tuple[str, ...]:
    """The weights file's keys the model has no place for: a featx export of an FPN config stores the FPN
    beside the kept children, under `fpn.`."""
    return ("fpn",) if cfg.fpn is not None and "fpn" not in child_names(model) else ()


def _loaded_modules(model: nn.Module, cut: CutPath, cfg: BackboneConfig) -> list[str]:
    """What the backbone runs and so needs from the weights file: the cut's modules, the final norm with
    ``final_norm``, and with keep_glue the own tensors of the root and of each container on the path, which the traced forwards may read."""
    names = cut.units()
    if cfg.final_norm and "norm" not in names:  # token maps apply the model's final norm (after the cut)
        names.append("norm")
    if cfg.keep_glue:
        for container in cut.containers():
            module = model.get_submodule(container)
            own = [*(n for n, t in module._parameters.items() if t is not None), *module._buffers]
            names += [f"{container}.{n}" if container else n for n in own]
    return names


def _model_of(cfg: BackboneConfig) -> tuple[nn.Module, Checkpoint | None]:
    """The config's model, and the checkpoint its weights resolve to; nothing is read from a file here
    except by torchvision's builder for its own pretrained weights."""
    try:
        return cfg.model_source.build()
    except BuildFailed as err:  # names each kwarg where it came from: the flag, the config's key
        named = cfg.source == FLAGS or str(err).startswith(cfg.source)
        raise FeatxError(str(err) if named else f"{cfg.source}: {err}") from None
    except FeatxError as err:
        raise _flagged(err, cfg, "weights", "model_kwargs") or FeatxError(f"{cfg.source}: {err}") from None


def _load(model: nn.Module, cut: CutPath, cfg: BackboneConfig, checkpoint: Checkpoint) -> list[str]:
    """Load the config's weights into the modules the cut runs (a nested cut's dropped blocks need none)."""
    try:
        return load_weights(
            model,
            checkpoint,
            prefix=cfg.weights_prefix,
            children=_loaded_modules(model, cut, cfg),
            strict=cfg.strict,
            skip=_fpn(model, cfg),
        )
    except FeatxError as err:
        raise _flagged(err, cfg, "weights", "weights_prefix") or FeatxError(
            f"{cfg.source}: key `weights`: {err}"
        ) from None


def _flagged(err: FeatxError, cfg: BackboneConfig, *keys: str) -> FeatxError | None:
    """``err`` naming the flag that overrode the first of ``keys`` the command line set (``--weights: weights
    file ... does not exist``), or None when the config's own values caused it."""
    flag = next((cfg.overridden[key] for key in keys if key in cfg.overridden), None)
    if flag is None:
        return None
    return FeatxError(str(err) if str(err).startswith(flag) else f"{flag}: {err}")
