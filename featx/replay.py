"""Running a truncated model's modules against the full model's recording: the one way featx runs them.

``run_truncated`` runs a cut's ``nn.Sequential`` from the input, module by module, and compares with the
full model after each cut asked for. ``derive`` gives ``sweep``'s verdict after every module of a chain
from one recorded forward: where each module up to a cut was fed exactly what its predecessor returned
(the recorder's feed check) the Sequential computes exactly the recorded value, so nothing runs; from the
first module whose feed differs, the modules run on from the recorded value (and RNG state) before it.
``reference`` is the full model's value after a module, or a ``Missing`` saying why there is none.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from featx.compare import Missing, Tolerance, compare, copy_tree
from featx.errors import one_line
from featx.guard import Snapshot, device_of, seed_rng, set_mode, set_rng_state
from featx.mode_result import ModeResult
from featx.recording import Recording


def run_truncated(
    sequential: nn.Sequential,
    units: Sequence[str],
    x: Any,
    mode: str,
    seed: int,
    snapshot: Snapshot,
    rec: Recording,
    cuts: Iterable[str],
    tolerance: Tolerance,
) -> dict[str, ModeResult]:
    """Run ``sequential`` from a copy of ``x`` and compare after the last module of each cut.

    ``units`` are the modules ``sequential.forward`` calls one after the other, a nested Sequential's
    included (``stem``, ``stages.0``, ``stages.1``): calling them in turn is what the nested forwards do,
    with a look after each; ``cuts`` names the units to compare after.
    """
    inside = dict(sequential.named_modules(remove_duplicate=False))  # named as in the full model
    modules = [inside[name] for name in units]
    return run_units(units, modules, 0, x, seed, mode, snapshot, rec, set(cuts), tolerance)


def run_units(
    units: Sequence[str],
    modules: Sequence[nn.Module],
    start: int,
    x: Any,
    rng: int | tuple[torch.Tensor, ...],
    mode: str,
    snapshot: Snapshot,
    rec: Recording,
    cuts: set[str] | None,
    tolerance: Tolerance,
) -> dict[str, ModeResult]:
    """Run ``modules[start:]`` (the modules of ``units``) one after the other on a copy of ``x``, the one
    way featx runs a truncated model's modules, and compare with the full model after each of ``cuts``
    (None: after each).

    The model is put back first (``snapshot.restore()``), every module of ``units`` put in ``mode``, and
    the RNG seeded with ``rng`` (a seed) or set to it (a recorded state). When a module raises, each cut
    from it on has the error: named ``in `unit``` where every unit is compared (a resumed run).
    """
    snapshot.restore()
    for module in modules:
        set_mode(module, mode == "train")
    device = device_of(x)
    if isinstance(rng, tuple):
        set_rng_state(rng, device)
    else:
        seed_rng(rng, device)
    results: dict[str, ModeResult] = {}
    out = copy_tree(x)
    for i in range(start, len(units)):
        try:
            out = modules[i](out)
        except Exception as err:
            error = f"{type(err).__name__}: {one_line(err)}"
            if cuts is None:
                error += f" (in `{units[i]}`)"
            failed = ModeResult(None, False, error=error)
            return results | {k: failed for k in units[i:] if cuts is None or k in cuts}
        if cuts is None or units[i] in cuts:
            results[units[i]] = compare(out, reference(rec, units[i]), tolerance)
    return results


def derive(
    rec: Recording, units: Sequence[str], model: nn.Module, snapshot: Snapshot, tolerance: Tolerance
) -> list[ModeResult]:
    """The verdict after each of ``units`` (a truncated model's modules, in order), from the recording
    where the feed checks prove it, else by running on from the first module whose feed differs."""
    n = len(units)
    traces = [rec.unit(name) for name in units]
    children = [snapshot.by_name[name] for name in units]
    results: list[ModeResult] = []
    first_bad = next((i for i, c in enumerate(traces) if c.feed is not None), n)
    for k in range(1, first_bad + 1):
        trace = traces[k - 1]
        if trace.returned:
            # The Sequential computes this very value; comparing it with itself still catches what never
            # counts as equal: NaN, and a value that holds no tensor.
            results.append(replace(compare(trace.output, trace.output), method="derived"))
        else:  # fed exactly as the Sequential would feed it, and raised: so would the Sequential
            results.append(
                ModeResult(None, False, error=f"{rec.error} (in `{trace.name}`)", method="derived")
            )
    if first_bad == n:
        return results
    j = first_bad
    if j > 0 and not traces[j - 1].returned:
        missing = no_reference(rec, units[j - 1])
        return results + [ModeResult(None, False, mismatch=missing, method="derived")] * (n - j)
    # Resume the Sequential where its input first departs from the full model's.
    x = traces[j - 1].output if j > 0 else rec.input
    state = traces[j - 1].rng_after if j > 0 else rec.rng_start
    assert state is not None, "a child that returned has the RNG state after it recorded"
    resumed = run_units(units, children, j, x, state, rec.mode, snapshot, rec, None, tolerance)
    return results + [resumed[name] for name in units[j:]]


def reference(rec: Recording, unit: str) -> Any:
    trace = rec.unit(unit)
    return trace.output if trace.returned else Missing(no_reference(rec, unit))


def no_reference(rec: Recording, unit: str) -> str:
    trace = rec.unit(unit)
    root = rec.unit_index(unit.split(".")[0])
    if rec.error is not None and (rec.error_child is None or rec.error_child <= root):
        where = f"in `{rec.children[rec.error_child].name}`" if rec.error_child is not None else "in its glue"
        return f"the full model raised {where} before returning from `{trace.name}`, so it has no value at this cut"
    return f"the full forward never calls `{trace.name}`, so it has no value at this cut"


class AsRecorded(TorchFunctionMode):
    """Runs every torch call as is, under a torch function mode, as the recorded forward ran.

    Some modules pick their kernels by whether a mode is active: ``nn.MultiheadAttention``'s fused fast path
    is off under one, and differs from the slow path by ~1e-6. The recorded reference ran under the
    recorder's mode, so whatever is compared with it exactly (a keep_glue module, a perturbed forward, a
    cut in float64) runs under one too: the same kernels. (Called without a mode, the module and the full
    model both take the fast path.)
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))
