"""The guard that leaves the model as it was found (``featx.guard``), and the runs that happen inside it."""

from __future__ import annotations

import importlib
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
import torch
from torch import nn

import featx
from examples.seed_toy import ResN
from featx.guard import preserved
from featx.record import record

engine = importlib.import_module("featx.verification")


@pytest.mark.parametrize("module", ["featx.guard", "featx.config"])
def test_the_guard_and_the_config_do_not_import_the_recorder(module):
    # The recorder imports the guard, never the other way round; config_keys.py takes MODES from featx.vocab.
    recorder = ("featx.record", "featx.recorder", "featx.module_calls", "featx.call_facts")
    code = f"import sys, {module}; print(any(m in sys.modules for m in {recorder!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_guard_puts_the_model_back_also_when_its_body_never_restored_it():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with preserved(model):
        model.eval()  # as a run that raises before its first restore() may leave it
        model[1].running_mean += 1
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, torch.zeros(2))


_TORCH_CALL = nn.Module._call_impl


class _Noting(nn.Module):
    """Two children; its forward tells ``note`` whether ``nn.Module._call_impl`` is torch's own while it runs
    (a callback, not a list on the model: the guard puts the model's own lists back), and can be
    interrupted."""

    def __init__(self, note: Callable[[bool], None], interrupt: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.ReLU()
        self._note = note
        self.interrupt = interrupt

    def forward(self, x):
        self._note(nn.Module._call_impl is _TORCH_CALL)
        if self.interrupt:
            raise KeyboardInterrupt
        return self.b(self.a(x))


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_pre_hooks_with_kwargs)
        for m in model.modules()
    )


def test_the_recorders_call_impl_is_on_nn_module_only_while_a_recorded_forward_runs():
    seen: list[bool] = []
    model, x = _Noting(seen.append), torch.randn(2, 4)
    with preserved(model) as snapshot:
        for mode in ("eval", "train"):
            rec = record(model, x, (mode,), 0, snapshot)[mode]
            assert nn.Module._call_impl is _TORCH_CALL
            assert [c.calls for c in rec.children] == [1, 1]  # it saw the children's calls
        model(x)  # a run between recordings (a truncated model's) runs with torch's own
    assert seen == [False, False, True]
    assert _hooks(model) == 0


def test_the_recorders_call_impl_comes_off_when_the_recorded_forward_is_interrupted():
    model, x = _Noting(lambda same: None, interrupt=True), torch.randn(2, 4)
    with pytest.raises(KeyboardInterrupt), preserved(model) as snapshot:
        record(model, x, ("train",), 0, snapshot)
    assert nn.Module._call_impl is _TORCH_CALL and model.training
    assert torch.overrides._get_current_function_mode_stack() == []


def test_another_threads_module_calls_pass_the_recorder_by():
    # The recorder's _call_impl is on nn.Module for every thread while one records; a call from another
    # thread, even of the recorded model's own module, is not the recording's.
    other: list[int] = []

    class CallsFromAThread(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            y = self.a(x)
            thread = threading.Thread(target=lambda: other.append(self.b(x).shape[0]))
            thread.start()
            thread.join()
            return self.b(y)

    model, x = CallsFromAThread(), torch.randn(2, 4)
    with preserved(model) as snapshot:
        rec = record(model, x, ("eval",), 0, snapshot)["eval"]
    assert other == [2]
    assert [c.calls for c in rec.children] == [1, 1] and rec.children[1].feed is None


class _Watched(nn.Module):
    """ResN's shape (``+5`` glue, then one child) whose own forward calls ``watch(self)``: the recorded
    forwards run it, and so does keep_glue's tracing, under torch.fx."""

    def __init__(self, watch: Callable[[nn.Module], None]) -> None:
        super().__init__()
        self.blk = nn.Linear(5, 5)
        self._watch = watch

    def forward(self, x):
        self._watch(self)
        return self.blk(x + 5)


_ENTRY_POINTS = {
    "verify": lambda m, x: featx.verify(m, "blk", x),
    "verify keep_glue": lambda m, x: featx.verify(m, "blk", x, keep_glue=True),
    "verify_cuts keep_glue": lambda m, x: engine.verify_cuts(m, ["blk"], x, keep_glue=True),
    "sweep": lambda m, x: featx.sweep(m, x),
    "sweep keep_glue": lambda m, x: featx.sweep(m, x, keep_glue=True),
    "inspect": lambda m, x: engine.inspect(m, x),
}


@pytest.mark.parametrize("entry", list(_ENTRY_POINTS))
def test_featx_runs_the_full_model_only_inside_the_guard(entry, under_guard):
    seen: list[bool] = []  # not on the model: the guard puts the model's own lists back
    model = _Watched(lambda m: seen.append(under_guard(m)))
    _ENTRY_POINTS[entry](model, torch.ones(2, 5))
    assert seen and all(seen), seen


def test_the_suites_guard_fails_a_guarded_run_that_leaves_the_model_changed():
    # tests/conftest.py wraps the guard itself, so every guarded run is checked, whoever starts it: here a
    # hook the guard does not know of, left on the model.
    model = nn.Linear(2, 2)
    with pytest.raises(AssertionError, match="hooks left on the model"), preserved(model):
        model.register_forward_hook(lambda module, args, out: None)


def test_verify_and_a_resumed_sweep_run_the_modules_through_one_function(monkeypatch):
    calls: list[tuple[int, bool]] = []
    replay = importlib.import_module("featx.replay")
    run_units = replay.run_units

    def spy(units, modules, start, x, rng, mode, snapshot, rec, cuts, tolerance):
        calls.append((start, cuts is None))
        return run_units(units, modules, start, x, rng, mode, snapshot, rec, cuts, tolerance)

    monkeypatch.setattr(replay, "run_units", spy)
    model, x = ResN(), torch.ones(5, 5)
    featx.verify(model, "blk", x, modes=["eval"])
    featx.sweep(model, x, modes=["eval"])  # `blk` is fed x + 5: resumed from it, every unit compared
    assert calls == [(0, False), (0, True)]
