"""The public verbs that check a cut: ``verify``, ``verify_cuts`` and ``sweep``. Each records the full
forward (``featx.record``), judges the truncated model's value against it (``featx.replay`` runs the
Sequential, ``featx.glue_proof`` a keep_glue module, both by ``featx.compare``), reads the anatomy from the
recording (``featx.inspection``, which also holds ``inspect`` and ``example``, the input they run on), and
builds the Report / Sweep with the reasons for each verdict (``featx.reasons``).

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

What they take is checked by ``featx.input_checks``; the cut points a sweep checks and the containers a
recording tracks are ``featx.cut_points``'s; a non-default numeric setting is ``featx.numeric_setting``'s.
``inspect``, ``example`` and ``example_shape`` are importable from here too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from featx.compare import Tolerance
from featx.cut import CutPath, child_names, resolve_cut, resolve_path
from featx.cut_points import _containers, _sweep_containers, _sweep_order, _with_tracks
from featx.errors import FeatxError
from featx.glue import KeepGlue, leaf_functions_for, trace_root
from featx.glue_proof import (
    AllCuts,
    Fresh,
    all_cuts,
    found_mode,
    fresh_input,
    glue_reference,
    prove_cuts,
    prove_glue,
)
from featx.glue_state import watching
from featx.guard import Snapshot, device_of, flags_of, preserved
from featx.input_checks import (
    _model,
    _modes,
    _require_any_child,
    _require_glue_reference,
    _require_reference,
    _require_tensors,
)
from featx.inspection import _anatomy, example
from featx.inspection import example_shape as example_shape
from featx.inspection import inspect as inspect
from featx.model_sources import ModelSource
from featx.numeric_setting import _in_setting, _judged, _numerics
from featx.numerics import Numerics
from featx.reasons import _reasons
from featx.record import record
from featx.recording import Recording
from featx.replay import derive, reference, run_truncated
from featx.report import Cut, ModeResult, Report, Sweep
from featx.sensitivity import checked, depends
from featx.truncation import truncated
from featx.vocab import MODES


def verify(
    model: nn.Module | str | ModelSource,
    upto: str | int | CutPath,
    example_input: Any = None,
    *,
    modes: Sequence[str] = MODES,
    atol: float = 0.0,
    rtol: float = 0.0,
    seed: int = 0,
    keep_glue: bool = False,
    leaf_functions: Sequence[Callable[..., Any]] = (),
    label: str | None = None,
    numerics: Numerics | None = None,
    dependence: bool = True,
    weights: str | os.PathLike[str] | None = None,
    weights_prefix: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
) -> Report:
    """Check that ``truncate(model, upto)`` computes what the full model computes at the cut.

    Per mode, the full model runs once with hooks and op recording, then the truncated Sequential runs
    on its own copy of the input under the same RNG seed; its output is compared with the full model's
    output of the last kept child (``upto`` as ``truncate`` takes it, or a ``CutPath`` resolved already).
    ``example_input`` defaults to batch 2 at the model's own input size. The model is left as found: hooks removed, train/eval flags, RNG, parameters and buffers unchanged.

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
    ``modes.<mode>.fresh`` with its ``input_shape``). ``leaf_functions`` (with ``keep_glue=True`` only) are
    the functions the trace keeps whole, as ``truncate(..., keep_glue=True, leaf_functions=...)`` takes them
    (``int``, a helper of the model's own code that fx cannot trace through).

    ``model`` is a built ``nn.Module``, or a model as ``featx verify SPEC`` takes it: a spec
    (``torchvision/resnet50``) or a ``featx.models.ModelSource``, with ``weights`` (a weights file or a
    pretrained weights name, as ``--weights``), ``weights_prefix`` (``--weights-prefix``) and
    ``model_kwargs`` (``--model-kwarg``) over its own (``featx.models.model_source``); without weights its
    random init is seeded by ``seed``, as on the command line. With a built module those keywords are
    refused: its weights are in it.

    ``label`` is what the report calls the model (``Report.anatomy.model``, the JSON's ``model``): by
    default the spec when ``model`` is one, else the model's class (``torchvision.models.resnet.ResNet``).

    ``numerics`` (``featx.numerics.Numerics``; default float32 eager, the exact comparison above) runs the
    full model and the cut in another numeric setting: a copy of the model in its dtype and memory format
    (``model`` itself is never converted), the input converted, each forward under autocast when asked,
    the cut compiled with ``torch.compile`` when asked (the full model runs eager: it is recorded with
    hooks). They are compared within the dtype's ``torch.testing.assert_close`` tolerance (``atol``/``rtol``
    where given) and both against the model run in float64: each ``ModeResult.numerics`` holds the
    tolerance, the full model's and the cut's errors and the verdict (``featx.numeric_check``;
    docs/numerics.md). A cut equal within the tolerance whose float64 run differs is ``below_resolution``,
    not faithful.

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
        leaf_functions=leaf_functions,
        label=label,
        numerics=numerics,
        dependence=dependence,
        weights=weights,
        weights_prefix=weights_prefix,
        model_kwargs=model_kwargs,
    )[0]


def verify_cuts(
    model: nn.Module | str | ModelSource,
    cuts: Sequence[str | int | CutPath],
    example_input: Any = None,
    *,
    modes: Sequence[str] = MODES,
    atol: float = 0.0,
    rtol: float = 0.0,
    seed: int = 0,
    keep_glue: bool = False,
    model_output: bool = True,
    leaf_functions: Sequence[Callable[..., Any]] = (),
    label: str | None = None,
    numerics: Numerics | None = None,
    dependence: bool = True,
    weights: str | os.PathLike[str] | None = None,
    weights_prefix: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
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
    each module runs again on one fresh input for all cuts, as ``verify`` describes; ``leaf_functions``,
    ``numerics`` and the model (a module, a spec or ``ModelSource`` with ``weights``, ``weights_prefix``,
    ``model_kwargs``) as ``verify`` takes them.
    """
    model, label = _model(model, label, seed, weights, weights_prefix, model_kwargs)
    modes = _modes(modes)
    tolerance = Tolerance(atol, rtol)
    leaves = leaf_functions_for(leaf_functions, keep_glue)
    if not cuts:
        raise FeatxError("no cuts to verify; pass at least one child name or count")
    paths = [upto if isinstance(upto, CutPath) else resolve_path(model, upto) for upto in cuts]
    containers = _containers(paths)
    x = example(model, example_input, seed, label=label)
    numerics = _numerics(numerics)
    original, given = model, x
    if not numerics.is_default:  # the proof below runs on the model and input in the setting
        model, x, tolerance = _in_setting(model, x, numerics, atol, rtol)
    names = child_names(model)
    runs: list[tuple[CutPath, list[str]]] = []  # the longest path of each chain of cuts, and its units
    for path in sorted(paths, key=lambda p: -len(p.units())):
        units = path.units()
        if not any(chain[: len(units)] == units for _, chain in runs):
            runs.append((path, units))
    with preserved(model) as snapshot, numerics.running(device_of(x, model)):
        if keep_glue:  # fx runs the root's forward (and each traced container's) to trace it
            # the modules truncate(model, cut, keep_glue=True) returns, built before any compared forward
            traced = trace_root(model, leaves)
            glued = {p.upto: traced.cut(p, model_output=model_output) for p in paths}
            returned = {upto: flags_of(g) for upto, g in glued.items()}
            containers = _with_tracks(containers, glued.values())
        recordings = record(model, x, modes, seed, snapshot, containers)
        _require_any_child(recordings, numerics)
        for path in paths:
            if keep_glue:
                _require_glue_reference(recordings, glued[path.upto])
            else:
                _require_reference(recordings, path)
                _require_tensors(recordings, path)
        results: dict[str, dict[str, ModeResult]] = {m: {} for m in modes}
        fresh: Fresh | None = None
        if keep_glue:
            found = found_mode(model, snapshot)
            fresh = fresh_input(model, x, modes, seed, snapshot, containers, recordings, glued.values())
            for m in sorted(modes, key=lambda m: m != found):  # the mode it came back in first, as it is
                for upto, g in glued.items():
                    flags = returned[upto] if m == found else None
                    results[m][upto] = prove_glue(
                        g, x, fresh, m, seed, snapshot, recordings[m], tolerance, flags
                    )
        else:
            for longest, units in runs:
                sequential = truncated(model, longest)
                ends = {p.upto for p in paths if units[: len(p.units())] == p.units()}
                for m in modes:
                    results[m].update(
                        run_truncated(sequential, units, x, m, seed, snapshot, recordings[m], ends, tolerance)
                    )
        cut_modules = {p.upto: glued[p.upto] if keep_glue else None for p in paths}
        results = _proved(
            model, cut_modules, x, seed, snapshot, recordings, fresh, results, tolerance, dependence
        )
    if not numerics.is_default:
        results = _judged(
            original, model, given, x, {p.upto: p for p in paths}, keep_glue, leaves, recordings, results,
            seed=seed, containers=containers, numerics=numerics, tolerance=tolerance, model_output=model_output,
        )  # fmt: skip
    anatomy = _anatomy(model, label, x, recordings, snapshot.by_name, numerics)
    return tuple(
        Report(
            anatomy,
            path.upto,
            path.kept,
            {m: results[m][path.upto] for m in modes},
            _reasons(anatomy, path, {m: results[m][path.upto] for m in modes}, keep_glue, len(names)),
            keep_glue=keep_glue,
            path=path,
            numerics=numerics.to_dict(),
            environment=anatomy.environment,
        )
        for path in paths
    )


def sweep(
    model: nn.Module | str | ModelSource,
    example_input: Any = None,
    *,
    modes: Sequence[str] = MODES,
    atol: float = 0.0,
    rtol: float = 0.0,
    seed: int = 0,
    literal: bool = False,
    keep_glue: bool = False,
    depth: int = 1,
    leaf_functions: Sequence[Callable[..., Any]] = (),
    label: str | None = None,
    dependence: bool = False,
    numerics: Numerics | None = None,
    weights: str | os.PathLike[str] | None = None,
    weights_prefix: str | None = None,
    model_kwargs: Mapping[str, object] | None = None,
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
    keep_glue=True)``, compared with the full model's value at the cut, as it comes back and on a fresh
    input as ``verify`` describes. The root and each container are traced once for all of them, and every
    cut's value comes from one run per mode and input of one module of the same trace that taps them all
    (``featx.glue_proof.all_cuts``: the same values as each cut's module, which runs where it cannot); a
    cut keep_glue refuses (a module a block calls
    twice, a container that does not trace) is not faithful, with the refusal as its reason. A root that cannot be
    traced raises ``FeatxError``. ``leaf_functions`` (with ``keep_glue=True`` only) are the functions the
    traces keep whole, as ``verify`` takes them. ``numerics`` as ``verify`` takes it: each cut's modes are
    judged in that setting and against float64 (every cut run once more in the setting and in float64).
    The model (a module, a spec or ``ModelSource`` with ``weights``, ``weights_prefix``, ``model_kwargs``)
    as ``verify`` takes it.
    """
    model, label = _model(model, label, seed, weights, weights_prefix, model_kwargs)
    modes = _modes(modes)
    tolerance = Tolerance(atol, rtol)
    leaves = leaf_functions_for(leaf_functions, keep_glue)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise FeatxError(f"depth {depth!r} is not a depth; accepted: an int >= 1 (1: the root's children)")
    x = example(model, example_input, seed, label=label)
    numerics = _numerics(numerics)
    original, given = model, x
    if not numerics.is_default:  # the proof below runs on the model and input in the setting
        model, x, tolerance = _in_setting(model, x, numerics, atol, rtol)
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
    together: AllCuts | None = None
    with preserved(model) as snapshot, numerics.running(device_of(x, model)):
        if keep_glue:  # fx runs the root's forward (and each traced container's) to trace it
            with watching():  # the trace's watch on module attributes put on once for all the traces
                traced = trace_root(model, leaves)
                for name, path in paths.items():
                    try:  # modules only featx runs: each mode's code made when it first runs
                        cut = glued[name] = traced.cut(path, lazy=True)
                        returned[name] = flags_of(cut)
                    except FeatxError as err:
                        glued[name] = str(err).removeprefix("keep_glue: ")
                # every cut's value from one run of one module per mode and input, not one run per cut
                together = all_cuts(traced, paths[names[-1]], glued, snapshot)
        # the keep_glue modules' references may need containers tracked below the asked depth
        made = [g for g in glued.values() if not isinstance(g, str)]
        tracked = _with_tracks(containers, made)
        # with one module for all cuts, the recordings say which calls its runs need not make again
        reuse = together is not None
        recordings = record(model, x, modes, seed, snapshot, tracked, effects=reuse)
        _require_any_child(recordings, numerics)
        found, fresh = None, None
        if keep_glue:
            found = found_mode(model, snapshot)
            fresh = fresh_input(model, x, modes, seed, snapshot, tracked, recordings, made, effects=reuse)
        for m, rec in sorted(recordings.items(), key=lambda item: item[0] != found):  # as in verify_cuts
            if keep_glue:
                proved = prove_cuts(
                    {name: g for name, g in glued.items() if not isinstance(g, str)},
                    together,
                    x,
                    fresh,
                    m,
                    seed,
                    snapshot,
                    rec,
                    tolerance,
                    returned if m == found else None,
                )
                per_mode[m] = {
                    name: ModeResult(None, False, mismatch=f"keep_glue cannot cut here: {g}")
                    if isinstance(g, str)
                    else proved[name]
                    for name, g in glued.items()
                }
                continue
            if literal:
                for name, path in paths.items():
                    sequential = truncated(model, path)
                    per_mode[m] |= run_truncated(
                        sequential, path.units(), x, m, seed, snapshot, rec, {name}, tolerance
                    )
                continue
            per_mode[m] |= dict(zip(names, derive(rec, names, model, snapshot, tolerance), strict=True))
            for c, chain in chains.items():
                inside = len(rec.containers[c])
                units = chain.units()
                derived = derive(rec, units, model, snapshot, tolerance)
                per_mode[m] |= dict(zip(units[-inside:], derived[-inside:], strict=True))
        cut_modules = glued if keep_glue else dict.fromkeys(paths)
        per_mode = _proved(
            model,
            cut_modules,
            x,
            seed,
            snapshot,
            recordings,
            fresh,
            per_mode,
            tolerance,
            dependence,
        )
    if not numerics.is_default:
        per_mode = _judged(
            original, model, given, x, paths, keep_glue, leaves, recordings, per_mode,
            seed=seed, containers=tracked, numerics=numerics, tolerance=tolerance,
        )  # fmt: skip
    anatomy = _anatomy(model, label, x, recordings, snapshot.by_name, numerics)
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
    return Sweep(anatomy, tuple(cuts), numerics=numerics.to_dict(), environment=anatomy.environment)


def _proved(
    model: nn.Module,
    cuts: Mapping[str, KeepGlue | str | None],
    x: Any,
    seed: int,
    snapshot: Snapshot,
    recordings: dict[str, Recording],
    fresh: Fresh | None,
    results: dict[str, dict[str, ModeResult]],
    tolerance: Tolerance,
    dependence: bool,
) -> dict[str, dict[str, ModeResult]]:
    """``results`` (mode -> cut -> result) with what a verdict checks beyond the comparison
    (``featx.sensitivity``): each passing comparison's ``sensitive``, and with ``dependence`` each cut's
    ``output_depends_on_cut``, one more full forward per cut and mode. ``cuts``: each cut's keep_glue
    module (a refusal's text, or None for a plain cut), whose reference is the full model's value there.
    The comparison that proves sensitivity runs on a probe of the value (``featx.sensitivity.blind_spot``,
    ``whole=False``): the verdict the whole value gives, without a second pass over every element."""
    proved: dict[str, dict[str, ModeResult]] = {}
    for m, per_cut in results.items():
        rec = recordings[m]
        proved[m] = {}
        for upto, result in per_cut.items():
            module = cuts.get(upto)
            if isinstance(module, KeepGlue):
                again = glue_reference(fresh.recordings[m], module) if fresh is not None else None
                result = checked(result, glue_reference(rec, module), tolerance, again, whole=False)
            elif module is None:
                result = checked(result, reference(rec, upto), tolerance, whole=False)
            if dependence and not isinstance(module, str):
                result = replace(
                    result, output_depends_on_cut=depends(model, upto, x, m, seed, snapshot, rec)
                )
            proved[m][upto] = result
    return proved


def _module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules(remove_duplicate=False))[name]
