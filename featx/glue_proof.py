"""Proving a keep_glue module (``truncate(model, cut, keep_glue=True)``) against the full model.

Each module is run as it comes back in the mode the model was found in, switched by ``train()`` in the
other, and compared with the full model's value at the cut (``glue_reference``); where it holds, it runs
again on a *fresh* input it was not built with (``fresh_input``: other values, and a larger batch and
map where the full model takes one), since a graph traced once can hold what was true of one input only.

A sweep proves all its cuts from one run per mode and input (``all_cuts``, ``prove_cuts``): one module of
the same trace that taps every cut gives each the value its own module computes, at the cost of one
forward instead of one per cut; where that cannot be shown (the run raises, a baked-in attribute stops
holding during it, a module overrides ``train()``), each cut's own module runs.

That run costs little more than the glue: where its graph calls one of the model's children (or a tracked
container's) with exactly what the recorded forward of the same input fed it — the same values, dtype,
shape and strides, under the same RNG state, train/eval flags and module attributes — and the recording
shows that call had no effect a caller could see but its output (``ChildTrace.contained``: it wrote to
nothing it was fed, returned nothing sharing its storage, changed no module attribute), and the module's
parameters and buffers are its own (no other module holds them, no graph reads them), the call is not
made again: it returns a copy of the recorded output and leaves the RNG where the recorded call left it
(``_Reuse``). Under the assumption ``featx.verification`` states (modules are deterministic given their
input, RNG state and state), that is what the call returns. The graph's glue, the taps and every call
that cannot be shown so run as they are; a module inside a call not made that is then called again
(whose state the call would have changed) makes the run start over with every call made.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from featx.compare import Missing, Tolerance, compare, copy_tree, differs
from featx.cut import CutPath
from featx.errors import FeatxError, one_line
from featx.glue import RootTrace
from featx.glue_module import KeepGlue
from featx.guard import Snapshot, device_of, flags_of, rng_state, seed_rng, set_mode, set_rng_state
from featx.mode_result import ModeResult
from featx.module_calls import _CALLS
from featx.record import record
from featx.recorder import _rng_equal
from featx.recording import Recording
from featx.replay import AsRecorded, reference


@dataclass(frozen=True)
class Fresh:
    """An input the keep_glue modules were not built with, and the full model's recordings on it."""

    input: Any
    shape: tuple[int, ...] | None  # None: not one tensor
    recordings: dict[str, Recording]


def prove_glue(
    module: KeepGlue,
    x: Any,
    fresh: Fresh | None,
    mode: str,
    seed: int,
    snapshot: Snapshot,
    rec: Recording,
    tolerance: Tolerance,
    returned: list[tuple[nn.Module, bool]] | None,
) -> ModeResult:
    """The keep_glue module against the full model in ``mode``: on the example input, then, if that holds,
    on the fresh one. ``returned``: the flags it came back with, where ``mode`` is the one it came back in
    (it runs as it is); None: it is switched to ``mode`` by ``train()``, as a user would."""
    built = _run_glue(module, x, mode, seed, snapshot, rec, tolerance, returned)
    if fresh is None or not built.ok:
        return built
    again = _run_glue(module, fresh.input, mode, seed, snapshot, fresh.recordings[mode], tolerance, returned)
    return built.with_fresh(again, fresh.shape)


@dataclass(frozen=True)
class AllCuts:
    """One keep_glue module that makes the value at every cut of a sweep in one run: the root's graph
    cut at its last child, every other cut a tap (copied as it is made), and its flags as it came back.

    Each cut's own module runs the same graph nodes in the same order up to its cut (dead code dropped:
    pure ops only), from the same input, RNG seed and module state, so it computes exactly the value this
    one holds for it: what ``prove_cuts`` relies on, under the assumption ``featx.verification`` states
    (modules are deterministic given their input and the RNG state).
    """

    module: KeepGlue
    returned: list[tuple[nn.Module, bool]]
    # tensor (by id) -> the modules of the model that hold it (parameter, buffer or plain attribute), by
    # every name, and "" where a graph of ``module`` reads it; None: a read not resolved, so no reuse
    holders: Mapping[int, frozenset[str]] | None = None
    own: dict[str, bool] = field(default_factory=dict, compare=False)  # ``_own``'s answers, per module


def all_cuts(
    traced: RootTrace, last: CutPath, glued: Mapping[str, KeepGlue | str], snapshot: Snapshot
) -> AllCuts | None:
    """The ``AllCuts`` of a sweep's keep_glue modules (``last``: the cut at the root's last child), or
    None where the one module would not stand for each cut's: a module whose class overrides ``train()``
    (or a scripted one) may set a shared module's flag otherwise than a cut's module would, and a cut
    keep_glue refuses, or a set of taps it refuses together, leaves each cut to its own module."""
    made = [name for name, g in glued.items() if not isinstance(g, str)]
    if snapshot.train_overridden or snapshot.scripted or len(made) < 2:
        return None
    if not isinstance(glued.get(last.upto), KeepGlue):
        return None
    try:
        module = traced.cut(last, [name for name in made if name != last.upto], lazy=True)
    except FeatxError:
        return None
    return AllCuts(module, flags_of(module), _holders(module, snapshot))


def _holders(module: KeepGlue, snapshot: Snapshot) -> dict[int, frozenset[str]] | None:
    """``AllCuts.holders``: who holds each tensor of the model, and which ones ``module``'s graphs read."""
    found: dict[int, set[str]] = {}
    for name, m in snapshot.by_name.items():
        for t in itertools.chain(m._parameters.values(), m._buffers.values(), m.__dict__.values()):
            if isinstance(t, torch.Tensor):
                found.setdefault(id(t), set()).add(name)
    for keep in module.modules():
        if isinstance(keep, KeepGlue):
            read = keep.tensors_read()
            if read is None:
                return None
            for t in read:
                if isinstance(t, torch.Tensor):
                    found.setdefault(id(t), set()).add("")
    return {key: frozenset(names) for key, names in found.items()}


def _own(together: AllCuts, snapshot: Snapshot, name: str) -> bool:
    """Whether every tensor of module ``name`` and the modules in it is held by none but them and read by
    no graph of ``together``: then a call of it not made changes no state anything else reads."""
    known = together.own.get(name)
    if known is None:
        holders = together.holders or {}
        inside = name + "."
        known = together.holders is not None and all(
            h == name or h.startswith(inside)
            for m in snapshot.subtree(name)
            for t in itertools.chain(m._parameters.values(), m._buffers.values(), m.__dict__.values())
            if isinstance(t, torch.Tensor)
            for h in holders.get(id(t), ())
        )
        together.own[name] = known
    return known


def prove_cuts(
    glued: Mapping[str, KeepGlue],
    together: AllCuts | None,
    x: Any,
    fresh: Fresh | None,
    mode: str,
    seed: int,
    snapshot: Snapshot,
    rec: Recording,
    tolerance: Tolerance,
    returned: Mapping[str, list[tuple[nn.Module, bool]]] | None,
) -> dict[str, ModeResult]:
    """``prove_glue`` for each module of ``glued`` (name -> module), with the same results, from one run
    of ``together`` per input instead of one run per cut. Where that run raises, a graph's baked-in
    attribute stops holding during it, or a cut's value is not a tree of tensors and plain values, the
    cuts concerned are proved one by one as ``prove_glue`` does, so no verdict rests on it.
    ``returned``: each module's flags where ``mode`` is the one it came back in, else None."""

    def flags(name: str) -> list[tuple[nn.Module, bool]] | None:
        return None if returned is None else returned[name]

    def alone(name: str, x: Any, rec: Recording) -> ModeResult:
        return _run_glue(glued[name], x, mode, seed, snapshot, rec, tolerance, flags(name))

    values = (
        None if together is None else _run_all(together, x, mode, seed, snapshot, returned is not None, rec)
    )
    if together is None or values is None:
        return {
            name: prove_glue(g, x, fresh, mode, seed, snapshot, rec, tolerance, flags(name))
            for name, g in glued.items()
        }
    built = {
        name: compare(values[name], glue_reference(rec, g), tolerance)
        if _plain(values[name])
        else alone(name, x, rec)
        for name, g in glued.items()
    }
    held = [name for name, result in built.items() if result.ok]
    if fresh is None or not held:
        return built
    frec = fresh.recordings[mode]
    again = _run_all(together, fresh.input, mode, seed, snapshot, returned is not None, frec)
    results = dict(built)
    for name in held:
        if again is not None and _plain(again[name]):
            on_fresh = compare(again[name], glue_reference(frec, glued[name]), tolerance)
        else:
            on_fresh = alone(name, fresh.input, frec)
        results[name] = built[name].with_fresh(on_fresh, fresh.shape)
    return results


def _run_all(
    together: AllCuts,
    x: Any,
    mode: str,
    seed: int,
    snapshot: Snapshot,
    as_returned: bool,
    rec: Recording | None = None,
) -> dict[str, Any] | None:
    """``together``'s values at every cut, run on a copy of ``x`` as ``_run_glue`` runs one cut's module;
    None where the run raises or an attribute a graph baked in fails to hold after any module call of it
    (where some cut's own module would raise, after its last call). ``rec``: the full model's recording
    on ``x`` in ``mode``, whose calls the run reuses where it can show them the same (``_Reuse``)."""
    if rec is not None and together.holders is not None:
        reuse = _Reuse(together, rec, snapshot, mode, device_of(x))
        values = _run_once(together, x, mode, seed, snapshot, as_returned, reuse)
        if not reuse.unproven:
            return values
    return _run_once(together, x, mode, seed, snapshot, as_returned, None)


def _run_once(
    together: AllCuts,
    x: Any,
    mode: str,
    seed: int,
    snapshot: Snapshot,
    as_returned: bool,
    reuse: _Reuse | None,
) -> dict[str, Any] | None:
    snapshot.restore()
    module = together.module
    if as_returned:
        for m, training in together.returned:
            m.training = training
    else:
        module.train(mode == "train")
    reads = [
        read
        for keep in module.modules()
        if isinstance(keep, KeepGlue)
        for read in keep.reads.get("train" if keep.training else "eval", ())
    ]
    broken: list[bool] = []

    def watch(*_: Any) -> None:
        if not broken and not all(read.holds() for read in reads):
            broken.append(True)

    if reads:
        watch()
    handle = nn.modules.module.register_module_forward_hook(watch) if reads else None
    seed_rng(seed, device_of(x))
    try:
        with AsRecorded(), _CALLS.seen_by(reuse) if reuse is not None else contextlib.nullcontext():
            out = module(copy_tree(x))
    except Exception:
        return None
    finally:
        if handle is not None:
            handle.remove()
    if broken or not isinstance(out, dict):
        return None
    return out


class _Unproven(Exception):
    """A module inside a call ``_Reuse`` did not make was called: the run starts over, every call made."""


class _Reuse:
    """The calls of one run of ``AllCuts``'s module that the recording ``rec`` of the same input shows
    made already, answered from it (the module docstring says when). Sees every call of a module of the
    model (``featx.module_calls``, as the recorder does); the others run as they are."""

    def __init__(
        self, together: AllCuts, rec: Recording, snapshot: Snapshot, mode: str, device: torch.device
    ) -> None:
        self.together = together
        self.rec = rec
        self.snapshot = snapshot
        self.training = mode == "train"
        self.device = device
        # every module of the model: its unit's index, or -1 (not a unit, or a unit under two names)
        self.module_info: dict[int, int] = {id(m): -1 for m in snapshot.by_name.values()}
        units: dict[int, int] = {}
        for i, unit in enumerate(rec.units):
            key = id(snapshot.by_name[unit.name])
            units[key] = -1 if key in units else i
        self.module_info.update(units)
        self.inside: set[int] = set()  # the modules inside a call not made
        self.unproven = False

    def call(self, module: nn.Module, i: int, args: tuple, kwargs: dict) -> Any:
        if id(module) in self.inside:  # its state is not what the call not made would have left
            self.unproven = True
            raise _Unproven
        if i >= 0 and not kwargs and len(args) == 1 and self._shown(i, args[0]):
            unit = self.rec.units[i]
            self.inside.update(id(m) for m in self.snapshot.subtree(unit.name))
            assert unit.rng_after is not None, "a unit that returned has the RNG state after it recorded"
            set_rng_state(unit.rng_after, self.device)
            return copy_tree(unit.output)
        return _CALLS.previous(module, *args, **kwargs)

    def _shown(self, i: int, fed: Any) -> bool:
        """Whether unit ``i``, fed ``fed`` now, would return what its recorded call returned, with no
        effect but the RNG state and its own module state."""
        rec = self.rec
        unit = rec.units[i]
        if unit.feed is not None or unit.calls != 1 or not unit.returned or not unit.contained:
            return False
        rng: tuple[torch.Tensor, ...] | None
        if unit.pred is None:
            expected, rng = rec.input, rec.rng_start
        else:  # the recorded call was fed exactly what its predecessor returned (its feed check)
            expected, rng = rec.units[unit.pred].output, rec.units[unit.pred].rng_after
        return (
            _own(self.together, self.snapshot, unit.name)
            and differs(fed, expected) is None
            and _rng_equal(rng, rng_state(self.device))
            and all(m.training == self.training for m in self.snapshot.subtree(unit.name))
            and self.snapshot.attribute_changed(unit.name) is None
        )


_PLAIN = (torch.Tensor, int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device)


def _plain(value: Any) -> bool:
    """A tree of tensors and plain values: a tap copies every tensor of it as it is made, so no later
    in-place op can change it (a tensor inside any other object would not be copied)."""
    return all(isinstance(leaf, _PLAIN) for leaf in pytree.tree_leaves(value))


def found_mode(model: nn.Module, snapshot: Snapshot) -> str | None:
    """The mode the model was found in: the one whose ``train()``/``eval()`` gives every module the flag
    it had (then the recording of that mode is of the model as found); None for a mixed model."""
    snapshot.restore()  # as found: a recording leaves it in the mode it recorded last
    training = model.training
    if snapshot.train_overridden:  # its train() decides what the flags become: ask it
        set_mode(model, training)
        same = all(m.training == flag for m, flag in snapshot.flags)
        snapshot.restore()
    else:
        same = all(flag == training for _, flag in snapshot.flags)
    if not same:
        return None
    return "train" if training else "eval"


def fresh_input(
    model: nn.Module,
    x: Any,
    modes: Sequence[str],
    seed: int,
    snapshot: Snapshot,
    containers: Sequence[str],
    recordings: dict[str, Recording],
    glued: Iterable[KeepGlue],
    *,
    effects: bool = False,
) -> Fresh | None:
    """The first fresh input (``_fresh_inputs``) on which the full model makes a value at every cut it made
    one at on ``x``, with its recordings (with ``effects``, as ``record`` takes it); None when there is
    none."""
    glued = list(glued)
    for candidate in _fresh_inputs(x, seed):
        try:
            fresh = record(model, candidate, modes, seed, snapshot, containers, effects=effects)
        except FeatxError:
            continue
        if all(
            isinstance(glue_reference(recordings[m], g), Missing)
            or not isinstance(glue_reference(fresh[m], g), Missing)
            for m in modes
            for g in glued
        ):
            shape = tuple(candidate.shape) if isinstance(candidate, torch.Tensor) else None
            return Fresh(candidate, shape, fresh)
    return None


def _fresh_inputs(x: Any, seed: int) -> Iterator[Any]:
    """Inputs unlike ``x``, most unlike first: other values (drawn from ``seed`` + 1, with ``x``'s mean and
    spread; integers within ``x``'s range), one more in the batch and 32 more in height and width (a 4-D
    or larger tensor), then one more in the batch, then ``x``'s shape. A value baked into a module at build
    time (a shape, a statistic of the input) then shows on the first one the full model takes."""
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] > 0:
        shape = list(x.shape)
        if x.dim() >= 4:
            yield _other_values(x, seed, [shape[0] + 1, *shape[1:-2], shape[-2] + 32, shape[-1] + 32])
        yield _other_values(x, seed, [shape[0] + 1, *shape[1:]])
    yield pytree.tree_map(
        lambda t: _other_values(t, seed, list(t.shape)) if isinstance(t, torch.Tensor) else t, x
    )


def _other_values(t: torch.Tensor, seed: int, shape: list[int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    if t.is_floating_point() and t.numel():
        values = t.detach().to(torch.float64)
        spread = float(values.std()) if t.numel() > 1 else 1.0
        spread = spread if spread > 0 and spread == spread and spread != float("inf") else 1.0
        mean = float(values.mean())
        mean = mean if abs(mean) != float("inf") and mean == mean else 0.0
        drawn = torch.randn(shape, generator=generator, dtype=torch.float64) * spread + mean
        drawn = drawn.to(device=t.device, dtype=t.dtype)
        if drawn.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
            drawn = drawn.contiguous(memory_format=torch.channels_last)  # in the input's memory format
        return drawn
    if not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool and t.numel():
        low, high = int(t.min()), int(t.max())
        return torch.randint(low, high + 1, shape, generator=generator).to(device=t.device, dtype=t.dtype)
    return t.detach().clone()


def _run_glue(
    module: KeepGlue,
    x: Any,
    mode: str,
    seed: int,
    snapshot: Snapshot,
    rec: Recording,
    tolerance: Tolerance,
    returned: list[tuple[nn.Module, bool]] | None = None,
) -> ModeResult:
    """Run the keep_glue module on a copy of ``x`` under ``seed`` and compare with the full model's value
    at the cut: what its cut module last returned, or the model's output at the last child. ``returned``:
    the flags to run it with (as it came back), else ``train(mode == "train")``."""
    snapshot.restore()
    if returned is not None:
        for m, training in returned:
            m.training = training
    else:
        module.train(mode == "train")
    seed_rng(seed, device_of(x))
    try:
        with AsRecorded():
            out = module(copy_tree(x))
    except Exception as err:
        return ModeResult(None, False, error=f"{type(err).__name__}: {one_line(err)}")
    return compare(out, glue_reference(rec, module), tolerance)


def glue_reference(rec: Recording, module: KeepGlue) -> Any:
    target = module.cut_at.get(rec.mode)
    if target is None:  # the cut is the model's output
        if rec.error is not None:
            return Missing(f"the full model raised {rec.error} in {rec.mode} mode, so it has no output")
        return rec.output
    if target == module.upto or rec.has_unit(target):  # a child, or one of a tracked container's
        return reference(rec, target)
    if target in rec.root_calls:
        return rec.root_calls[target]
    return Missing(f"the full forward never returned from `{target}`, so it has no value at this cut")
