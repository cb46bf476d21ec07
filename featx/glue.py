"""keep_glue: a truncation that computes what the full model computes at the cut, the root's glue included.

The glue comes from the model's own ``forward()``, not from per-model code. Only the root is traced with
``torch.fx``: every module the root calls is a leaf, so nothing inside a block needs to be traceable. The
graph is traced once per mode (``self.training`` and Python branches are baked in at trace time), cut
after the last call of the kept child — or of any module inside it, for roots that call grandchildren
themselves (``for blk in self.blocks: x = blk(x)`` in timm's ViT, EVA, CaiT) — and its dead code dropped.
The result runs the graph of the mode it is in.

What ``keep_glue`` assumes, and does not check: the root's forward takes the same Python path for every
input of the shapes it is used with (fx records one path), and the root's attributes other than
``training`` (``drop_rate``, ``grad_checkpointing``) do not change after the cut is made. What it checks,
raising ``FeatxError`` rather than returning something wrong: the root traces; the kept child is called;
no child after the cut is called before the cut's value is made; and the data flow is a chain at the cut
(the code after the cut reads nothing made before it but the cut's value, shapes and the model's
parameters). ``featx.verify(..., keep_glue=True)`` then proves the result against the full model.
"""

from __future__ import annotations

import builtins
import inspect
import operator
import os
import re
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from featx.errors import FeatxError, one_line
from featx.truncate import child_names, resolve_cut

MODES = ("eval", "train")
_SKIP_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)
# Nodes that neither write to a tensor nor draw random numbers: dead ones can go. A module call or any
# other torch function stays even when its value is unused, since it may update BN statistics or advance
# the RNG as the full forward does.
_OPERATORS = [
    "add",
    "sub",
    "mul",
    "floordiv",
    "truediv",
    "mod",
    "pow",
    "neg",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "and_",
    "or_",
    "not_",
]
_PURE_FUNCTIONS = frozenset(
    {getattr, builtins.len, operator.getitem, *(getattr(operator, n) for n in _OPERATORS)}
)
_PURE_METHODS = frozenset(
    [
        "size",
        "dim",
        "numel",
        "stride",
        "view",
        "reshape",
        "flatten",
        "permute",
        "transpose",
        "expand",
        "contiguous",
        "unsqueeze",
        "squeeze",
        "type_as",
        "to",
        "float",
        "half",
        "__getitem__",
    ]
)
_META_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout"})
_META_METHODS = frozenset({"size", "dim", "numel", "stride", "get_device"})


class _RootTracer(fx.Tracer):
    """Every module the root calls is a leaf: only the root's own code is traced."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True  # so a refusal can name the line of the model's code

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


@dataclass(frozen=True)
class RootTrace:
    """The root's forward traced once per mode. ``cut`` makes a ``KeepGlue`` from it, many times over."""

    model: nn.Module
    graphs: Mapping[str, fx.Graph]  # mode -> the whole forward
    constants: Mapping[str, torch.Tensor]  # tensors fx made attributes of (``_tensor_constant0``)

    def cut(self, path: Sequence[str] | str | int, taps: Sequence[str] = ()) -> KeepGlue:
        """The module computing the value at ``path`` (a child name as a one-name list, or ``upto``
        as ``truncate`` takes it), and with ``taps`` (child names before the cut) the value of each tapped
        child too: then it returns ``{child name: value}``, the cut's child last.

        Raises:
            FeatxError: the cut child is never called, the data flow is not a chain at the cut, a child
                after the cut runs before it.
        """
        path = _path(self.model, path)
        if len(path) > 1:
            raise FeatxError(
                f"keep_glue cuts between the root's children; `{'.'.join(path)}` is a path inside "
                f"`{path[0]}`: cut at `{path[0]}` or without keep_glue"
            )
        names = child_names(self.model)
        kept = names.index(path[0]) + 1
        last = kept == len(names)
        graphs: dict[str, fx.Graph] = {}
        cut_at: dict[str, str | None] = {}
        used: dict[str, None] = {}
        for mode, graph in self.graphs.items():
            graphs[mode], cut_at[mode] = _cut_graph(
                self.model, graph, names, kept, list(taps), last, mode, used
            )
        keep = KeepGlue(self.model, graphs, names[:kept], list(used), self.constants, path[0], tuple(taps))
        keep.cut_at = cut_at
        return keep


def trace_root(model: nn.Module) -> RootTrace:
    """Trace the root's forward with ``torch.fx`` in eval and in train mode, every called module a leaf.

    The model is left as found (fx sets constants on the root while tracing; they are moved out).

    Raises:
        FeatxError: fx cannot trace the root's own code, naming the line it stopped on.
    """
    if not isinstance(model, nn.Module):
        raise FeatxError(f"model is a {type(model).__name__}; expected a torch.nn.Module")
    flags = [(m, m.training) for m in model.modules()]
    state = dict(model.__dict__)
    slots = {key: dict(model.__dict__[key]) for key in ("_parameters", "_buffers", "_modules")}
    graphs: dict[str, fx.Graph] = {}
    constants: dict[str, torch.Tensor] = {}
    try:
        for mode in MODES:
            for m, _ in flags:
                m.training = mode == "train"
            try:
                graphs[mode] = _RootTracer().trace(model, concrete_args=_defaults(model))
            except Exception as err:
                raise FeatxError(_trace_failure(model, mode, err)) from None
            for key in set(model.__dict__) - set(state):  # fx's `_tensor_constant0`
                value = model.__dict__[key]
                if isinstance(value, torch.Tensor):
                    constants[key] = value
    finally:
        for m, training in flags:
            m.training = training
        for key in set(model.__dict__) - set(state):
            del model.__dict__[key]
        model.__dict__.update(state)
        for key, slot in slots.items():
            model.__dict__[key].clear()
            model.__dict__[key].update(slot)
    return RootTrace(model, graphs, constants)


def _defaults(model: nn.Module) -> dict[str, Any]:
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


def keep_glue(model: nn.Module, upto: str | int) -> KeepGlue:
    """``featx.truncate(model, upto, keep_glue=True)``: see ``KeepGlue``."""
    return trace_root(model).cut(upto)


class KeepGlue(nn.Module):
    """The kept part of a model with the root's glue: returns what the full model computes at the cut.

    At a cut before the last child that is the value the kept child returns (the last call of it, or of a
    module inside it) in the full forward; at the last child, the model's output. The kept children are the
    model's own module objects under their own names, and the root parameters and buffers the glue reads
    (``cls_token``, ``pos_embed``) keep theirs, so ``state_dict()`` keys are a subset of the model's.
    ``train()``/``eval()`` reach the kept children as usual, and ``forward`` runs the graph traced in the
    mode the module is in, so mode-dependent glue (``F.dropout(x, training=self.training)``) behaves, and
    draws random numbers, as in the full model. ``code`` holds each mode's Python, for reading.
    """

    def __init__(
        self,
        model: nn.Module,
        graphs: Mapping[str, fx.Graph],
        kept: Sequence[str],
        used: Sequence[str],
        constants: Mapping[str, torch.Tensor],
        upto: str,
        taps: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.upto = upto
        self.taps = tuple(taps)
        # mode -> the module whose last call in the full forward makes the value at the cut (the child, or
        # a module inside it the root calls itself); None where the cut is the model's output
        self.cut_at: dict[str, str | None] = {}
        self.source_class = f"{type(model).__module__}.{type(model).__qualname__}"
        wanted = set(kept) | set(used)
        # In the model's order, so state_dict() lists keys as the model does.
        for name, param in model._parameters.items():
            if name in wanted and param is not None:
                self.register_parameter(name, param)
        for name, buf in model._buffers.items():
            if name in wanted and buf is not None:
                self.register_buffer(name, buf, persistent=name not in model._non_persistent_buffers_set)
        for name, module in model._modules.items():
            if name in wanted and module is not None:
                self.add_module(name, module)
        for name in used:
            if name in constants:  # no state_dict key: fx made it from a plain tensor
                self.register_buffer(name, constants[name], persistent=False)
            elif not hasattr(self, name):  # a plain attribute of the root the glue reads
                object.__setattr__(self, name, getattr(model, name))
        self.code: dict[str, str] = {}
        self._forwards: dict[str, Any] = {}
        for mode, graph in graphs.items():
            python = graph.python_code(root_module="self")
            namespace = dict(python.globals)
            exec(
                compile(python.src, f"<featx keep_glue {mode} forward of {type(model).__name__}>", "exec"),
                namespace,
            )
            self.code[mode] = python.src
            self._forwards[mode] = namespace["forward"]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._forwards["train" if self.training else "eval"](self, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"upto={self.upto!r}, keep_glue=True" + (f", taps={list(self.taps)}" if self.taps else "")


# -- cutting a traced graph ----------------------------------------------------------------------------
def _path(model: nn.Module, path: Sequence[str] | str | int) -> list[str]:
    if isinstance(path, (list, tuple)):
        names = [str(p) for p in path]
        if not names:
            raise FeatxError("the cut path is empty; name a child")
        resolve_cut(model, names[0])
        return names
    return [child_names(model)[resolve_cut(model, path) - 1]]


def _owner(node: fx.Node) -> str | None:
    """The root's attribute (child, parameter, buffer) a call_module / get_attr node reaches."""
    if node.op in ("call_module", "get_attr"):
        return str(node.target).split(".")[0]
    return None


def _cut_graph(
    model: nn.Module,
    graph: fx.Graph,
    names: list[str],
    kept: int,
    taps: list[str],
    last: bool,
    mode: str,
    used: dict[str, None],
) -> tuple[fx.Graph, str | None]:
    """The graph up to the cut, and the module whose last call makes the value at the cut (None: the
    model's output)."""
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    upto = names[kept - 1]
    output = next(n for n in nodes if n.op == "output")

    def last_call(child: str) -> fx.Node:
        calls = [n for n in nodes if n.op == "call_module" and _owner(n) == child]
        if not calls:
            raise FeatxError(
                f"keep_glue: in {mode} mode the forward of `{type(model).__name__}` never calls `{child}` "
                "(nor any module inside it), so it has no value there; cut at a child it calls"
            )
        return calls[-1]

    if last:  # the cut at the last child is the model's output
        cut_nodes = {**{child: last_call(child) for child in taps}, upto: output.args[0]}
        end = position[output]
    else:
        cut_nodes = {child: last_call(child) for child in [*taps, upto]}
        end = max(position[n] for n in cut_nodes.values())  # type: ignore[index]
        _require_chain(model, nodes, position, names, kept, cut_nodes[upto], end, mode)  # type: ignore[arg-type]
    later = set(names[kept:])
    for node in nodes[: end + 1]:
        if node.op == "call_module" and _owner(node) in later:
            raise FeatxError(
                f"keep_glue: in {mode} mode the forward of `{type(model).__name__}` calls `{node.target}` "
                f"(after the cut at `{upto}`) before the value at the cut is made; cut at "
                f"`{_owner(node)}` or later"
            )
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes[: end + 1]:
        if node.op == "output":
            break
        env[node] = new.node_copy(node, lambda n: env[n])
    values = {child: fx.map_arg(value, lambda n: env[n]) for child, value in cut_nodes.items()}
    new.output(values if taps else values[upto])
    _drop_dead_code(new)
    for node in new.nodes:
        owner = _owner(node)
        if owner is not None:
            used[owner] = None
    new.lint()
    return new, None if last else str(cut_nodes[upto].target)  # type: ignore[union-attr]


def _require_chain(
    model: nn.Module,
    nodes: list[fx.Node],
    position: dict[fx.Node, int],
    names: list[str],
    kept: int,
    cut: fx.Node,
    end: int,
    mode: str,
) -> None:
    """The code after the cut reads nothing made before it but the cut's value, shapes and attributes."""
    meta: set[fx.Node] = set()
    for node in nodes[: end + 1]:
        if _is_meta(node, meta):
            meta.add(node)
    for node in nodes[end + 1 :]:
        for source in node.all_input_nodes:
            if position[source] > end or source is cut or source in meta or source.op == "get_attr":
                continue
            if source.op == "placeholder" and source.args:  # an optional argument: the rest gets it too
                continue
            what = "the model's input" if source.op == "placeholder" else f"`{source.name}`"
            where = "the model's output" if node.op == "output" else f"{_describe(node)}{_line(node)}"
            raise FeatxError(
                f"keep_glue: the data flow of `{type(model).__name__}` is not a chain at the cut at "
                f"`{names[kept - 1]}` ({mode} mode): {where} after the cut also reads {what}, made before "
                "it, so the value at the cut is not all the rest of the forward needs; cut at a later child"
            )


def _is_meta(node: fx.Node, meta: set[fx.Node]) -> bool:
    """A shape, dtype or device, or arithmetic on those: what a tensor is like, not what it holds."""
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in _META_ATTRS
    if node.op == "call_method" and node.target in _META_METHODS:
        return True
    inputs = node.all_input_nodes
    return (
        node.op == "call_function"
        and node.target in _PURE_FUNCTIONS
        and bool(inputs)
        and all(n in meta for n in inputs)
    )


def _drop_dead_code(graph: fx.Graph) -> None:
    for node in reversed(list(graph.nodes)):
        if node.users or node.op in ("output", "placeholder"):
            continue
        pure = (
            node.op == "get_attr"
            or (node.op == "call_function" and node.target in _PURE_FUNCTIONS)
            or (node.op == "call_method" and node.target in _PURE_METHODS)
        )
        if pure:
            graph.erase_node(node)


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"the call of `{node.target}`"
    return f"`{getattr(node.target, '__name__', str(node.target))}`"


def _line(node: fx.Node) -> str:
    """`` (file:line)`` of the model code that made ``node``, from fx's recorded stack."""
    trace = node.stack_trace or ""
    found = re.findall(r'File "([^"]+)", line (\d+)', trace)
    for filename, line in reversed(found):
        if not filename.startswith(_SKIP_DIRS):
            return f" ({_short(filename)}:{line})"
    return ""


def _trace_failure(model: nn.Module, mode: str, err: Exception) -> str:
    """Why fx stopped, and on which line of the model's code."""
    where = ""
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        if not frame.filename.startswith(_SKIP_DIRS) and not frame.filename.startswith("<"):
            code = f" (`{frame.line.strip()}`)" if frame.line else ""
            where = f" at {_short(frame.filename)}:{frame.lineno}{code}"
            break
    return (
        f"keep_glue: torch.fx cannot trace the forward of `{type(model).__name__}` in {mode} mode{where}: "
        f"{type(err).__name__}: {one_line(err)}; keep_glue needs a root forward without data-dependent "
        "control flow — cut without keep_glue"
    )


def _short(filename: str) -> str:
    """A path relative to its ``sys.path`` entry (``timm/models/vision_transformer.py``)."""
    path = os.path.abspath(filename)
    for root in sorted((os.path.abspath(p or os.getcwd()) for p in sys.path), key=len, reverse=True):
        if path.startswith(root + os.sep):
            return os.path.relpath(path, root).replace(os.sep, "/")
    return path
