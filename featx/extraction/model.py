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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from featx.backbone.paths import FLAGS
from featx.backbone.plan import BackbonePlan, resolve
from featx.config import BackboneConfig
from featx.cut import CutPath
from featx.errors import FeatxError, did_you_mean, listing, one_line
from featx.model_sources import ModelSource, source_of, weights_of
from featx.numerics import DTYPES, dtype_name
from featx.observation import quiet_fake_tensors

POOLS = ("none", "avg", "max", "cls")


@dataclass
class Plan:
    """What runs, what it is checked against, and how each output is stored."""

    source: ModelSource  # the model and its weights as built (`pretrained=True` by the name it loaded)
    config: str | None  # the config file, when the model came from one
    full: nn.Module  # the whole source model, for verification
    runner: nn.Module  # x -> {output name: tensor}, before pooling
    upto: str  # the cut as the runner runs it: a child name, or dotted for a nested cut (`layer3.1`)
    keep_glue: bool
    leaf_functions: tuple[Callable[..., Any], ...]  # what keep_glue's trace keeps whole
    taps: dict[str, str]  # output name -> tapped module (dotted when nested)
    pools: dict[str, str]  # output name -> pool
    dtypes: dict[str, str]  # output name -> storage dtype name
    data: Mapping[str, object]  # the config's data: overrides
    cuts: tuple[CutPath, ...]  # what the first batch verifies: each tap and the cut, as the runner runs them
    model_output: bool  # a --keep-glue SPEC cut at the last child returns the model's output (truncate's)

    @property
    def spec(self) -> str:
        """The model spec (``torchvision/resnet50``)."""
        return self.source.spec


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
    cfg: BackboneConfig,
    *,
    pool: str | Mapping[str, str] = "none",
    dtype: str | Mapping[str, str] = "float32",
    random_weights: bool = False,
) -> Plan:
    """Build what ``featx.extract`` runs from the one value ``featx.extract`` made of its model, source
    and cut arguments (``featx.backbone.backbone_config``: the model source, the cut and the taps); see
    ``featx.extract`` for the arguments.

    The model, its weights and the cut are read as ``featx verify`` reads them: the weights are the
    config's source (``featx.models.ModelSource``), and the cut and taps are child names, counts or dotted
    paths (``featx.cut.resolve_path``). A config made of a SPEC and its flags (its source is the command
    line) runs the plan's tapped module, unmeasured; a config file builds its backbone. A model that gets
    no weights is refused unless ``random_weights``; its init is seeded by the weights' ``seed``, the same
    in every run and every rank.
    """
    if cfg.source != FLAGS:
        return _from_config(cfg, pool, dtype, random_weights)
    resolved = _resolved(cfg, f"`{cfg.model}`", random_weights)
    if cfg.keep_glue and any(tap.child != resolved.cut.upto for tap in resolved.tapped):
        raise FeatxError(
            "--keep-glue returns the model's value at the cut only; drop --outputs or tap the cut alone"
        )
    # a --keep-glue cut at the last child returns the model's output, as truncate(..., keep_glue=True) does
    runner = resolved.runner(model_output=True)
    taps = dict(resolved.outputs)
    return Plan(
        _built(resolved.model),
        None,
        resolved.model.eval(),
        runner,
        resolved.cut.upto,
        cfg.keep_glue,
        cfg.leaf_functions,
        taps,
        *_storage(taps, pool, dtype),
        {},
        resolved.cuts,
        True,
    )


def _resolved(cfg: BackboneConfig, label: str, random_weights: bool) -> BackbonePlan:
    """``cfg`` resolved (``featx.backbone.resolve``) on the whole model built once, its init seeded by the
    weights' ``seed`` (what no weights file covers: a random model, the tail); a model without weights
    refused unless ``random_weights`` (``label`` names the model in the refusal)."""
    seed = cfg.model_source.weights.seed
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        resolved = resolve(cfg, whole_model=True)
    _check_weights(label, resolved.model, random_weights)
    return resolved


def _built(full: nn.Module) -> ModelSource:
    """The source ``full`` was built from, its weights as resolved (``featx.models.source_of``)."""
    source = source_of(full)
    assert source is not None, "featx.backbone.resolve builds the model through ModelSource.build"
    return source


def _check_weights(label: str, full: nn.Module, random_weights: bool) -> None:
    """Refuse a model without weights unless ``random_weights``, and weights with ``random_weights``
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


def _from_config(
    cfg: BackboneConfig,
    pool: str | Mapping[str, str],
    dtype: str | Mapping[str, str],
    random_weights: bool,
) -> Plan:
    if cfg.fpn is not None:
        raise FeatxError(
            f"{cfg.source}: key `fpn`: an FPN is initialised for training with its head, so its features "
            "mean nothing yet; extract the config without `fpn`"
        )
    resolved = _resolved(cfg, f"{cfg.source}: `{cfg.model}`", random_weights)
    backbone, full = resolved.build(), resolved.model
    taps = dict(resolved.outputs)
    return Plan(
        _built(full),
        cfg.source,
        full.eval(),
        backbone.eval(),
        resolved.cut.upto,
        cfg.keep_glue,
        cfg.leaf_functions,
        taps,
        *_storage(taps, pool, dtype),
        cfg.data,
        resolved.cuts,
        False,  # a config's backbone taps what each module returns
    )


def _storage(
    taps: Mapping[str, str], pool: str | Mapping[str, str], dtype: str | Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    pools = _per_output("--pool", taps, pool, POOLS, "none")
    # featx.numerics' one dtype parser (`bf16` is `bfloat16`); the error names the output
    given = {
        k: dtype_name(v, "--dtype" if k == "*" else f"--dtype (output `{k}`)")
        for k, v in _as_map(dtype).items()
    }
    dtypes = _per_output("--dtype", taps, given, tuple(DTYPES), "float32")
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


def output_shapes(extractor: nn.Module, x: torch.Tensor, keys: Sequence[str]) -> dict[str, torch.Size]:
    """Each output's shape on the batch ``x``: measured on fake tensors where the modules allow (no kernel
    runs), else by a real forward (``first_batch_outputs``, which says in one line why a model fails)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with torch.no_grad(), quiet_fake_tensors(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            return {name: t.shape for name, t in extractor(mode.from_tensor(x)).items()}
    except Exception:
        return {name: t.shape for name, t in first_batch_outputs(extractor, x, keys).items()}


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
