"""The module extraction runs: a cut featx can build, its taps, pooled — and the full model it is checked against.

A SPEC with ``upto`` (and optional taps ``outputs``; child names, counts or dotted paths) is read as a
backbone config of those keys and resolved by the same ``featx.backbone.resolve`` a config goes through:
its runner is the plan's tapped module (``BackbonePlan.runner``: not measured, so a ViT's tokens can be
tapped and pooled), and with ``keep_glue`` a cut at the last child returns the model's output, as
``featx.truncate(model, upto, keep_glue=True)`` does. A backbone config (or a featx ``.safetensors``
export) is resolved and built (measured) by ``featx.backbone``. The model and its weights are read as
``featx.load_model`` reads them; a model without weights is refused unless asked for, and then its init
is seeded. Either way the full
source model holds the very weights the cut runs, and the cuts verified on a real batch are the ones the
runner runs, so ``verify_cuts`` compares like with like.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from featx.backbone.paths import FLAGS
from featx.backbone.plan import BackbonePlan, resolve
from featx.checkpoints import Checkpoint
from featx.config import BackboneConfig, is_config_path, load_config
from featx.cut import CutPath
from featx.errors import FeatxError, did_you_mean, listing, one_line
from featx.models import weights_of

POOLS = ("none", "avg", "max", "cls")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_SPELLINGS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}


@dataclass
class Plan:
    """What runs, what it is checked against, and how each output is stored."""

    spec: str  # the model spec
    config: str | None  # the config file, when the model came from one
    full: nn.Module  # the whole source model, for verification
    runner: nn.Module  # x -> {output name: tensor}, before pooling
    upto: str  # the cut as the runner runs it: a child name, or dotted for a nested cut (`layer3.1`)
    keep_glue: bool
    taps: dict[str, str]  # output name -> tapped module (dotted when nested)
    pools: dict[str, str]  # output name -> pool
    dtypes: dict[str, str]  # output name -> storage dtype name
    checkpoint: Checkpoint | None  # the weights the model was loaded from (the cache file for a name)
    seed: int | None  # the seed of the random init, when the model has no weights (else None)
    data: Mapping[str, object]  # the config's data: overrides
    cuts: tuple[CutPath, ...]  # what the first batch verifies: each tap and the cut, as the runner runs them
    model_output: bool  # a --keep-glue SPEC cut at the last child returns the model's output (truncate's)

    @property
    def weights_file(self) -> str | None:
        """The file the weights were read from: the user's, or the cache file a weights name resolved to."""
        return None if self.checkpoint is None else str(self.checkpoint.path)

    @property
    def weights_name(self) -> str | None:
        """The name pretrained weights were asked for by (``ResNet18_Weights.IMAGENET1K_V1``,
        ``resnet18.a3_in1k``, ``hf-hub:org/name``); None for a file or a random init."""
        return self.checkpoint.name if self.checkpoint is not None and self.checkpoint.pretrained else None


class Extractor(nn.Module):
    """The runner's outputs pooled per output; what the DataLoader's batches go through."""

    def __init__(self, runner: nn.Module, pools: Mapping[str, str]) -> None:
        super().__init__()
        self.runner = runner
        self.pools = dict(pools)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.runner(x)
        return {name: pool(outputs[name], how, name) for name, how in self.pools.items()}


def pool(x: torch.Tensor, how: str, name: str) -> torch.Tensor:
    """``none``: as is; ``avg``/``max``: over the spatial dims of an N, C, H, W map (as torchvision's
    ``AdaptiveAvgPool2d(1)`` + flatten) or the tokens of an N, L, C sequence; ``cls``: token 0 of N, L, C."""
    if how == "none":
        return x
    if how == "cls":
        if x.dim() != 3:
            raise FeatxError(
                f"--pool cls for output `{name}` takes the first token of an N, L, C output; "
                f"`{name}` has shape {list(x.shape)}; use avg or max"
            )
        return x[:, 0]
    if x.dim() == 4:
        fn = nn.functional.adaptive_avg_pool2d if how == "avg" else nn.functional.adaptive_max_pool2d
        return torch.flatten(fn(x, 1), 1)
    if x.dim() == 3:
        return x.mean(1) if how == "avg" else x.amax(1)
    raise FeatxError(
        f"--pool {how} for output `{name}` needs an N, C, H, W or N, L, C output; got shape {list(x.shape)}"
    )


def plan(
    model: str | os.PathLike[str] | Mapping[str, object],
    *,
    upto: str | int | None = None,
    keep_glue: bool = False,
    outputs: Sequence[str] | None = None,
    pool: str | Mapping[str, str] = "none",
    dtype: str | Mapping[str, str] = "float32",
    weights: str | os.PathLike[str] | None = None,
    weights_prefix: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
    random_weights: bool = False,
    seed: int = 0,
) -> Plan:
    """Build what ``featx.extract`` runs; see ``featx.extract`` for the arguments.

    The model, its weights and the cut are read as ``featx verify`` reads them: ``weights`` is a file or a
    pretrained weights name (``featx.models.build_model``), ``model_kwargs``' download switches
    (``weights=``, ``pretrained=``) are weights too, and ``upto`` and ``outputs`` are child names, counts or
    dotted paths (``featx.cut.resolve_path``). A model that gets no weights is refused unless
    ``random_weights``; then its init is seeded by ``seed``, the same in every run and every rank.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FeatxError(f"--seed {seed!r} is not an integer")
    if isinstance(model, Mapping) or is_config_path(str(model)):
        cfg = load_config(model)
        return _from_config(
            cfg,
            upto,
            keep_glue,
            outputs,
            pool,
            dtype,
            weights,
            weights_prefix,
            model_kwargs,
            random_weights,
            seed,
        )
    spec = str(model)
    if upto is None:
        raise FeatxError(f"extract `{spec}` needs --upto (where to cut), or give a backbone config (.yaml)")
    # the flags as a config of the same keys, resolved as a config is: `featx.backbone.resolve`
    flags: dict[str, object] = {"model": spec, "upto": upto, "keep_glue": keep_glue}
    if outputs:
        flags["outputs"] = [str(o) for o in outputs]
    cfg = dataclasses.replace(load_config(flags), source=FLAGS)
    resolved, checkpoint = _resolved(
        cfg, f"`{spec}`", weights, weights_prefix, model_kwargs, random_weights, seed
    )
    if keep_glue and any(tap.child != resolved.cut.upto for tap in resolved.tapped):
        raise FeatxError(
            "--keep-glue returns the model's value at the cut only; drop --outputs or tap the cut alone"
        )
    # a --keep-glue cut at the last child returns the model's output, as truncate(..., keep_glue=True) does
    runner = resolved.runner(model_output=True)
    taps = dict(resolved.outputs)
    return Plan(
        spec,
        None,
        resolved.model.eval(),
        runner,
        resolved.cut.upto,
        keep_glue,
        taps,
        *_storage(taps, pool, dtype),
        checkpoint,
        seed if checkpoint is None else None,
        {},
        resolved.cuts,
        True,
    )


def _resolved(
    cfg: BackboneConfig,
    label: str,
    weights: str | os.PathLike[str] | None,
    weights_prefix: str | None,
    model_kwargs: Mapping[str, object] | None,
    random_weights: bool,
    seed: int,
) -> tuple[BackbonePlan, Checkpoint | None]:
    """``cfg`` with the flags' model overrides, resolved (``featx.backbone.resolve``) on the whole model
    built once, its init seeded by ``seed`` (what no weights file covers: a random model, the tail), and
    the weights it got (a model without any refused unless ``random_weights``)."""
    source = cfg.model_source.with_overrides(
        weights=weights, weights_prefix=weights_prefix, model_kwargs=model_kwargs
    )
    if cfg.source == FLAGS and weights_prefix is not None and source.weights.text is None:
        raise FeatxError(f"--weights-prefix {weights_prefix} needs --weights (the file to strip it from)")
    cfg = cfg.with_source(source)
    # the whole model built once, its init seeded (what no weights file covers: a random model, the tail),
    # and the backbone runs its children
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        resolved = resolve(cfg, whole_model=True)
    return resolved, _weights(label, resolved.model, random_weights)


def _weights(label: str, full: nn.Module, random_weights: bool) -> Checkpoint | None:
    """The weights ``full`` was loaded from; a model without any is refused unless ``random_weights``
    (``label`` names the model in the refusal)."""
    checkpoint = weights_of(full)
    if checkpoint is None and not random_weights:
        raise FeatxError(
            f"{label} gets no weights, so its features would be those of a random init; give weights "
            "(--weights: a .safetensors file or torch checkpoint, DEFAULT, IMAGENET1K_V1, a timm tag, "
            "hf-hub:org/name; a config's `weights`) or pass --random-weights (the init seeded by --seed, default 0)"
        )
    if checkpoint is not None and random_weights:
        raise FeatxError(
            f"--random-weights asks for a random init, but {label} gets weights `{checkpoint.name}`; keep one"
        )
    return checkpoint


def _from_config(
    cfg: BackboneConfig,
    upto: str | int | None,
    keep_glue: bool,
    outputs: Sequence[str] | None,
    pool: str | Mapping[str, str],
    dtype: str | Mapping[str, str],
    weights: str | os.PathLike[str] | None,
    weights_prefix: str | None,
    model_kwargs: Mapping[str, object] | None,
    random_weights: bool,
    seed: int,
) -> Plan:
    if cfg.fpn is not None:
        raise FeatxError(
            f"{cfg.source}: key `fpn`: an FPN is initialised for training with its head, so its features "
            "mean nothing yet; extract the config without `fpn`"
        )
    # the flags over the config's keys, by the rule of every verb (`featx build|export|verify CONFIG`)
    cfg = cfg.override(
        upto=upto,
        outputs=outputs or None,
        keep_glue=keep_glue or None,
        weights=weights,
        weights_prefix=weights_prefix,
        model_kwargs=model_kwargs,
    )
    resolved, checkpoint = _resolved(
        cfg, f"{cfg.source}: `{cfg.model}`", None, None, None, random_weights, seed
    )
    backbone, full = resolved.build(), resolved.model
    taps = dict(resolved.outputs)
    return Plan(
        cfg.model,
        cfg.source,
        full.eval(),
        backbone.eval(),
        resolved.cut.upto,
        cfg.keep_glue,
        taps,
        *_storage(taps, pool, dtype),
        checkpoint,
        seed if checkpoint is None else None,
        cfg.data,
        resolved.cuts,
        False,  # a config's backbone taps what each module returns
    )


def _storage(
    taps: Mapping[str, str], pool: str | Mapping[str, str], dtype: str | Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    pools = _per_output("--pool", taps, pool, POOLS, "none")
    dtypes = _per_output(
        "--dtype",
        taps,
        {k: _DTYPE_SPELLINGS.get(v, v) for k, v in _as_map(dtype).items()},
        tuple(DTYPES),
        "float32",
    )
    return pools, dtypes


def _as_map(value: str | Mapping[str, str]) -> dict[str, str]:
    return {"*": value} if isinstance(value, str) else dict(value)


def _per_output(
    flag: str, taps: Mapping[str, str], value: str | Mapping[str, str], choices: tuple[str, ...], default: str
) -> dict[str, str]:
    given = _as_map(value)
    unknown = [k for k in given if k != "*" and k not in taps]
    if unknown:
        raise FeatxError(
            f"{flag} names `{unknown[0]}`, which is not an output{did_you_mean(unknown[0], taps)}; "
            f"outputs: {listing(taps)}"
        )
    out = {name: given.get(name, given.get("*", default)) for name in taps}
    for name, v in out.items():
        if v not in choices:
            raise FeatxError(
                f"{flag} `{v}` (output `{name}`) is not accepted; accepted: {listing(choices)}"
                + did_you_mean(str(v), choices)
            )
    return out


def first_batch_outputs(
    extractor: nn.Module, x: torch.Tensor, keys: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Run the extractor once on the first batch; a model that cannot is bad input, said in one line."""
    try:
        with torch.inference_mode():
            return extractor(x)
    except FeatxError:
        raise
    except Exception as err:
        span = f"`{keys[0]}`" + (f" .. `{keys[-1]}`" if len(keys) > 1 else "")
        raise FeatxError(
            f"the model fails on the first batch ({len(keys)} images, {span}, input {list(x.shape)}): "
            f"{type(err).__name__}: {one_line(err)}"
        ) from None
