"""Record the full model's forward in each mode asked for, inside the guard that leaves it as it was found
(``featx.guard``): ``record`` puts the model back and in the mode, has ``featx.recorder`` record one
instrumented forward, and records again, copying every child's output, where an output changed where the
recorder could not see it. What a recording tracks, and how, is said in ``featx.recorder``; the values it
returns are ``featx.recording``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from featx.call_facts import _leaf_kind
from featx.errors import FeatxError
from featx.guard import Snapshot, set_mode
from featx.recorder import _Recorder, _units
from featx.recording import Recording


def record(
    model: nn.Module,
    example_input: Any,
    modes: Sequence[str],
    seed: int,
    snapshot: Snapshot,
    containers: Sequence[str] = (),
    *,
    effects: bool = False,
) -> dict[str, Recording]:
    """Run ``model`` once in each of ``modes`` on a copy of ``example_input``, seeded with ``seed``, and
    record each run.

    ``containers`` (dotted module names, each a child of the root or of an earlier container) also have
    their children tracked as the root's are, for nested cuts. If the forward raises an ``Exception``, the
    recording ends there and says where; anything else (``KeyboardInterrupt``) propagates (the
    recorder's ``_call_impl`` comes off ``nn.Module`` on the way out, and ``preserved`` puts the model back).
    With ``effects``, each unit's ``ChildTrace.contained`` is filled in (a pass over every module's plain
    attributes as each unit returns: keep_glue's proof asks for it).

    Raises:
        FeatxError: the model or one of its modules is TorchScript (hooks and op recording cannot see
            inside it).
    """
    _refuse_scripted(snapshot)
    index = {u.name: i for i, u in enumerate(_units(model, snapshot, containers))}
    modules: dict[int, tuple[str, int | None, int]] | None = None
    recordings = {}
    for mode in modes:
        flag_differs = _set_modes(model, mode, snapshot, containers)
        if modules is None:  # the model is put back now, as before each recording
            # each module of the model but the root, by id: its name, its unit index (None if it is none)
            # and what kind of leaf it is (_leaf_kind)
            modules = {id(m): (name, index.get(name), _leaf_kind(m)) for name, m in snapshot.named if name}
        args = (model, snapshot, mode, example_input, seed, flag_differs, containers, modules)
        rec = _Recorder(*args, effects=effects).run()
        if rec.copies_unreliable:
            # A child's output changed in place where featx could not see it coming: record again, this
            # time copying every child's output as it returns.
            flag_differs = _set_modes(model, mode, snapshot, containers)
            args = (model, snapshot, mode, example_input, seed, flag_differs, containers, modules)
            rec = _Recorder(*args, eager_copies=True, effects=effects).run()
        recordings[mode] = rec
    return recordings


def _set_modes(model: nn.Module, mode: str, snapshot: Snapshot, containers: Sequence[str]) -> set[int]:
    """Put the model back and in ``mode``; the units (the root's children, then the tracked containers')
    whose train/eval flags then differ from those the truncated model's ``train()`` gives them.

    ``nn.Sequential.train()`` calls each child's ``train()``, never the root's: a root that overrides
    ``train()`` (mmdetection's ``norm_eval``, frozen stages) leaves its children in another state than the
    Sequential. The same holds one level down for a container the truncated model replaces by a Sequential.
    """
    snapshot.restore()
    if not snapshot.train_overridden:  # every module's flag is then the mode, whoever calls train()
        set_mode(model, mode == "train")
        return set()
    modules = snapshot.by_name
    units = [name for name, _ in model.named_children()]
    for container in containers:
        units += [f"{container}.{name}" for name, _ in modules[container].named_children()]
    subtrees = [snapshot.subtree(name) for name in units]
    as_sequential = []
    for name, subtree in zip(units, subtrees, strict=True):
        set_mode(modules[name], mode == "train")
        as_sequential.append([m.training for m in subtree])
    set_mode(model, mode == "train")
    return {i for i, subtree in enumerate(subtrees) if [m.training for m in subtree] != as_sequential[i]}


def _refuse_scripted(snapshot: Snapshot) -> None:
    for name, _ in snapshot.scripted[:1]:
        what = f"`{name}` is a TorchScript module" if name else "the model is TorchScript"
        raise FeatxError(
            f"{what}, which takes no forward hooks and hides its ops from featx; verify the eager "
            "model before scripting it"
        )
