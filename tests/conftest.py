"""Shared fixtures: no hub access, and the model-left-as-found invariant around every featx call."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import settings
from torch import nn

# CI replays the same generated corpus every run (a red build is then reproducible); locally each run
# explores new examples.
pytest_plugins = ["pytester"]  # the featx pytest plugin is tested in a pytest run of its own

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


def _attributes(model: nn.Module) -> list[tuple[str, dict[str, object]]]:
    """Every module's plain attributes (``self.factor``), by object identity."""
    return [
        (name, {k: v for k, v in m.__dict__.items() if k not in _MODULE_INTERNALS})
        for name, m in model.named_modules()
        if not isinstance(m, torch.jit.ScriptModule)
    ]


@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    attributes = _attributes(model)
    flags = [(name, m.training) for name, m in model.named_modules()]
    rng = torch.get_rng_state()
    hooks = _hook_count(model)
    grads = [p.requires_grad for p in model.parameters()]
    try:
        yield
    finally:
        after = model.state_dict(keep_vars=True)
        changed = [k for k, v in state.items() if not torch.equal(after[k].detach(), v)]
        assert not changed, f"featx changed {changed[:5]}"
        assert [(name, m.training) for name, m in model.named_modules()] == flags, "train/eval flags changed"
        assert torch.equal(torch.get_rng_state(), rng), "global RNG state changed"
        assert _hook_count(model) == hooks, "hooks left on the model"
        assert [p.requires_grad for p in model.parameters()] == grads
        after_attributes = _attributes(model)
        assert [(n, list(a)) for n, a in after_attributes] == [(n, list(a)) for n, a in attributes], (
            "attributes added or removed"
        )
        rebound = [
            f"{n}.{k}"
            for (n, a), (_, b) in zip(attributes, after_attributes, strict=True)
            for k in a
            if a[k] is not b[k]
        ]
        assert not rebound, f"featx left attributes rebound: {rebound[:5]}"


@pytest.fixture(autouse=True)
def every_call_leaves_the_model_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    """For the whole suite, every verify, sweep, inspect and verify_cuts call — from the API, the command
    line, ``featx check`` or ``assert_faithful`` — must leave its model exactly as found, also when it
    raises."""
    import featx.checks
    import featx.testing

    engine = sys.modules["featx.verify"]  # `featx.verify` the attribute is the function

    def guarded(fn: Callable) -> Callable:
        def call(model, *args, **kwargs):
            if not isinstance(model, nn.Module):
                return fn(model, *args, **kwargs)
            with _untouched(model):
                return fn(model, *args, **kwargs)

        return call

    for name in ("verify", "sweep", "inspect"):
        wrapped = guarded(getattr(engine, name))
        monkeypatch.setattr(engine, name, wrapped)  # the command line calls them through this module
        if name != "inspect":
            monkeypatch.setattr(featx, name, wrapped)
    monkeypatch.setattr(featx.testing, "verify", engine.verify)
    wrapped = guarded(engine.verify_cuts)
    monkeypatch.setattr(engine, "verify_cuts", wrapped)
    monkeypatch.setattr(featx.checks, "verify_cuts", wrapped)


@pytest.fixture
def untouched() -> Callable[[nn.Module], object]:
    """``with untouched(model): featx.verify(model, ...)`` fails if featx leaves any trace on the model."""
    return _untouched
