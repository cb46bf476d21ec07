"""``verify``, ``verify_cuts`` and ``sweep`` in a numeric setting other than float32 eager: the ``numerics``
argument checked (``_numerics``), the model and input in the setting with its tolerance (``_in_setting``),
and each cut made again from the model and judged against float64 (``_judged``, by
``featx.numeric_check.judge``, which knows nothing of how a cut is made)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from featx.compare import Tolerance
from featx.cut import CutPath
from featx.errors import FeatxError
from featx.glue import trace_root
from featx.glue_proof import glue_reference
from featx.guard import device_of
from featx.mode_result import ModeResult
from featx.numeric_check import judge, setting
from featx.numeric_check import tolerance as numeric_tolerance
from featx.numerics import Numerics
from featx.recording import Recording
from featx.replay import reference
from featx.truncation import truncated


def _in_setting(
    model: nn.Module, x: Any, numerics: Numerics, atol: float, rtol: float
) -> tuple[nn.Module, Any, Tolerance]:
    """The model and input in a non-default numeric setting, and the tolerance there (the dtype's, unless
    ``atol``/``rtol`` are given): ``featx.numeric_check``."""
    work, xw = setting(model, x, numerics)
    return work, xw, numeric_tolerance(numerics, device_of(xw, work), atol, rtol)


def _numerics(numerics: Numerics | None) -> Numerics:
    if numerics is None:
        return Numerics()
    if not isinstance(numerics, Numerics):
        raise FeatxError(
            f"numerics {numerics!r} is not a setting; accepted: featx.numerics.Numerics(dtype=..., autocast=...)"
        )
    return numerics


def _judged(
    original: nn.Module,
    work: nn.Module,
    given: Any,
    x: Any,
    paths: Mapping[str, CutPath],
    keep_glue: bool,
    leaves: Sequence[Callable[..., Any]],
    recordings: dict[str, Recording],
    results: dict[str, dict[str, ModeResult]],
    *,
    seed: int,
    containers: Sequence[str],
    numerics: Numerics,
    tolerance: Tolerance,
    model_output: bool = True,
) -> dict[str, dict[str, ModeResult]]:
    """``results`` (mode -> cut -> result) judged in ``numerics`` against float64 (``featx.numeric_check``):
    each cut of ``paths`` made again from the user's model ``original`` in float64 and from ``work``, the
    copy in the setting (keep_glue's traced under its autocast, as the proof traced it); a cut keep_glue
    refuses is its refusal: ``judge`` leaves a result that already failed as it is, and calls one that
    passed ``no_float64``."""

    def cuts_of(m: nn.Module) -> dict[str, nn.Module | str]:
        if not keep_glue:
            return {name: truncated(m, path) for name, path in paths.items()}
        with numerics.running(device_of(x, work)) if m is work else contextlib.nullcontext():
            traced = trace_root(m, leaves)
        made: dict[str, nn.Module | str] = {}
        for name, path in paths.items():
            try:
                made[name] = traced.cut(path, model_output=model_output)
            except FeatxError as err:
                made[name] = str(err)
        return made

    return judge(
        original, work, given, x, cuts_of, _value_at(keep_glue), recordings, results,
        seed=seed, containers=containers, numerics=numerics, tolerance=tolerance,
    )  # fmt: skip


def _value_at(keep_glue: bool) -> Callable[[Recording, str, nn.Module], Any]:
    """The full model's value at a cut in a recording: a keep_glue module's (``glue_reference``), else
    the recorded output of the cut's last module."""
    if keep_glue:
        return lambda rec, upto, module: glue_reference(rec, module)  # type: ignore[arg-type]
    return lambda rec, upto, module: reference(rec, upto)
