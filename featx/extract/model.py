"""The module extraction runs: a cut featx can build, its taps, pooled — and the full model it is checked against.

A SPEC with ``upto`` (and optional taps ``outputs``) is cut into a ``Backbone`` of the model's own child
modules; with ``keep_glue`` it goes through ``featx.truncate(model, upto, keep_glue=True)``. A backbone
config is built with ``featx.build_backbone``. Either way the full source model holds the very weights the
cut runs, so ``verify_cuts`` on a real batch compares like with like.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from featx.backbone import Backbone, resolve
from featx.config import BackboneConfig, load_config
from featx.cut import child_names, resolve_cut
from featx.errors import FeatxError, did_you_mean, listing, one_line
from featx.models import load_model

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
    upto: str  # the cut, as a child name
    keep_glue: bool
    taps: dict[str, str]  # output name -> child name
    pools: dict[str, str]  # output name -> pool
    dtypes: dict[str, str]  # output name -> storage dtype name
    weights: str | None  # the weights file the cut's tensors came from
    data: Mapping[str, object]  # the config's data: overrides


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


class _Single(nn.Module):
    """A keep-glue cut as a one-output runner."""

    def __init__(self, body: nn.Module, name: str) -> None:
        super().__init__()
        self.body = body
        self.name = name

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.name: self.body(x)}


def plan(
    model: str | os.PathLike[str] | Mapping[str, object],
    *,
    upto: str | int | None = None,
    keep_glue: bool = False,
    outputs: Sequence[str] | None = None,
    pool: str | Mapping[str, str] = "none",
    dtype: str | Mapping[str, str] = "float32",
    weights: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
) -> Plan:
    """Build what ``featx.extract`` runs; see ``featx.extract`` for the arguments."""
    if isinstance(model, Mapping) or str(model).endswith((".yaml", ".yml")):
        cfg = load_config(model)
        return _from_config(cfg, upto, keep_glue, outputs, pool, dtype, weights, model_kwargs)
    spec = str(model)
    if upto is None:
        raise FeatxError(f"extract `{spec}` needs --upto (where to cut), or give a backbone config (.yaml)")
    full = load_model(spec, weights=weights, weights_prefix=None, **dict(model_kwargs or {}))
    names = child_names(full)
    kept = resolve_cut(full, upto)
    cut = names[kept - 1]
    tapped = list(outputs) if outputs else [cut]
    taps: dict[str, str] = {}
    for tap in tapped:
        try:
            index = resolve_cut(full, tap) - 1
        except FeatxError:
            raise FeatxError(
                f"--outputs `{tap}` is not a child of `{type(full).__name__}`{did_you_mean(str(tap), names)}; "
                f"children: {listing(names, len(names))}"
            ) from None
        if index >= kept:
            raise FeatxError(
                f"--outputs `{tap}` is after the cut at `{cut}`; kept children: {listing(names[:kept], kept)}"
            )
        taps[str(tap)] = names[index]
    if keep_glue:
        if list(taps.values()) != [cut]:
            raise FeatxError(
                "--keep-glue returns the model's value at the cut only; drop --outputs or tap the cut alone"
            )
        from featx.truncate import truncate

        try:
            body = truncate(full, upto, keep_glue=True)
        except TypeError:
            raise FeatxError(
                "--keep-glue needs a featx whose truncate() has keep_glue (not this one)"
            ) from None
        runner: nn.Module = _Single(body, next(iter(taps)))
    else:
        by_child: dict[str, list[str]] = {}
        for output, child in taps.items():
            by_child.setdefault(child, []).append(output)
        runner = Backbone(OrderedDict(list(full.named_children())[:kept]), by_child, [], norm_eval=False)
    return Plan(
        spec, None, full, runner.eval(), cut, keep_glue, taps, *_storage(taps, pool, dtype), weights, {}
    )


def _from_config(
    cfg: BackboneConfig,
    upto: str | int | None,
    keep_glue: bool,
    outputs: Sequence[str] | None,
    pool: str | Mapping[str, str],
    dtype: str | Mapping[str, str],
    weights: str | None,
    model_kwargs: Mapping[str, object] | None,
) -> Plan:
    if keep_glue:
        raise FeatxError("--keep-glue takes a model SPEC with --upto; a backbone config runs its taps")
    if cfg.fpn is not None:
        raise FeatxError(
            f"{cfg.source}: key `fpn`: an FPN is initialised for training with its head, so its features "
            "mean nothing yet; extract the config without `fpn`"
        )
    if upto is not None:
        cfg = dataclasses.replace(cfg, upto=upto)
    if outputs:
        cfg = dataclasses.replace(cfg, outputs=tuple((str(o), o) for o in outputs))
    if weights is not None:
        cfg = dataclasses.replace(cfg, weights=weights)
    if model_kwargs:
        cfg = dataclasses.replace(cfg, model_kwargs={**cfg.model_kwargs, **model_kwargs})
    resolved = resolve(cfg, whole_model=True)  # the model built once: the backbone runs its children
    backbone, full = resolved.build(), resolved.model
    names = child_names(full)
    taps = dict(resolved.outputs)
    return Plan(
        cfg.model,
        cfg.source,
        full.eval(),
        backbone.eval(),
        names[resolved.kept - 1],
        cfg.keep_glue,
        taps,
        *_storage(taps, pool, dtype),
        cfg.weights,
        cfg.data,
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
