"""Shared fixtures: no hub access, and the model-left-as-found invariant around every featx call."""

from __future__ import annotations

import functools
import itertools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import pytest
import torch
from hypothesis import settings
from torch import nn

# CI replays the same generated corpus every run (a red build is then reproducible); locally each run
# explores new examples.
# pytester: the featx pytest plugin is tested in a pytest run of its own; extract_support: the extract tests' data
pytest_plugins = ["pytester", "tests.extract_support"]

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
_CALL_IMPL = nn.Module._call_impl


def _attributes(model: nn.Module) -> list[tuple[str, dict[str, object]]]:
    """Every module's plain attributes (``self.factor``), by object identity."""
    return [
        (name, {k: v for k, v in m.__dict__.items() if k not in _MODULE_INTERNALS})
        for name, m in model.named_modules()
        if not isinstance(m, torch.jit.ScriptModule)
    ]


def _contents(model: nn.Module) -> list[tuple[str, dict[str, tuple[object, ...]]]]:
    """What each module's list, dict and set attributes hold (``self.cache``), item by item."""
    return [
        (
            name,
            {
                k: tuple(itertools.chain.from_iterable(v.items())) if isinstance(v, dict) else tuple(v)
                for k, v in attributes.items()
                if isinstance(v, (list, dict, set))
            },
        )
        for name, attributes in _attributes(model)
    ]


def _same_tensor(now: torch.Tensor, then: torch.Tensor) -> bool:
    """Equal values; a tensor on the meta device (a backbone built without weights yet) holds none."""
    if now.is_meta or then.is_meta:
        return now.is_meta == then.is_meta and now.shape == then.shape and now.dtype == then.dtype
    if torch.equal(now, then):
        return True
    # memory a backbone left unread (torch.empty) may hold NaN, which equals nothing, itself included
    return now.shape == then.shape and bool(((now == then) | (now.isnan() & then.isnan())).all())


@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    attributes = _attributes(model)
    contents = _contents(model)
    flags = [(name, m.training) for name, m in model.named_modules()]
    rng = torch.get_rng_state()
    hooks = _hook_count(model)
    grads = [p.requires_grad for p in model.parameters()]
    try:
        yield
    finally:
        after = model.state_dict(keep_vars=True)
        changed = [k for k, v in state.items() if not _same_tensor(after[k].detach(), v)]
        assert not changed, f"featx changed {changed[:5]}"
        assert [(name, m.training) for name, m in model.named_modules()] == flags, "train/eval flags changed"
        assert torch.equal(torch.get_rng_state(), rng), "global RNG state changed"
        assert _hook_count(model) == hooks, "hooks left on the model"
        assert nn.Module._call_impl is _CALL_IMPL, "featx's _call_impl left on nn.Module"
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
        refilled = [
            f"{n}.{k}"
            for (n, a), (_, b) in zip(contents, _contents(model), strict=True)
            for k in a
            if len(a[k]) != len(b[k]) or any(x is not y for x, y in zip(a[k], b[k], strict=True))
        ]
        assert not refilled, f"featx left list/dict/set attributes changed: {refilled[:5]}"


# The models inside the guard right now, innermost last: what `under_guard` answers from.
_GUARDED: list[nn.Module] = []


@pytest.fixture(autouse=True)
def every_call_leaves_the_model_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    """For the whole suite, every guarded run — ``with preserved(model)``, the one way featx runs a model
    in verify, sweep, inspect, verify_cuts, ``featx check`` and ``assert_faithful`` — must leave its model
    exactly as found, also when it raises. Wrapped at the guard itself, so no call path escapes it."""
    from featx.guard import Snapshot

    enter, exit_ = Snapshot.__enter__, Snapshot.__exit__
    checks: dict[int, ExitStack] = {}

    def guarded_enter(self: Snapshot) -> Snapshot:
        with ExitStack() as stack:
            stack.enter_context(_untouched(self.model))
            _GUARDED.append(self.model)
            stack.callback(_GUARDED.pop)
            found = enter(self)
            stack.push(functools.partial(exit_, self))
            checks[id(self)] = stack.pop_all()
        return found

    def guarded_exit(self: Snapshot, *exc: object) -> None:
        checks.pop(id(self)).__exit__(*exc)

    monkeypatch.setattr(Snapshot, "__enter__", guarded_enter)
    monkeypatch.setattr(Snapshot, "__exit__", guarded_exit)


@pytest.fixture
def under_guard() -> Callable[[nn.Module], bool]:
    """``under_guard(model)``: whether featx is running ``model`` inside the guard right now."""
    return lambda model: any(m is model for m in _GUARDED)


@pytest.fixture
def backbone_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``"build"`` for each model the backbone layer builds and ``"load"`` for each weights load, in order,
    from here to the end of the test."""
    import featx.backbone.fpn
    import featx.backbone.loading
    from featx.models import ModelSource

    calls: list[str] = []
    build, load_weights = ModelSource.build, featx.backbone.loading.load_weights

    def counted_build(self: ModelSource) -> object:
        if sys._getframe(1).f_globals["__name__"].startswith("featx.backbone"):  # the test's own builds aside
            calls.append("build")
        return build(self)

    def counted_load(*args: object, **kwargs: object) -> object:
        calls.append("load")
        return load_weights(*args, **kwargs)

    monkeypatch.setattr(ModelSource, "build", counted_build)
    monkeypatch.setattr(featx.backbone.loading, "load_weights", counted_load)
    monkeypatch.setattr(featx.backbone.fpn, "load_weights", counted_load)  # an FPN's weights
    return calls


@pytest.fixture
def untouched() -> Callable[[nn.Module], object]:
    """``with untouched(model): featx.verify(model, ...)`` fails if featx leaves any trace on the model."""
    return _untouched
