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


# `-n auto` (pyproject's addopts) counts the CPUs this process may run on, and the zoo's workers hold a model,
# its reference copy and the guard's snapshots at once (up to about 6 GB for the torchvision ViT-L's): on a
# machine that shows more CPUs than memory for that many workers, the kernel kills a worker mid-test (seen in
# CI as "node down: Not properly terminated"). ZOO_WORKER_BYTES is the memory one zoo worker is given.
ZOO_WORKER_BYTES = 6 * 2**30


def _usable_cpus() -> int:
    """The CPUs this process may run on: its affinity, bounded by a cgroup CPU quota where one is set."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per usable CPU; a zoo run (``-m zoo``) no more than its memory holds."""
    workers = _usable_cpus()
    memory = _available_memory()
    if "zoo" in (config.getoption("markexpr") or "").replace("not zoo", "") and memory is not None:
        workers = min(workers, max(1, memory // ZOO_WORKER_BYTES))
    return workers


# Each xdist worker takes its share of the CPUs: torch's default (every CPU per process) oversubscribes them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, _usable_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# `pytest -m quick`: one or a few fast tests of each kind, the loop to run while working (well under a minute
# on two cores); the default run stays the whole suite. A whole file, or a test (all its parameters).
QUICK = (
    "tests/test_reference_docs.py",  # the reference pages, links and cited files
    "tests/test_quick.py",
    "tests/test_bad_input.py",  # every bad-input row: one line, exit 2
    "tests/test_compare.py::test_the_element_that_differs_most_is_named_in_the_reason",  # the comparator
    "tests/test_compare.py::test_rtol_is_relative_to_each_element_not_to_the_largest",
    "tests/test_compare.py::test_within_atol_plus_rtol_of_each_element_is_equal",
    "tests/test_compare.py::test_verify_and_export_judge_one_tensor_pair_alike",
    "tests/test_layout.py::test_featx_modules_import_each_other_without_a_cycle",
    "tests/test_layout.py::test_no_module_inside_the_package_imports_the_featx_package",
    "tests/test_truncate.py::test_truncate_by_name_keeps_children_up_to_and_including_it",  # cuts
    "tests/test_nested.py::test_truncate_stages_2_keeps_the_same_blocks_under_their_state_dict_names",
    "tests/test_nested.py::test_bad_paths_are_one_line_and_leave_the_model_untouched",
    "tests/test_nested.py::test_cli_verify_nested_cut",
    "tests/test_seed_models.py::test_seed_toy_full_model_gives_8_and_the_sequential_gives_3",  # verify
    "tests/test_seed_models.py::test_seed_toy_is_not_faithful_with_the_add_before_blk_lost",
    "tests/test_seed_models.py::test_seed_toy_sweep_derives_the_same_verdict",
    "tests/test_verify.py::test_identity_and_projection_shortcuts_are_told_apart",
    "tests/test_verify.py::test_tolerances_turn_a_small_difference_into_equal",
    "tests/test_verify.py::test_keyboard_interrupt_leaves_the_model_as_found",
    "tests/test_cli.py::test_seed_toy_from_the_command_line",
    "tests/test_cli.py::test_verify_faithful_cut_exits_0_with_a_table",
    "tests/test_glue.py::test_seed_toy_keeps_the_plus_5_at_blk",  # keep_glue
    "tests/test_glue.py::test_untraceable_root_is_refused_naming_the_line",
    "tests/test_glue.py::test_leaf_functions_are_kept_whole_and_the_cut_computes_the_models_value",
    "tests/test_backbone.py::test_a_dict_and_a_file_give_the_same_backbone",  # configs and builds
    "tests/test_backbone.py::test_a_build_resolves_its_cut_once",
    "tests/test_backbone.py::test_integer_outputs_are_refused_naming_the_stage_like_children",
    "tests/test_backbone.py::test_train_keeps_frozen_children_and_norm_eval_batchnorms_in_eval",
    "tests/test_check.py::test_seed_toy_config_differs_by_exactly_five",  # check
    "tests/test_extract.py::test_all_good_images_exit_0",  # extract on a tiny folder
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        test = item.nodeid.partition("[")[0]
        if test in QUICK or test.partition("::")[0] in QUICK:
            item.add_marker(pytest.mark.quick)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)


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
