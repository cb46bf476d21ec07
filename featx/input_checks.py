"""What the verbs that check a cut (``verify``, ``verify_cuts``, ``sweep``, ``inspect``; ``featx.taps``) are
given, checked: the model (a spec or ``ModelSource`` loaded) and what reports call it (``_model``), the modes
(``_modes``), and the refusals of a full forward that gives nothing to judge at a cut (``_require_*``): each
a one-line ``FeatxError``, not a verdict."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from torch import nn

from featx.compare import Missing, describe, holds_tensor
from featx.cut import CutPath
from featx.errors import FeatxError, listing
from featx.glue_module import KeepGlue
from featx.glue_proof import glue_reference
from featx.model_sources import ModelSource, given_model
from featx.numerics import Numerics
from featx.recording import Recording
from featx.vocab import MODES


def _model(
    model: nn.Module | str | ModelSource,
    label: str | None,
    seed: int | None = None,
    weights: str | os.PathLike[str] | None = None,
    weights_prefix: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
) -> tuple[nn.Module, str]:
    """The model (a spec or ``ModelSource`` loaded with its weights, its random init seeded by ``seed``:
    ``featx.models.given_model``); and what reports call it: ``label``, else the spec, else its class."""
    model, source = given_model(
        model, weights=weights, weights_prefix=weights_prefix, model_kwargs=model_kwargs, seed=seed
    )
    if source is not None and label is None:
        label = source.spec
    cls = type(model)
    return model, label if label is not None else f"{cls.__module__}.{cls.__qualname__}"


def _modes(modes: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(modes, str):
        modes = (modes,)
    modes = tuple(dict.fromkeys(modes))
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise FeatxError(f"mode {bad[0] if bad else '(none)'!s} is not a mode; accepted: {listing(MODES)}")
    return modes


def _require_reference(recordings: dict[str, Recording], path: CutPath) -> None:
    for mode, rec in recordings.items():
        trace = rec.unit(path.upto)
        if not trace.returned and rec.error is not None:
            where = f" in `{rec.children[rec.error_child].name}`" if rec.error_child is not None else ""
            raise FeatxError(
                f"the full model's forward raised{where} in {mode} mode before the cut at `{trace.name}` "
                f"returned: {rec.error}; featx needs the full model's value at the cut"
            )


def _require_tensors(recordings: dict[str, Recording], path: CutPath) -> None:
    for rec in recordings.values():
        trace = rec.unit(path.upto)
        if not holds_tensor(trace.output):
            raise FeatxError(
                f"child `{trace.name}` returns {describe(trace.output)}, not a tensor or a tuple/list/dict of "
                "tensors; featx compares tensors, so cut at a child that returns one"
            )


def _require_glue_reference(recordings: dict[str, Recording], module: KeepGlue) -> None:
    for mode, rec in recordings.items():
        reference = glue_reference(rec, module)
        if isinstance(reference, Missing) and rec.error is not None:
            raise FeatxError(
                f"the full model's forward raised in {mode} mode before the cut at `{module.upto}` made its "
                f"value: {rec.error}; featx needs the full model's value at the cut"
            )
        if not isinstance(reference, Missing) and not holds_tensor(reference):
            raise FeatxError(
                f"the full model's value at the cut at `{module.upto}` is {describe(reference)}, not a "
                "tensor or a tuple/list/dict of tensors; featx compares tensors, so cut where there is one"
            )


def _require_any_child(recordings: dict[str, Recording], numerics: Numerics | None = None) -> None:
    """A forward that raises before any child returned, in every mode, is a bad input, not a verdict; in a
    numeric setting other than the default, the setting may be the cause (an op without a float16 kernel
    on the CPU)."""
    failed = {
        m: r for m, r in recordings.items() if r.error is not None and not any(c.returned for c in r.children)
    }
    if failed and len(failed) == len(recordings):
        mode, rec = next(iter(failed.items()))
        where = f" in `{rec.children[rec.error_child].name}`" if rec.error_child is not None else ""
        raise FeatxError(
            f"the full model's forward raised{where} in {mode} mode before any child returned: "
            f"{rec.error}; check the input shape"
            + (
                ""
                if numerics is None or numerics.is_default
                else f", or run in another dtype than {numerics.dtype}"
            )
        )
