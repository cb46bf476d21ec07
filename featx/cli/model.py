"""The model the model flags name: a SPEC (``--weights``, ``--model-kwarg``... and a cut) as a backbone
config, or a CONFIG with the flags given over its keys (``--upto`` over `upto`, ``--weights`` over
`weights`, ...: ``BackboneConfig.override``, one rule for every verb); and the seeded random init of a
model without weights, so one seed is one model in every verb and every process."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from featx.cli.flags import numerics_given
from featx.errors import FeatxError

if TYPE_CHECKING:
    import torch

    from featx.config import BackboneConfig
    from featx.model_sources import ModelSource


def is_config(spec: str) -> bool:
    """A config file, or a featx export (``config.is_config_path``; imported here, not at start-up)."""
    from featx.config import is_config_path

    return is_config_path(spec)


def device(text: str) -> torch.device:
    from featx.devices import torch_device

    return torch_device(text, "--device")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build under ``torch.manual_seed(seed)`` in a forked RNG, as ``load_model(..., seed=)`` does: a model
    without weights gets the same random init from the same seed, and the caller's RNG is untouched."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def spec_source(args: argparse.Namespace, spec: str) -> ModelSource:
    """``SPEC --weights W --weights-prefix P --model-kwarg K=V --seed S`` as the one ``ModelSource`` a verb
    that takes a SPEC builds (verify, sweep, inspect, taps): ``featx.models.model_source``, as the Python
    API makes it, its errors naming the flags."""
    from featx.model_sources import COMMAND_LINE, model_source

    return model_source(
        spec,
        weights=args.weights,
        weights_prefix=args.weights_prefix,
        model_kwargs=dict(args.model_kwarg),
        seed=args.seed,  # without weights the init comes from --seed: one seed, one model, every verb
        names=COMMAND_LINE,
    )


def weights_argument(weights: str | None) -> str | None:
    """``--weights`` as a config holds it: a file made absolute (a config's relative path is relative to
    the config's folder, the command line's to the working directory), a pretrained name as it is."""
    from featx.models import is_weights_name

    if weights is not None and not is_weights_name(weights):
        return os.path.abspath(weights)
    return weights


def leaf_functions(args: argparse.Namespace, keep_glue: bool) -> tuple[Callable[..., Any], ...]:
    """``--leaf-function NAME ...`` resolved to the functions (``function_names.resolve_function``), for a
    cut that keeps the glue (``keep_glue``: ``--keep-glue``, or a config's ``keep_glue: true``); refused
    otherwise."""
    from featx.function_names import resolve_function

    names = getattr(args, "leaf_function", None) or []
    if names and not keep_glue:
        raise FeatxError(
            f"--leaf-function {names[0]} names a function keep_glue's trace keeps whole; pass --keep-glue too"
        )
    return tuple(resolve_function(name, "--leaf-function") for name in names)


def spec_config(args: argparse.Namespace, spec: str) -> BackboneConfig:
    """``SPEC --upto X [--outputs a,b] [--keep-glue] [--weights ...]`` as the backbone config it means
    (``featx.backbone.backbone_config``, what ``featx.build_backbone`` and ``featx.export`` make of a SPEC
    too): each key set by its flag (``BackboneConfig.override``, the rule a CONFIG's flags follow), so every
    error names the flag the user typed (``--upto``, ``--input-shape``, ``--model-kwarg``), not a config key."""
    from featx.backbone import backbone_config
    from featx.model_sources import COMMAND_LINE

    refuse_neither(spec)
    if args.upto is None:
        raise FeatxError(f"{args.command} {spec} needs --upto (the cut), or a config file (.yaml)")
    return backbone_config(
        spec,
        upto=args.upto,
        outputs=args.outputs,
        keep_glue=args.keep_glue,
        leaf_functions=leaf_functions(args, args.keep_glue),
        weights=weights_argument(args.weights),
        weights_prefix=args.weights_prefix,
        model_kwargs=dict(args.model_kwarg),
        input_shape=args.input_shape,
        names=COMMAND_LINE,
    )


def refuse_neither(spec: str) -> None:
    """Refuse a SPEC|CONFIG argument that is neither: a path that is no config (``/dev/null``, a README),
    as ``featx check`` refuses it, or text that is no model spec (with the spec's did-you-mean)."""
    from featx.builders import spec_form_error

    refusal = spec_form_error(spec)
    if refusal is None:
        return
    if os.path.exists(spec):
        raise FeatxError(
            f"`{spec}` is neither a config nor a model spec; accepted: a backbone config (*.yaml, *.yml), a "
            "*.safetensors file featx export wrote, or `torchvision/<name>`, `timm/<name>`, "
            "`package.module:callable`"
        )
    raise refusal


def config_with_flags(args: argparse.Namespace, path: str) -> BackboneConfig | str:
    """A CONFIG with the model and cut flags the verb takes over the config's keys, by the one rule
    ``BackboneConfig.override`` applies (``--upto`` sets `upto`, ``--weights`` `weights`, ...): what
    ``verify``, ``build`` and ``export`` build from a CONFIG; ``featx.extract`` applies the same rule.
    Without such a flag, ``path`` itself: the verb reads it after its own checks (``--format``)."""
    from featx.config import load_config
    from featx.function_names import resolve_function

    flags = {
        "upto": getattr(args, "upto", None),
        "outputs": getattr(args, "outputs", None),
        "keep_glue": True if getattr(args, "keep_glue", False) else None,
        "weights": weights_argument(args.weights),
        "weights_prefix": args.weights_prefix,
        "model_kwargs": dict(args.model_kwarg) or None,
        "input_shape": getattr(args, "input_shape", None),
        "leaf_functions": tuple(
            resolve_function(name, "--leaf-function") for name in getattr(args, "leaf_function", None) or ()
        )
        or None,
        "numerics": numerics_given(args) or None,
    }
    if all(value is None for value in flags.values()):
        return path
    return load_config(path).override(**flags)


def overridden(cfg: BackboneConfig | str) -> dict[str, str]:
    """Config key -> the flag that overrode it (JSON ``overridden``); empty when no flag did (``cfg`` is
    then the path ``config_with_flags`` returned)."""
    from featx.backbone.paths import FLAGS

    if isinstance(cfg, str) or cfg.source == FLAGS:  # a SPEC's flags set its keys: they override nothing
        return {}
    return dict(cfg.overridden)


def overrides_text(cfg: BackboneConfig | str) -> str:
    """``  (--upto over `upto`, --weights over `weights`)``: the flags that overrode the config's keys, for
    the line that names the config; empty when none did."""
    flags = overridden(cfg)
    if not flags:
        return ""
    return "  (" + ", ".join(f"{flag} over `{key}`" for key, flag in flags.items()) + ")"
