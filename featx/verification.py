"""Compare a cut with the full model, classify glue and residuals, and build the Report / Sweep.

``verify`` checks one cut by running the literal ``nn.Sequential`` against the full model's recorded value
at the cut. ``sweep`` checks every cut from the one recorded forward per mode: when each child up to a cut
was called once, in order, with exactly what its predecessor returned and the RNG untouched in between
(the recorder's *feed* check), the Sequential computes exactly what the full forward computed, so the cut
is faithful without running anything. From the first child whose feed check fails, the Sequential is run
once, resumed from the recorded value before it, and compared after every child.

With ``keep_glue`` both check the module ``truncate(..., keep_glue=True)`` returns, built before the compared
forward and run as it comes back, on the example input and on a fresh one it was not built with: a graph
traced once can hold what was true of one input only.

Both assume children are deterministic given their input and the RNG state (true on CPU; on GPU, pass a
model whose kernels are deterministic), and that no child reads state the root or a sibling sets during
the forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from featx.compare import Missing, Tolerance, compare, copy_tree, describe, holds_tensor
from featx.cut import CutPath, child_names, resolve_cut, resolve_path
from featx.errors import FeatxError, listing, one_line
from featx.glue import KeepGlue, trace_root
from featx.guard import Snapshot, device_of, flags_of, preserved, seed_rng, set_mode, set_rng_state
from featx.models import default_input_shape, load_model
from featx.record import Recording, record
from featx.report import Anatomy, Child, Container, Cut, Glue, ModeResult, Report, Residual, Sweep
from featx.truncation import truncated
from featx.vocab import LOST, MODES


def verify(
    model: nn.Module | str,
    upto: str | int,
    example_input: Any = None,
    *,
    modes: Sequence[str] = MODES,
    atol: float = 0.0,
    rtol: float = 0.0,
    seed: int = 0,
    keep_glue: bool = False,
    label: str | None = None,
) -> Report:
    """Check that ``truncate(model, upto)`` computes what the full model computes at the cut.

    Per mode, the full model runs once with hooks and op recording, then the truncated Sequential runs
    on its own copy of the input under the same RNG seed; its output is compared with the full model's
    output of the last kept child. ``example_input`` defaults to batch 2 at the model's own input size.
    The model is left as found: hooks removed, train/eval flags, RNG, parameters and buffers unchanged.

    With ``keep_glue=True`` the truncated model is the very module ``truncate(model, upto, keep_glue=True)``
    returns (the root's forward traced up to the cut), built before any compared forward, compared with the
    full model's value at the cut — for the last child, the model's output — and the glue it carries is
    reported as ``kept``. It is checked as it comes back: in the mode the model is in it runs as it is, with
    no ``train()``/``eval()`` call; the other mode it is switched to, as a user would (a model whose flags
    are mixed, not what its own ``train()``/``eval()`` gives, has both modes switched). Where it equals the
    full model on ``example_input`` it runs again on a fresh input it was not built with: other values, and
    one more in the batch and 32 more in height and width where the full model takes that (else one more in
    the batch, else the same shape), with the full model recorded on it the same way. A module right only on
    the input it was built with (a size or a statistic of that input baked into its graph) is not
    faithful, its reason naming the fresh input; ``ModeResult.fresh`` holds that comparison (in the JSON,
    ``modes.<mode>.fresh`` with its ``input_shape``).

    ``label`` is what the report calls the model (``Report.anatomy.model``, the JSON's ``model``): by
    default the spec when ``model`` is one, else the model's class (``torchvision.models.resnet.ResNet``).

    Example:
        >>> report = featx.verify(torchvision.models.resnet50(), "layer2")
        >>> report.faithful, [g.op for g in report.anatomy.glue]
        (True, ['flatten'])

    Raises:
        FeatxError: bad ``upto``/``modes``, the full forward raised before reaching the cut, or (with
            ``keep_glue``) the root cannot be traced or cut there.
    """
    return verify_cuts(
        model,
        [upto],
        example_input,
        modes=modes,
        atol=atol,
        rtol=rtol,
        seed=seed,
        keep_glue=keep_glue,
        label=label,
    )[0]


def verify_cuts(
    model: nn.Module | str,
    cuts: Sequence[str | int | CutPath],
    example_input: Any = None,
    *,
    modes: Sequence[str] = MODES,
    atol: float = 0.0,
    rtol: float = 0.0,
    seed: int = 0,
    keep_glue: bool = False,
    model_output: bool = True,
    label: str | None = None,
) -> tuple[Report, ...]:
    """``verify`` for several cuts of one model at the cost of one: what ``featx check`` runs for a
    config's cut and taps.

    Per mode, one recorded full forward, then one run of the longest cut's truncated model — the modules
    called in order, exactly as ``nn.Sequential.forward`` (and a nested Sequential inside it) calls them —
    compared with the full model after the last module of each cut. Cuts that are not a prefix of one
    another (``stages.1`` and ``stages``) get one run each. Reports come back in the order of ``cuts``.
    With ``keep_glue=True`` each cut is its own ``truncate(model, cut, keep_glue=True)`` module, run once per
    mode and compared with the full model's value at the cut (at a nested cut, what the named module
    returns, recorded by tracking the containers on the path); at the last child that value is the model's
    output, or with ``model_output=False`` what the child returns (a keep_glue backbone's tap there). Then
    each module runs again on one fresh input for all cuts, as ``verify`` describes.
    """
    model, label = _model(model, label)
    modes = _modes(modes)
    tolerance = Tolerance(atol, rtol)
    if not cuts:
        raise FeatxError("no cuts to verify; pass at least one child name or count")
    paths = [upto if isinstance(upto, CutPath) else resolve_path(model, upto) for upto in cuts]
    containers = _containers(paths)
    x = example(model, example_input, seed, label=label)
    names = child_names(model)
    runs: list[tuple[CutPath, list[str]]] = []  # the longest path of each chain of cuts, and its units
    for path in sorted(paths, key=lambda p: -len(p.units())):
        units = path.units()
        if not any(chain[: len(units)] == units for _, chain in runs):
            runs.append((path, units))
    with preserved(model) as snapshot:
        if keep_glue:  # fx runs the root's forward (and each traced container's) to trace it
            # the modules truncate(model, cut, keep_glue=True) returns, built before any compared forward
            traced = trace_root(model)
            glued = {p.upto: traced.cut(p, model_output=model_output) for p in paths}
            returned = {upto: flags_of(g) for upto, g in glued.items()}
            containers = _with_tracks(containers, glued.values())
        recordings = record(model, x, modes, seed, snapshot, containers)
        _require_any_child(recordings)
        for path in paths:
            if keep_glue:
                _require_glue_reference(recordings, glued[path.upto])
            else:
                _require_reference(recordings, path)
                _require_tensors(recordings, path)
        results: dict[str, dict[str, ModeResult]] = {m: {} for m in modes}
        if keep_glue:
            found = _found_mode(model, snapshot)
            fresh = _fresh(model, x, modes, seed, snapshot, containers, recordings, glued.values())
            for m in sorted(modes, key=lambda m: m != found):  # the mode it came back in first, as it is
                for upto, g in glued.items():
                    flags = returned[upto] if m == found else None
                    results[m][upto] = _prove_glue(
                        g, x, fresh, m, seed, snapshot, recordings[m], tolerance, flags
                    )
        else:
            for longest, units in runs:
                sequential = truncated(model, longest)
                ends = {p.upto for p in paths if units[: len(p.units())] == p.units()}
                for m in modes:
                    results[m].update(
                        _run(sequential, units, x, m, seed, snapshot, recordings[m], ends, tolerance)
                    )
    anatomy = _anatomy(model, label, x, recordings, snapshot.by_name)
    return tuple(
        Report(
            anatomy,
            path.upto,
            path.kept,
            {m: results[m][path.upto] for m in modes},
            _reasons(anatomy, path, {m: results[m][path.upto] for m in modes}, keep_glue, len(names)),
            keep_glue=keep_glue,
            path=path,
        )
        for path in paths
    )


def sweep(
    model: nn.Module | str,
    example_input: Any = None,
    *,
    modes: Sequence[str] = MODES,
    atol: float = 0.0,
    rtol: float = 0.0,
    seed: int = 0,
    literal: bool = False,
    keep_glue: bool = False,
    depth: int = 1,
    label: str | None = None,
) -> Sweep:
    """Check every cut point at once: 1..number of children, and with ``depth`` > 1 the cuts inside
    containers down to that depth (``depth=2``: after each child of each child that has children, such
    as ``stages.0``..``stages.3``; ``depth=3`` one level further).

    One instrumented forward per mode decides every cut whose modules were fed exactly what their
    predecessors in the truncated model returned; the rest are run as the truncated model would run
    them, resumed from the first module whose feed differs (see the module docstring). With
    ``literal=True`` every cut's truncated model is run from scratch instead — the same verdicts.

    Any module with children is a container here, whatever its forward does; the verdict says whether
    cutting inside it is faithful (a ResNet bottleneck's ``conv2`` is a cut point at depth 3, and not a
    faithful one).

    With ``keep_glue=True`` every cut, the nested ones included, is ``truncate(model, cut,
    keep_glue=True)``, run once per mode (the root and each container are traced once for all of them) and
    compared with the full model's value at the cut, as it comes back and on a fresh input as ``verify``
    describes; a cut keep_glue refuses (not a chain there, a
    container that does not trace) is not faithful, with the refusal as its reason. A root that cannot be
    traced raises ``FeatxError``.
    """
    model, label = _model(model, label)
    modes = _modes(modes)
    tolerance = Tolerance(atol, rtol)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise FeatxError(f"depth {depth!r} is not a depth; accepted: an int >= 1 (1: the root's children)")
    x = example(model, example_input, seed, label=label)
    children = [child for _, child in model.named_children()]
    if not children:
        resolve_cut(model, 1)  # raises the "no children" error
    names = child_names(model)
    containers = _sweep_containers(model, depth)
    # every cut point, in forward order, resolved once
    paths = {name: resolve_path(model, name) for name in _sweep_order(model, names, containers)}
    # The cut after each child of each container; its chain runs through the container's last child.
    chains = {c: paths[f"{c}.{child_names(_module(model, c))[-1]}"] for c in containers}
    per_mode: dict[str, dict[str, ModeResult]] = {m: {} for m in modes}
    glued: dict[str, KeepGlue | str] = {}
    returned: dict[str, list[tuple[nn.Module, bool]]] = {}
    with preserved(model) as snapshot:
        if keep_glue:  # fx runs the root's forward (and each traced container's) to trace it
            traced = trace_root(model)
            for name, path in paths.items():
                try:
                    cut = glued[name] = traced.cut(path)
                    returned[name] = flags_of(cut)
                except FeatxError as err:
                    glued[name] = str(err).removeprefix("keep_glue: ")
        # the keep_glue modules' references may need containers tracked below the asked depth
        made = [g for g in glued.values() if not isinstance(g, str)]
        tracked = _with_tracks(containers, made)
        recordings = record(model, x, modes, seed, snapshot, tracked)
        _require_any_child(recordings)
        found, fresh = None, None
        if keep_glue:
            found = _found_mode(model, snapshot)
            fresh = _fresh(model, x, modes, seed, snapshot, tracked, recordings, made)
        for m, rec in sorted(recordings.items(), key=lambda item: item[0] != found):  # as in verify_cuts
            if keep_glue:
                per_mode[m] = {
                    name: ModeResult(None, False, mismatch=f"keep_glue cannot cut here: {g}")
                    if isinstance(g, str)
                    else _prove_glue(
                        g,
                        x,
                        fresh,
                        m,
                        seed,
                        snapshot,
                        rec,
                        tolerance,
                        returned[name] if m == found else None,
                    )
                    for name, g in glued.items()
                }
                continue
            if literal:
                for name, path in paths.items():
                    sequential = truncated(model, path)
                    per_mode[m] |= _run(
                        sequential, path.units(), x, m, seed, snapshot, rec, {name}, tolerance
                    )
                continue
            per_mode[m] |= dict(zip(names, _derive(rec, names, model, snapshot, tolerance), strict=True))
            for c, chain in chains.items():
                inside = len(rec.containers[c])
                units = chain.units()
                derived = _derive(rec, units, model, snapshot, tolerance)
                per_mode[m] |= dict(zip(units[-inside:], derived[-inside:], strict=True))
    anatomy = _anatomy(model, label, x, recordings, snapshot.by_name)
    cuts = []
    n = len(names)
    for name, path in paths.items():
        results = {m: per_mode[m][name] for m in modes}
        glue_cut = glued.get(name)
        refused = glue_cut if isinstance(glue_cut, str) else None
        reasons = _reasons(anatomy, path, results, keep_glue and refused is None, n)
        if refused is not None:  # one sentence for the refusal, not one per mode
            reasons = (f"keep_glue cannot cut here: {refused}", *(r for r in reasons if "keep_glue" not in r))
        cuts.append(
            Cut.of(
                anatomy,
                path.upto,
                path.kept,
                results,
                reasons,
                keep_glue=keep_glue,
                refused=refused,
                path=path,
            )
        )
    return Sweep(anatomy, tuple(cuts))


def _module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules(remove_duplicate=False))[name]


def _sweep_containers(model: nn.Module, depth: int) -> list[str]:
    """Modules with children down to ``depth`` - 1 levels below the root, parents first."""
    found: list[str] = []
    level = [(name, child) for name, child in model.named_children()]
    for _ in range(depth - 1):
        level = [(name, child) for name, child in level if any(True for _ in child.children())]
        found += [name for name, _ in level]
        level = [(f"{name}.{n}", c) for name, child in level for n, c in child.named_children()]
    return found


def _sweep_order(model: nn.Module, names: list[str], containers: list[str]) -> list[str]:
    """Cut points in forward order: a container's inner cuts right before the cut after it."""
    tracked = set(containers)

    def walk(prefix: str, module: nn.Module) -> list[str]:
        out: list[str] = []
        for name, child in module.named_children():
            dotted = f"{prefix}.{name}" if prefix else name
            if dotted in tracked:
                out += walk(dotted, child)
            out.append(dotted)
        return out

    return walk("", model)


def _containers(paths: Iterable[CutPath]) -> list[str]:
    """The containers the nested cuts pass through, parents first."""
    found: dict[str, int] = {}
    for path in paths:
        for depth, container in enumerate(path.containers()[1:], start=1):
            found.setdefault(container, depth)
    return sorted(found, key=lambda c: c.count("."))  # parents first


def _with_tracks(containers: list[str], glued: Iterable[KeepGlue]) -> list[str]:
    """``containers`` and those the keep_glue modules need tracked for their reference, parents first."""
    found = dict.fromkeys(containers)
    for module in glued:
        found.update(dict.fromkeys(getattr(module, "tracks", ())))
    return sorted(found, key=lambda c: c.count("."))


def _glue_on(anatomy: Anatomy, path: CutPath) -> tuple[Glue, ...]:
    """The glue of the root and of the containers a cut passes through."""
    containers = set(path.containers())
    return tuple(g for g in anatomy.glue if g.container in containers)


def inspect(
    model: nn.Module | str,
    example_input: Any = None,
    *,
    modes: Sequence[str] = MODES,
    seed: int = 0,
    label: str | None = None,
) -> Anatomy:
    """The children, glue and residuals of ``model`` as its full forward shows them, with no cut;
    ``label`` as in ``verify``."""
    model, label = _model(model, label)
    modes = _modes(modes)
    x = example(model, example_input, seed, label=label)
    with preserved(model) as snapshot:
        recordings = record(model, x, modes, seed, snapshot)
    _require_any_child(recordings)
    return _anatomy(model, label, x, recordings, snapshot.by_name)


def example(
    model: nn.Module,
    example_input: Any,
    seed: int,
    shape: Sequence[int] | None = None,
    *,
    label: str | None = None,
) -> Any:
    """``example_input``, or a seeded normal batch of ``shape`` (default: batch 2 at the model's own input
    size) on the model's device, in its dtype. ``label`` names the model when it declares no input size."""
    if example_input is not None:
        return example_input
    shape = tuple(shape) if shape is not None else default_input_shape(model, label=label)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    return x


def example_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The shape ``example`` makes by default (batch included), or None when the model declares none: what
    a given input shape's number of dimensions is checked against."""
    try:
        return default_input_shape(model)
    except FeatxError:
        return None


# -- running the Sequential ----------------------------------------------------------------------------
def _run(
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
    return _run_units(units, modules, 0, x, seed, mode, snapshot, rec, set(cuts), tolerance)


def _run_units(
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
            results[units[i]] = compare(out, _reference(rec, units[i]), tolerance)
    return results


# -- proving a keep_glue module ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Fresh:
    """An input the keep_glue modules were not built with, and the full model's recordings on it."""

    input: Any
    shape: tuple[int, ...] | None  # None: not one tensor
    recordings: dict[str, Recording]


def _prove_glue(
    module: KeepGlue,
    x: Any,
    fresh: _Fresh | None,
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


def _found_mode(model: nn.Module, snapshot: Snapshot) -> str | None:
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


def _fresh(
    model: nn.Module,
    x: Any,
    modes: Sequence[str],
    seed: int,
    snapshot: Snapshot,
    containers: Sequence[str],
    recordings: dict[str, Recording],
    glued: Iterable[KeepGlue],
) -> _Fresh | None:
    """The first fresh input (``_fresh_inputs``) on which the full model makes a value at every cut it made
    one at on ``x``, with its recordings; None when there is none."""
    glued = list(glued)
    for candidate in _fresh_inputs(x, seed):
        try:
            fresh = record(model, candidate, modes, seed, snapshot, containers)
        except FeatxError:
            continue
        if all(
            isinstance(_glue_reference(recordings[m], g), Missing)
            or not isinstance(_glue_reference(fresh[m], g), Missing)
            for m in modes
            for g in glued
        ):
            shape = tuple(candidate.shape) if isinstance(candidate, torch.Tensor) else None
            return _Fresh(candidate, shape, fresh)
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
        return drawn.to(device=t.device, dtype=t.dtype)
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
        with _AsRecorded():
            out = module(copy_tree(x))
    except Exception as err:
        return ModeResult(None, False, error=f"{type(err).__name__}: {one_line(err)}")
    return compare(out, _glue_reference(rec, module), tolerance)


class _AsRecorded(TorchFunctionMode):
    """Runs every torch call as is, under a torch function mode, as the recorded forward ran.

    Some modules pick their kernels by whether a mode is active: ``nn.MultiheadAttention``'s fused fast path
    is off under one, and differs from the slow path by ~1e-6. The recorded reference ran under the
    recorder's mode, so the keep_glue module runs under one too: same kernels, exact comparison. (Called
    without a mode, the module and the full model both take the fast path.)
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _glue_reference(rec: Recording, module: KeepGlue) -> Any:
    target = module.cut_at.get(rec.mode)
    if target is None:  # the cut is the model's output
        if rec.error is not None:
            return Missing(f"the full model raised {rec.error} in {rec.mode} mode, so it has no output")
        return rec.output
    if target == module.upto or rec.has_unit(target):  # a child, or one of a tracked container's
        return _reference(rec, target)
    if target in rec.root_calls:
        return rec.root_calls[target]
    return Missing(f"the full forward never returned from `{target}`, so it has no value at this cut")


def _derive(
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
        missing = _no_reference(rec, units[j - 1])
        return results + [ModeResult(None, False, mismatch=missing, method="derived")] * (n - j)
    # Resume the Sequential where its input first departs from the full model's.
    x = traces[j - 1].output if j > 0 else rec.input
    state = traces[j - 1].rng_after if j > 0 else rec.rng_start
    assert state is not None, "a child that returned has the RNG state after it recorded"
    resumed = _run_units(units, children, j, x, state, rec.mode, snapshot, rec, None, tolerance)
    return results + [resumed[name] for name in units[j:]]


def _reference(rec: Recording, unit: str) -> Any:
    trace = rec.unit(unit)
    return trace.output if trace.returned else Missing(_no_reference(rec, unit))


def _no_reference(rec: Recording, unit: str) -> str:
    trace = rec.unit(unit)
    root = rec.unit_index(unit.split(".")[0])
    if rec.error is not None and (rec.error_child is None or rec.error_child <= root):
        where = f"in `{rec.children[rec.error_child].name}`" if rec.error_child is not None else "in its glue"
        return f"the full model raised {where} before returning from `{trace.name}`, so it has no value at this cut"
    return f"the full forward never calls `{trace.name}`, so it has no value at this cut"


# -- building the Anatomy ------------------------------------------------------------------------------
def _anatomy(
    model: nn.Module, label: str, x: Any, recordings: dict[str, Recording], modules: dict[str, nn.Module]
) -> Anatomy:
    """``modules``: every module of ``model`` by every name it has (``Snapshot.by_name``)."""
    modes = tuple(recordings)
    first = recordings[modes[0]]
    names = child_names(model)
    residuals = _residuals(recordings, names)

    def child(i: int) -> Child:
        traces = {m: rec.units[i] for m, rec in recordings.items()}
        out = next((t.output for t in traces.values() if t.returned), None)
        name = first.units[i].name
        inside = [r for r in residuals if r.module == name or r.module.startswith(name + ".")]
        return Child(
            index=first.units[i].position,
            name=name,
            type=first.units[i].type,
            calls={m: t.calls for m, t in traces.items()},
            output_shape=tuple(out.shape) if isinstance(out, torch.Tensor) else None,
            residuals=sum(r.child_index == i for r in residuals) if i < len(names) else len(inside),
            projections=sum(r.child_index == i and r.shortcut == "projection" for r in residuals)
            if i < len(names)
            else sum(r.shortcut == "projection" for r in inside),
            feed={m: _feed_note(recordings[m], i) for m in modes},
        )

    containers = tuple(
        Container(c, type(modules[c]).__name__, tuple(child(i) for i in units))
        for c, units in first.containers.items()
    )
    cls = type(model)
    return Anatomy(
        model=label,
        model_class=f"{cls.__module__}.{cls.__qualname__}",
        input_shape=tuple(x.shape) if isinstance(x, torch.Tensor) else None,
        modes=modes,
        children=tuple(child(i) for i in range(len(names))),
        glue=_glue(recordings),
        residuals=residuals,
        full_errors={m: rec.error for m, rec in recordings.items()},
        containers=containers,
    )


def _feed_note(rec: Recording, i: int) -> str | None:
    trace = rec.units[i]
    if trace.feed is None or trace.calls == 0 or trace.container:
        return trace.feed
    first_calls = list(dict.fromkeys(rec.order))
    if i > 0 and rec.children[i - 1].calls and first_calls.index(i) < first_calls.index(i - 1):
        return f"called before `{rec.children[i - 1].name}`, out of registration order"
    return trace.feed


def _glue(recordings: dict[str, Recording]) -> tuple[Glue, ...]:
    first = next(iter(recordings.values()))
    names = {"": [c.name for c in first.children]}
    names |= {c: [first.units[i].name for i in units] for c, units in first.containers.items()}
    found: dict[tuple, dict] = {}
    for mode, rec in recordings.items():
        counts: dict[tuple, int] = {}
        for op in rec.ops:
            key = (op.container, op.name, op.source, op.after, op.before, op.inside)
            counts[key] = counts.get(key, 0) + 1
            entry = found.setdefault(key, {"modes": [], "count": 0})
            if mode not in entry["modes"]:
                entry["modes"].append(mode)
        for key, count in counts.items():
            found[key]["count"] = max(found[key]["count"], count)
    glue = [
        Glue(
            op=name,
            source=source,
            after=names[container][after] if after is not None else None,
            before=names[container][before] if before is not None else None,
            after_index=after,
            before_index=before,
            modes=tuple(entry["modes"]),
            count=entry["count"],
            inside=inside,
            container=container,
        )
        for (container, name, source, after, before, inside), entry in found.items()
    ]
    # In forward order: the root's first, then each container's; by the boundary they sit at, then by
    # first appearance.
    order = {key: i for i, key in enumerate(found)}
    rank = {c: i for i, c in enumerate(names)}
    glue.sort(
        key=lambda g: (
            rank[g.container],
            -1 if g.after_index is None else g.after_index,
            order[(g.container, g.op, g.source, g.after_index, g.before_index, g.inside)],
        )
    )
    return tuple(glue)


def _residuals(recordings: dict[str, Recording], names: list[str]) -> tuple[Residual, ...]:
    # The same merge in each mode: same module, line and occurrence. Its shortcut is the first mode's: a
    # mode can change the lineage (eval's F.dropout hands back its input), not what the code merges.
    found: dict[tuple, dict] = {}
    for mode, rec in recordings.items():
        seen: dict[tuple, int] = {}
        for merge in rec.merges:
            base = (merge.module, merge.source, merge.child)
            seen[base] = seen.get(base, 0) + 1
            entry = found.setdefault((*base, seen[base]), {"modes": [], "shortcut": merge.shortcut})
            entry["modes"].append(mode)
    return tuple(
        Residual(
            module=module,
            child=names[child] if child is not None else None,
            child_index=child,
            shortcut=entry["shortcut"],
            source=source,
            modes=tuple(entry["modes"]),
        )
        for (module, source, child, _), entry in found.items()
    )


def _reasons(
    anatomy: Anatomy, path: CutPath, results: dict[str, ModeResult], keep_glue: bool = False, n: int = 0
) -> tuple[str, ...]:
    """The causes featx saw (lost glue, modules not fed as the truncated model feeds them), then what each
    failing mode's comparison found (``ModeResult.reason``)."""
    failing = [m for m, r in results.items() if not r.ok]
    if not failing:
        return ()
    reasons = []
    lost = [
        g
        for g in _glue_on(anatomy, path)
        if g.status_at(path, keep_glue, path.kept == n) == LOST and set(g.modes) & set(failing)
    ]
    for g in lost:
        where = f"before `{g.before}`" if g.before else "at the model's output"
        if g.container:
            where = f"in `{g.container}`'s forward " + (
                f"before `{g.before}`" if g.before else "after its children"
            )
        reasons.append(f"glue {g.label()} runs {where} in the full model and is lost")
    # keep_glue: the model's own forward feeds the children
    units = path.units()
    for i, child in enumerate(anatomy.unit(name) for name in units) if not keep_glue else ():
        notes = {m: note for m in failing if (note := child.feed.get(m))}
        for note in dict.fromkeys(notes.values()):
            in_modes = [m for m, n in notes.items() if n == note]
            glue_behind = any(
                g.container == child.name.rpartition(".")[0]
                and g.before_index == child.index
                and set(g.modes) & set(in_modes)
                for g in lost
            )
            if note.startswith("fed ") and glue_behind:
                continue  # the lost glue right before the child is the cause, already said
            reasons.append(
                f"child `{child.name}` is {note} in the full forward ({', '.join(in_modes)})"
                + _instead(note, units[i - 1] if i else None)
            )
    reasons += [results[m].reason(m) for m in failing]
    return tuple(reasons)


def _instead(note: str, before: str | None) -> str:
    """What the truncated model does where the full forward did what ``note`` says (a feed note of
    record.py), so that the reason says why the difference matters: the truncated model calls each of its
    modules once, in order, on what the one before it returned (the first on the model's input), with
    nothing between them."""
    fed = f"what `{before}` returns" if before else "the model's input"
    if note == "never called":
        return f"; the truncated model calls it on {fed}"
    if note.startswith("called ") and note.endswith(" times"):
        return f"; the truncated model calls it once, on {fed}"
    if note.startswith("fed something other than"):
        return f"; the truncated model feeds it {fed} as it is"
    if note.startswith("called with "):
        return f"; the truncated model calls it on {fed} alone"
    if note.startswith(("not called right after", "called although", "called before")):
        where = f"right after `{before}`" if before else "first"
        return f"; the truncated model calls it {where}, in registration order"
    if "random number generator" in note:
        return "; the truncated model draws nothing in between, so random ops (dropout) draw other numbers"
    if note.startswith("called after"):  # the model's own code changed an attribute or wrote a tensor
        return "; the truncated model makes no such change"
    return ""  # says the consequence itself (the train/eval flags, the grad or autocast state)


# -- input checks --------------------------------------------------------------------------------------
def _model(model: nn.Module | str, label: str | None) -> tuple[nn.Module, str]:
    """The model, a spec loaded; and what reports call it: ``label``, else the spec, else its class."""
    if isinstance(model, str):
        label = label if label is not None else model
        model = load_model(model)
    if not isinstance(model, nn.Module):
        raise FeatxError(f"model is a {type(model).__name__}; expected a torch.nn.Module or a spec string")
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
        reference = _glue_reference(rec, module)
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


def _require_any_child(recordings: dict[str, Recording]) -> None:
    """A forward that raises before any child returned, in every mode, is a bad input, not a verdict."""
    failed = {
        m: r for m, r in recordings.items() if r.error is not None and not any(c.returned for c in r.children)
    }
    if failed and len(failed) == len(recordings):
        mode, rec = next(iter(failed.items()))
        where = f" in `{rec.children[rec.error_child].name}`" if rec.error_child is not None else ""
        raise FeatxError(
            f"the full model's forward raised{where} in {mode} mode before any child returned: "
            f"{rec.error}; check the input shape"
        )
