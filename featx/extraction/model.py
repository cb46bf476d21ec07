"""The module extraction runs: a cut featx can build, its taps, pooled — and the full model it is checked against.

A SPEC with ``upto`` (and optional taps ``outputs``; child names, counts or dotted paths, resolved by
``featx.cut.resolve_path``) is cut into a ``Backbone`` of the model's own modules, a container a tap
reaches into run child by child as a backbone config's is; with ``keep_glue`` it goes through
``featx.truncate(model, upto, keep_glue=True)``. A backbone config (or a featx ``.safetensors`` export) is
resolved and built by ``featx.backbone``. The model and its weights are read as ``featx.load_model`` reads
them; a model without weights is refused unless asked for, and then its init is seeded. Either way the full
source model holds the very weights the cut runs, and the cuts verified on a real batch are the ones the
runner runs, so ``verify_cuts`` compares like with like.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from featx.backbone.body import Backbone
from featx.backbone.plan import resolve
from featx.config import BackboneConfig, is_config_path, load_config
from featx.cut import CutPath, resolve_path
from featx.errors import FeatxError, did_you_mean, listing, one_line
from featx.models import Checkpoint, download_switches, load_model, weights_of
from featx.truncation import truncate, truncated

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
    weights, kwargs = download_switches(spec, weights, dict(model_kwargs or {}), "--model-kwarg", "--weights")
    if weights_prefix is not None and weights is None:
        raise FeatxError(f"--weights-prefix {weights_prefix} needs --weights (the file to strip it from)")
    full = load_model(spec, weights, weights_prefix=weights_prefix, seed=seed, **kwargs)
    checkpoint = _weights(f"`{spec}`", full, random_weights)
    cut = resolve_path(full, upto)
    tapped = [(str(tap), resolve_path(full, tap, what="--outputs")) for tap in outputs or []]
    cuts: tuple[CutPath, ...]
    if keep_glue:
        if any(path.upto != cut.upto for _, path in tapped):
            raise FeatxError(
                "--keep-glue returns the model's value at the cut only; drop --outputs or tap the cut alone"
            )
        name = tapped[0][0] if tapped else cut.upto
        runner: nn.Module = _Single(truncate(full, cut.upto, keep_glue=True), name)
        taps, cuts = {name: cut.upto}, (cut,)
    else:
        # a tap inside a container runs that container child by child, as a backbone config's does
        at = cut.upto
        reach = {c for _, path in tapped for c in path.containers()[1:]}
        cut = cut.expanded(full, sorted(reach, key=lambda c: c.count(".")))
        units = cut.units()
        taps = {}
        for output, path in tapped or [(cut.upto, cut)]:
            target = path.upto
            unit = next((u for u in reversed(units) if u == target or u.startswith(target + ".")), None)
            if unit is None:
                raise FeatxError(
                    f"--outputs `{output}` is after the cut at `{at}`; the cut runs {listing(units, 8)}"
                )
            taps[output] = unit
        by_unit: dict[str, list[str]] = {}
        for output, unit in taps.items():
            by_unit.setdefault(unit, []).append(output)
        children = OrderedDict(truncated(full, cut).named_children())
        runner = Backbone(children, by_unit, [], norm_eval=False, expanded=tuple(cut.containers()[1:]))
        # the cuts the runner runs, each tap's and its own: prefixes of one chain of modules
        order = {unit: i for i, unit in enumerate(units)}
        cuts = tuple(cut.prefix(u) for u in sorted({*taps.values(), cut.upto}, key=order.__getitem__))
    return Plan(
        spec,
        None,
        full,
        runner.eval(),
        cut.upto,
        keep_glue,
        taps,
        *_storage(taps, pool, dtype),
        checkpoint,
        seed if checkpoint is None else None,
        {},
        cuts,
        True,
    )


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
    if keep_glue:
        raise FeatxError("--keep-glue takes a model SPEC with --upto; a backbone config runs its taps")
    if cfg.fpn is not None:
        raise FeatxError(
            f"{cfg.source}: key `fpn`: an FPN is initialised for training with its head, so its features "
            "mean nothing yet; extract the config without `fpn`"
        )
    weights, kwargs = download_switches(
        cfg.model, weights, dict(model_kwargs or {}), "--model-kwarg", "--weights"
    )
    if upto is not None:
        cfg = dataclasses.replace(cfg, upto=upto)
    if outputs:
        cfg = dataclasses.replace(cfg, outputs=tuple((str(o), o) for o in outputs))
    if weights is not None:
        cfg = dataclasses.replace(cfg, weights=str(weights))
    if weights_prefix is not None:
        cfg = dataclasses.replace(cfg, weights_prefix=weights_prefix)
    if kwargs:
        cfg = dataclasses.replace(cfg, model_kwargs={**cfg.model_kwargs, **kwargs})
    # the whole model built once, its init seeded (what no weights file covers: a random model, the tail),
    # and the backbone runs its children
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        resolved = resolve(cfg, whole_model=True)
    checkpoint = _weights(f"{cfg.source}: `{cfg.model}`", resolved.model, random_weights)
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
