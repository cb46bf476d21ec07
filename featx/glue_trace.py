"""Tracing one module's own forward with ``torch.fx`` for keep_glue: every module it calls a leaf, in one
mode, under the guard that protects ``verify`` and the watch on module state (``featx.glue_state.Watch``),
its arguments (optional ones at their defaults, a container's as its caller passes them), and the words of a
refusal when fx cannot trace it.
"""

from __future__ import annotations

import builtins
import inspect
import re
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from featx.code_location import in_torch_or_featx, short_path
from featx.errors import one_line
from featx.glue_state import Read, Watch, distinct
from featx.guard import flags_of, preserved


class _RootTracer(fx.Tracer):
    """Every module the traced module calls is a leaf: only its own code is traced. ``leaf_functions`` are
    kept whole too: a call of one is one node of the graph, run as it is (fx's ``autowrap_functions``)."""

    def __init__(self, leaf_functions: Sequence[Callable[..., Any]] = ()) -> None:
        super().__init__(autowrap_functions=tuple(leaf_functions))
        self.leaf_functions = tuple(leaf_functions)
        self.record_stack_traces = True  # so a refusal can name the line of the model's code
        # A buffer is a graph value, not a tensor fx runs on: an in-place update (BN's
        # `num_batches_tracked.add_(1)`) is recorded rather than done once at trace time, and a value read
        # off it (`float(self.num_batches_tracked)`) stops the trace rather than being baked in.
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        # fx wraps the functions it finds in the forward's globals; a builtin (`int`) is not there, so it
        # is put there for the trace, by the name the forward calls it by
        scope = getattr(getattr(root, "forward", root), "__globals__", {})
        added = [
            f.__name__
            for f in self.leaf_functions
            if getattr(builtins, getattr(f, "__name__", ""), None) is f and f.__name__ not in scope
        ]
        for name in added:
            scope[name] = getattr(builtins, name)
        try:
            return super().trace(root, concrete_args=concrete_args)
        finally:
            for name in added:
                scope.pop(name, None)


Traced = tuple[fx.Graph, dict[str, torch.Tensor], tuple[Read, ...]]


def trace(
    module: nn.Module,
    mode: str,
    concrete: dict[str, Any],
    where: str,
    leaf_functions: Sequence[Callable[..., Any]] = (),
) -> Traced:
    """``module``'s own forward traced in ``mode``, the tensors fx made attributes of it, and the plain
    attributes the graph holds as constants (``glue_state.Read``). The module is left as found: traced
    under the guard that protects ``verify``, its flags set back and fx's constants moved off it.

    Raises:
        FeatxError: the forward writes module state or switches autograd, or the module has hooks
            (``glue_state.Watch``): what the graph would not do.
    """
    flags = flags_of(module)
    state = dict(module.__dict__)
    slots = {key: dict(module.__dict__[key]) for key in ("_parameters", "_buffers", "_modules")}
    constants: dict[str, torch.Tensor] = {}
    with preserved(module):
        try:
            for m, _ in flags:
                m.training = mode == "train"
            with Watch(module, where) as watch:
                graph = _RootTracer(leaf_functions).trace(module, concrete_args=concrete)
            for key in set(module.__dict__) - set(state):  # fx's `_tensor_constant0`
                value = module.__dict__[key]
                if isinstance(value, torch.Tensor):
                    constants[key] = value
        finally:
            for m, training in flags:
                m.training = training
            for key in set(module.__dict__) - set(state):
                del module.__dict__[key]
            module.__dict__.update(state)
            for key, slot in slots.items():
                module.__dict__[key].clear()
                module.__dict__[key].update(slot)
    _name_placeholders(module, graph)
    return graph, constants, distinct(iter(watch.reads))


def _name_placeholders(module: nn.Module, graph: fx.Graph) -> None:
    """Each placeholder under its argument's own name: fx calls an argument it was given a value for
    ``mask_1``, and the cut is called, by its caller's graph or a user, with ``mask=``."""
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(names):
        return
    for node, name in zip(placeholders, names, strict=True):
        if isinstance(node.target, str) and not node.target.startswith("*"):
            node.target = name


def defaults(model: nn.Module) -> dict[str, Any]:
    """The forward's optional arguments at their defaults: fx would otherwise branch on a placeholder
    (``if attn_mask is not None`` is true for a proxy) where the model, called on its input, does not."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {}
    return {
        name: p.default
        for name, p in signature.parameters.items()
        if p.default is not inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def concrete(module: nn.Module, call: fx.Node) -> dict[str, Any]:
    """A container's arguments as its caller's graph passes them: what the call passes as a constant
    (``scale=0.5``, ``mask=None``) and the optional arguments it leaves out (at their defaults) are traced
    as those values — the traced forward asserts they stay so — and the tensors it passes stay inputs."""
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*call.args, **call.kwargs)
    except (TypeError, ValueError):
        return defaults(module)
    concrete: dict[str, Any] = {}
    for name, p in signature.parameters.items():
        if p.kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            continue
        if name in bound.arguments:
            nodes: list[fx.Node] = []
            fx.node.map_arg(bound.arguments[name], nodes.append)
            if not nodes:
                concrete[name] = bound.arguments[name]
        elif p.default is not inspect.Parameter.empty:
            concrete[name] = p.default
    return concrete


def label(module: nn.Module, prefix: str) -> str:
    """How a refusal names the module whose forward it is about: the root by its class, a container by
    its class and dotted name."""
    return f"`{type(module).__name__}` (`{prefix}`)" if prefix else f"`{type(module).__name__}`"


def trace_failure(model: nn.Module, mode: str, err: Exception, prefix: str = "") -> str:
    """Why fx stopped, and on which line of the model's code (``prefix``: the container's dotted name)."""
    where = ""
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        if not in_torch_or_featx(frame.filename) and not frame.filename.startswith("<"):
            code = f" (`{frame.line.strip()}`)" if frame.line else ""
            where = f" at {short_path(frame.filename)}:{frame.lineno}{code}"
            break
    what = _untraceable(err)
    function = _function_on_a_tensor(err)
    # a function fx cannot trace through can be kept whole: one node of the graph, run as it is
    leaf = (
        f"; keep `{function}` whole with `truncate(..., keep_glue=True, leaf_functions=({function},))`, or "
        if function is not None
        else " — "
    )
    if prefix:
        return (
            f"keep_glue: torch.fx cannot trace the forward of `{type(model).__name__}` (`{prefix}`, a container "
            f"on the path of the cut) in {mode} mode{where}: {type(err).__name__}: {one_line(err)}; keep_glue "
            f"traces the root and each container on the path, so their forwards need to be free of {what}{leaf}"
            f"cut at `{prefix}` or without keep_glue"
        )
    return (
        f"keep_glue: torch.fx cannot trace the forward of `{type(model).__name__}` in {mode} mode{where}: "
        f"{type(err).__name__}: {one_line(err)}; keep_glue needs a root forward free of {what}{leaf}cut "
        "without keep_glue"
    )


def _function_on_a_tensor(err: Exception) -> str | None:
    """The function a forward called on a tensor that fx stopped in (``int``, ``float``, a function of
    the model's own code that converts its argument), or None when fx stopped on something else: the
    function the forward itself called, as it names it, so that it can be passed as a leaf function."""
    if not re.search(r"argument must be .*, not 'Proxy'|\(got Proxy\)", str(err)):
        return None
    frames = [
        f
        for f in traceback.extract_tb(err.__traceback__)
        if not in_torch_or_featx(f.filename) and not f.filename.startswith("<")
    ]
    if len(frames) >= 2:  # the forward called a function of its own code, which stopped
        return frames[1].name
    called = re.match(r"(\w+)\(\) argument", str(err))  # a builtin the forward called: `int() argument`
    return called.group(1) if called else None


def _untraceable(err: Exception) -> str:
    """What fx stopped on, in the words of a forward's code: fx runs the forward on stand-ins (proxies)
    that only torch operations take; each case below is worded after the message fx gives for it."""
    text = str(err)
    if "control flow" in text:
        return "data-dependent control flow (`if`/`while` on a tensor's value)"
    if "iterated" in text or "len(" in text or "'len'" in text:
        return "iteration over a tensor (`for`, `len`, unpacking)"
    if "does not support item assignment" in text:  # `x[0] = v` on a tensor, or on a shape fx traces
        return "item assignment into a tensor or its shape (`x[0] = v`, `x[mask] = v`)"
    if "cannot be interpreted as an integer" in text:
        return "a tensor where Python needs an integer (`range(n)`, a list index)"
    if re.search(r"argument must be .*, not 'Proxy'|\(got Proxy\)", text):  # int(x), float(x), numpy
        return (
            "Python functions and conversions on a tensor (`int(x)`, `float(x)`, a non-torch function), "
            "which fx cannot trace"
        )
    return "code fx cannot trace"
