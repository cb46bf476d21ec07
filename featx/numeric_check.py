"""A cut judged in a numeric setting other than float32 eager (``featx.numerics.Numerics``): what
``verify``, ``verify_cuts`` and ``sweep`` add to their verdict when asked for ``--dtype``, ``--autocast``,
``--compile`` or ``--channels-last``.

The verbs run their usual proof on the model in that setting (a copy in the dtype and memory format, the
input converted, each forward under autocast when asked) with the tolerance of the dtype the forward
computes in (``Numerics.tolerance``: ``torch.testing.assert_close``'s). ``judge`` then measures both sides
against the truth: the full model and each cut run again in float64 (a float64 copy, contiguous, eager, the
same input and RNG seed), and per mode

- ``model_error``: the full model in the setting against the full model in float64, at the cut;
- ``cut_error``: the cut in the setting (compiled with ``torch.compile`` when asked) against the same;

both by ``error``: the largest ``|a - b| / (atol + rtol * |b|)`` over the elements, ``b`` the float64
value, in units of the dtype's tolerance (1 is its edge). A cut is faithful in the setting when it (eager) equals
the full model within the tolerance, its float64 run equals the float64 full model exactly, and
``cut_relative_error <= FACTOR * max(model_relative_error, eps)`` (``relative_error``: ``||a - b|| / ||b||``
over the whole value, which one near-zero element does not dominate; ``eps`` the dtype's). A cut that equals the full model within the tolerance but
differs in float64 lost something the dtype cannot show (a glue smaller than its resolution): its verdict
is ``below_resolution``, not faithful.

Under ``compile`` the cut module is compiled and judged by its float64 error (the factor); the same module
run eager is what is held to the tolerance against the full model's eager forward in the setting (recorded
with hooks, which a compiled forward would not run as written), and in float64 exactly. Compiled and eager
outputs differ by more than one op's tolerance after a few fused layers, though both are as far from float64.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from featx.compare import EXACT, Missing, Tolerance, compare, copy_tree
from featx.errors import FeatxError, one_line
from featx.guard import Snapshot, device_of, preserved, seed_rng, set_mode
from featx.mode_result import ModeResult, NumericResult
from featx.numerics import Numerics
from featx.record import record
from featx.recording import Recording
from featx.replay import AsRecorded

# faithful: the cut's relative error against float64 at most FACTOR times the full model's own (or the dtype's
# eps). Measured (docs/numerics.md): faithful cuts of torchvision and timm resnet18 and a keep_glue ViT at
# bfloat16 and bfloat16 autocast, run eager, give equal errors (ratio 1.0: the cut runs the very ops the full
# model ran); a keep_glue ViT compiled at bfloat16, 0.8. A compiled kernel that rounds otherwise adds a
# rounding of its own, of the size of the full model's: hence 2. A cut that loses work is off by far more.
FACTOR = 2.0

CutsOf = Callable[[nn.Module], Mapping[str, "nn.Module | str"]]
ValueAt = Callable[[Recording, str, nn.Module], Any]


def setting(model: nn.Module, x: Any, numerics: Numerics) -> tuple[nn.Module, Any]:
    """The model and input in ``numerics``: a copy of the model where its dtype or memory format changes
    (the user's model is never converted), the input converted (``Numerics.input``)."""
    if numerics.torch_dtype != _dtype_of(model) or numerics.channels_last:
        model = numerics.model(_copy(model, numerics.dtype))
    return model, pytree.tree_map(numerics.input, x)


def tolerance(numerics: Numerics, device: torch.device, atol: float, rtol: float) -> Tolerance:
    """The tolerance a setting compares with: ``atol``/``rtol`` where either is given (> 0), else the
    dtype's (``Numerics.tolerance``)."""
    if atol or rtol:
        return Tolerance(atol, rtol)
    r, a = numerics.tolerance(device)
    return Tolerance(a, r)


def judge(
    model: nn.Module,
    work: nn.Module,
    x: Any,
    xw: Any,
    cuts_of: CutsOf,
    value_at: ValueAt,
    recordings: Mapping[str, Recording],
    results: Mapping[str, Mapping[str, ModeResult]],
    *,
    seed: int,
    containers: Sequence[str],
    numerics: Numerics,
    tolerance: Tolerance,
) -> dict[str, dict[str, ModeResult]]:
    """Each mode's result of each cut with its ``NumericResult`` (see the module docstring).

    ``model`` is the user's model (copied to float64, untouched), ``work`` the model in the setting the
    verbs recorded (``recordings``, per mode) and proved (``results``: mode -> cut -> result), ``x`` the
    input as given and ``xw`` in the setting. ``cuts_of`` makes the cut modules of a model (cut -> module,
    or keep_glue's refusal), ``value_at`` the full model's value at a cut from a recording.
    """
    device = device_of(xw, work)
    modes = list(results)
    low = numerics.compute_dtype(device)
    name = str(low).removeprefix("torch.")
    x64 = pytree.tree_map(_float64, x)
    full64 = _copy(model, "float64").to(torch.float64)
    with preserved(full64) as snap64:
        rec64 = record(full64, x64, modes, seed, snap64, list(containers))
        cuts64 = cuts_of(full64)
        out64 = {m: _runs(cuts64, x64, m, seed, snap64, rec64[m], value_at) for m in modes}
    judged: dict[str, dict[str, ModeResult]] = {m: dict(results[m]) for m in modes}
    with preserved(work) as snapshot:
        cuts = cuts_of(work)
        for m in modes:
            for upto, module in cuts.items():
                base = results[m][upto]
                if isinstance(module, str) or upto not in out64[m]:
                    if base.ok:  # no cut to judge against float64: never faithful without a word
                        judged[m][upto] = replace(
                            base, numerics=_result(name, tolerance, None, None, None, "no_float64")
                        )
                    continue  # else keep_glue refused the cut, and its result says so
                ref = value_at(recordings[m], upto, module)
                ran64, ref64 = out64[m][upto]
                compiled = None
                if numerics.compile and base.error is None and base.mismatch is None:
                    compiled = _compiled(module, upto)
                out = _run(module, xw, m, seed, snapshot, numerics.running(device), compiled)
                model_error = error(ref, ref64, tolerance)  # the full model's, whatever the cut did
                if isinstance(out, _Raised):
                    if compiled is not None:
                        raise FeatxError(
                            f"torch.compile of the cut at `{upto}` failed in {m} mode: {out.error}"
                        )
                    judged[m][upto] = replace(
                        base, numerics=_result(name, tolerance, model_error, None, None, "differs")
                    )
                    continue
                # Compiled, the cut is judged by its error against float64 alone: inductor rounds each fused
                # kernel once, and over a few layers its output leaves the eager one by more than the dtype's
                # per-op tolerance (a faithful ViT cut at bfloat16 does) while its float64 error stays the
                # full model's. The same module eager is held to the tolerance (``base``): lost glue.
                cut_error = error(out, ref64, tolerance)
                model_relative, cut_relative = relative_error(ref, ref64), relative_error(out, ref64)
                floor = torch.finfo(low).eps  # the dtype's own step: a model exact to float64 still rounds
                exact = (
                    compare(ran64, ref64, EXACT)
                    if not isinstance(ran64, _Raised)
                    else ModeResult(None, False, error=ran64.error)
                )
                if not base.ok:
                    verdict = "differs"
                elif (
                    isinstance(ran64, _Raised)
                    or isinstance(ref64, (Missing, _Raised))
                    or exact.max_abs_diff is None
                ):
                    verdict = (
                        "no_float64"  # no float64 truth to judge by: not faithful, and not below resolution
                    )
                elif not exact.ok:
                    verdict = "below_resolution"
                elif cut_relative is None or cut_relative > FACTOR * max(model_relative or 0.0, floor):
                    verdict = (
                        "beyond_factor"  # by the relative errors: a per-element maximum is one noisy element
                    )
                else:
                    verdict = "faithful"
                numeric = _result(
                    name,
                    tolerance,
                    model_error,
                    cut_error,
                    exact.max_abs_diff,
                    verdict,
                    compiled=compiled is not None,
                    relative=(model_relative, cut_relative),
                )
                judged[m][upto] = replace(base, numerics=numeric)
    return judged


def relative_error(out: Any, reference: Any) -> float | None:
    """``||a - b|| / ||b||`` over every floating element of two tensor trees together (``b`` the reference),
    in float64: the error of the whole value, which one near-zero element does not dominate. None where they
    cannot be compared (structure, shape, a side that raised or has no value); a NaN or infinity on either
    side, or a zero reference with a nonzero difference, counts as infinite."""
    pairs = _float_pairs(out, reference)
    if pairs is None:
        return None
    difference = sum(float(((a - b) ** 2).sum()) for a, b in pairs)
    size = sum(float((b**2).sum()) for _, b in pairs)
    if not math.isfinite(difference) or not math.isfinite(size):
        return math.inf
    if size == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return math.sqrt(difference / size)


def error(out: Any, reference: Any, tolerance: Tolerance) -> float | None:
    """The largest ``|a - b| / (atol + rtol * |b|)`` over the elements of two tensor trees (``b`` the
    reference), in float64: 1 is the edge of ``tolerance``. None where they cannot be compared (structure,
    shape, a side that raised or has no value); a NaN or infinity on either side counts as infinite."""
    pairs = _float_pairs(out, reference)
    if pairs is None:
        return None
    worst = 0.0
    for a, b in pairs:
        scaled = (a - b).abs() / (tolerance.atol + tolerance.rtol * b.abs())
        scaled = torch.where(scaled.isnan(), torch.full_like(scaled, math.inf), scaled)
        worst = max(worst, float(scaled.max()))
    return worst


def _float_pairs(out: Any, reference: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The non-empty floating tensor leaves of two trees, pair by pair, in float64 on the CPU; None where the
    trees cannot be compared (a side that raised or has no value, another structure, another shape)."""
    if isinstance(reference, Missing) or isinstance(out, _Raised):
        return None
    leaves_a, spec_a = pytree.tree_flatten(out)
    leaves_b, spec_b = pytree.tree_flatten(reference)
    if spec_a != spec_b:
        return None
    pairs = []
    for a, b in zip(leaves_a, leaves_b, strict=True):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        if a.shape != b.shape:
            return None
        if a.is_floating_point() and b.is_floating_point() and a.numel():
            pairs.append((a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)))
    return pairs


class _Raised:
    def __init__(self, error: str) -> None:
        self.error = error


def _runs(
    cuts: Mapping[str, nn.Module | str],
    x: Any,
    mode: str,
    seed: int,
    snapshot: Snapshot,
    rec: Recording,
    value_at: ValueAt,
) -> dict[str, tuple[Any, Any]]:
    """Each cut module's output in ``mode`` and the full model's value there (cuts refused: none)."""
    return {
        upto: (_run(module, x, mode, seed, snapshot, nullcontext()), value_at(rec, upto, module))
        for upto, module in cuts.items()
        if not isinstance(module, str)
    }


def _run(
    module: nn.Module,
    x: Any,
    mode: str,
    seed: int,
    snapshot: Snapshot,
    context: AbstractContextManager[Any],
    compiled: Callable[..., Any] | None = None,
) -> Any:
    """``module`` (or its ``compiled`` form) on a copy of ``x`` in ``mode`` under ``seed``, the model put
    back first; eager under a torch function mode, as the recorded forward ran (``replay.AsRecorded``)."""
    snapshot.restore()
    set_mode(module, mode == "train")
    seed_rng(seed, device_of(x))
    try:
        with context:
            if compiled is not None:
                with _eager_random():
                    return compiled(copy_tree(x))
            with AsRecorded():
                return module(copy_tree(x))
    except Exception as err:
        return _Raised(f"{type(err).__name__}: {one_line(err)}")


def _compiled(module: nn.Module, upto: str) -> Callable[..., Any]:
    """``torch.compile(module)`` on fresh caches: dynamo caches by code object, and every ``nn.Sequential``
    shares ``forward``'s, so without a reset later cuts would hit its recompile limit and run eager."""
    torch._dynamo.reset()
    try:
        return torch.compile(module)
    except Exception as err:
        raise FeatxError(
            f"torch.compile of the cut at `{upto}` failed: {type(err).__name__}: {one_line(err)}"
        ) from None


def _eager_random() -> AbstractContextManager[Any]:
    """Inductor draws random numbers as eager does (``fallback_random``), so train-mode dropout in the
    compiled cut draws what the full model's eager forward drew under the same seed."""
    import torch._inductor.config as inductor

    return inductor.patch(fallback_random=True)


def _result(
    dtype: str,
    tolerance: Tolerance,
    model_error: float | None,
    cut_error: float | None,
    float64_diff: float | None,
    verdict: str,
    *,
    compiled: bool = False,
    relative: tuple[float | None, float | None] = (None, None),
) -> NumericResult:
    return NumericResult(
        dtype,
        tolerance.rtol,
        tolerance.atol,
        model_error,
        cut_error,
        FACTOR,
        float64_diff,
        verdict,  # type: ignore[arg-type]
        compiled=compiled,
        model_relative_error=relative[0],
        cut_relative_error=relative[1],
    )


def _copy(model: nn.Module, dtype: str) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as err:
        raise FeatxError(
            f"cannot copy the model to run it in {dtype} (the user's model is never converted): "
            f"{type(err).__name__}: {one_line(err)}"
        ) from None


def _dtype_of(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _float64(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(torch.float64)
    return x
