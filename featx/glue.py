"""keep_glue: a truncation that computes what the full model computes at the cut, the root's glue included.

The glue comes from the model's own ``forward()``, not from per-model code. Only the root is traced with
``torch.fx``: every module the root calls is a leaf, so nothing inside a block needs to be traceable. The
graph is traced once per mode (``self.training`` and Python branches are baked in at trace time), cut
after the last call of the kept child — or of any module inside it, for roots that call grandchildren
themselves (``for blk in self.blocks: x = blk(x)`` in timm's ViT, EVA, CaiT) — and its dead code dropped.
The result runs the graph of the mode it is in.

A dotted cut (``stages.2``, ``layer1.0.conv2``) is made level by level: each container on the path that
the graph calls (``stages``, ``layer1``, the block ``layer1.0``) has its own forward traced the same way
(its children leaves) and cut after its call of the module on the path; the call of the container in its
parent's graph becomes a call of that cut, and the parent's graph is cut right after it. A root that calls
the named module itself (``blocks.4`` of ``for blk in self.blocks``) is cut right after that call. So the
container's own glue (a forward that does more than call its children in order) is kept as the root's is.

Cutting a graph keeps every node up to the cut's (and the last tap's) and nothing after it, so the value
at the cut is computed by exactly the code the full forward ran to make it, and no more. That is all a
cut needs: what the code after the cut reads does not matter to the value at it. In a residual block
``conv2``'s value needs only the path to it; the add that later reads the block's input is dead code for
that cut, as in torchvision's ``create_feature_extractor``. (featx once required the data flow to be a
chain at the cut — nothing after it reading anything made before it but the cut's value — as if the rest
of the forward had to continue from the cut. No caller does: the module returns the value and stops.)
Module calls before the cut whose values the cut does not need (``conv1``..``bn3`` of a Bottleneck cut at
``downsample``) still run, as in the full forward, since a call may update BN statistics or draw random
numbers; the cut's own value is copied as it is made when the graph runs on past it for a later tap.

What ``keep_glue`` assumes, and does not check: the root's forward (and each traced container's) takes the
same Python path for every input of the shapes it is used with (fx records one path). What it checks,
raising ``FeatxError`` rather than returning something wrong: the root and each container on the path
trace; the cut module is called, and a container on the path exactly once; a module inside a child that
is cut or tapped is called once by its container's forward (a block's ``relu`` called before and after
the add has no one value: torchvision names each call, featx refuses to guess); no child after the cut is
called by the root before the cut's value is made (inside a child, the modules the forward runs before
the cut are kept whatever order they were registered in: a Bottleneck registers ``relu`` after ``bn3``);
and no buffer read before the cut is updated in place after it. Module state
the graph cannot hold is watched while tracing (``featx.glue_state``): a forward that writes an attribute
of any module, changes a list, dict or plain tensor attribute, switches autograd or has hooks of its own is
refused, naming the attribute and the line; buffers are graph values, so an in-place update of one is kept
and runs in the mode it was traced in; a plain attribute the graph holds as a constant (``self.stem.hw``,
``self.drop_rate``) is checked after every call, and the module refuses once it holds another value; an
optional argument is taken at the value it was traced with and refused at any other. Tracing runs under
the guard that protects ``verify`` (``featx.guard.preserved``), so the model is left exactly as found.
``featx.verify(..., keep_glue=True)`` then proves the result against the full model.
"""

from __future__ import annotations

import inspect
import operator
import types
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from featx.cut import CutPath, child_names, resolve_path
from featx.errors import FeatxError, listing
from featx.glue_nodes import PURE_FUNCTIONS, PURE_METHODS, join, line
from featx.glue_state import Read, require_reads_hold, traced_arguments
from featx.glue_trace import Traced, concrete, defaults, label, trace, trace_failure
from featx.vocab import MODES

_VALUE = ""  # the key of a container's own value in the dict its keep_glue module returns with taps


_INPLACE_OPERATORS = frozenset(
    getattr(operator, f"i{n}")
    for n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or")
)


@dataclass(frozen=True)
class RootTrace:
    """The root's forward traced once per mode. ``cut`` makes a ``KeepGlue`` from it, many times over;
    the containers a nested cut passes through are traced when a cut first needs them, and kept."""

    model: nn.Module
    graphs: Mapping[str, fx.Graph]  # mode -> the whole forward
    constants: Mapping[str, torch.Tensor]  # tensors fx made attributes of (``_tensor_constant0``)
    # mode -> the plain attributes the graph baked in, which the cut checks after every call
    reads: Mapping[str, tuple[Read, ...]] = field(default_factory=dict)
    leaf_functions: tuple[Callable[..., Any], ...] = ()  # functions the traces keep whole
    # (container, mode, its traced arguments) -> its graph, constants and reads, or why it does not trace
    containers: dict[tuple[str, str, str], Traced | str] = field(
        default_factory=dict, repr=False, compare=False
    )

    def cut(
        self,
        path: CutPath | str | int,
        taps: Sequence[str] = (),
        *,
        model_output: bool = True,
    ) -> KeepGlue:
        """The module computing the value at ``path`` (a ``CutPath`` resolved against this model, used as
        it is; or ``upto`` as ``truncate`` takes it: a child name, a count, a dotted path such as
        ``stages.2``, resolved here), and with ``taps`` (dotted module names the cut runs)
        the value of each tapped module too: then it returns ``{name: value}``, the cut's last.

        At the last child the value is the model's output, the glue after the child included, as
        ``truncate`` promises; with ``model_output=False`` it is what that child returns, as a backbone's
        tap is (the glue after it is dropped).

        The value at a dotted cut is what the named module returns (its last call) in the full forward.
        The root's graph is cut after the call of the container on the path (``stages``), and that call
        runs the container's own forward, traced the same way and cut after its child (``stages.2``),
        level by level; a root that calls the named module itself (``for blk in self.blocks``) is cut
        right after that call.

        Raises:
            FeatxError: the cut module is never called, a container on the path does not trace or is
                called more than once, a cut or tapped module inside a child is called more than once,
                a child after the cut runs before it.
        """
        cut = path if isinstance(path, CutPath) else resolve_path(self.model, path)
        last = model_output and not cut.nested and cut.kept == len(child_names(self.model))
        taps = [str(t) for t in dict.fromkeys(taps) if str(t) != cut.upto]
        arguments = {mode: defaults(self.model) for mode in self.graphs}
        return _keep(
            self, "", self.model, self.graphs, self.constants, self.reads, arguments, cut.upto, taps, last
        )

    def container(self, name: str, module: nn.Module, mode: str, concrete: dict[str, Any]) -> Traced:
        """The forward of the container ``name`` traced in ``mode``, every module it calls a leaf."""
        key = (name, mode, repr(sorted(concrete.items())))
        if key not in self.containers:
            try:
                self.containers[key] = trace(module, mode, concrete, label(module, name), self.leaf_functions)
            except FeatxError as err:  # state the trace cannot see
                self.containers[key] = str(err)
            except Exception as err:
                self.containers[key] = trace_failure(module, mode, err, name)
        found = self.containers[key]
        if isinstance(found, str):
            raise FeatxError(found)
        return found


def trace_root(model: nn.Module, leaf_functions: Sequence[Callable[..., Any]] = ()) -> RootTrace:
    """Trace the root's forward with ``torch.fx`` in eval and in train mode, every called module a leaf,
    and every function of ``leaf_functions`` the forward calls kept whole (one node, run as it is: a
    function that converts a tensor, ``int(x)``, or one fx cannot trace through).

    The model is left as found: traced under the guard, with fx's constants moved off the root.

    Raises:
        FeatxError: fx cannot trace the root's own code, naming the line it stopped on; or the forward
            keeps state the graph cannot hold (writes module attributes, switches autograd, has hooks:
            see ``featx.glue_state.Watch``), naming the attribute and the line.
    """
    if not isinstance(model, nn.Module):
        raise FeatxError(f"model is a {type(model).__name__}; expected a torch.nn.Module")
    leaves = _leaf_functions(leaf_functions)
    graphs: dict[str, fx.Graph] = {}
    constants: dict[str, torch.Tensor] = {}
    reads: dict[str, tuple[Read, ...]] = {}
    for mode in MODES:
        try:
            graphs[mode], found, reads[mode] = trace(model, mode, defaults(model), label(model, ""), leaves)
        except FeatxError:  # state the trace cannot see, named by the watch
            raise
        except Exception as err:
            raise FeatxError(trace_failure(model, mode, err, "")) from None
        constants.update(found)
    return RootTrace(model, graphs, constants, reads, leaves)


def leaf_functions_for(
    functions: Sequence[Callable[..., Any]], keep_glue: bool
) -> tuple[Callable[..., Any], ...]:
    """``leaf_functions`` as ``truncate``, ``verify`` and ``sweep`` take them: a tuple of functions, for a
    ``keep_glue`` cut only (a cut without keep_glue traces nothing, so they would silently do nothing).

    Raises:
        FeatxError: leaf functions without ``keep_glue``, or something that is not a function.
    """
    if functions and not keep_glue:
        raise FeatxError(
            "leaf_functions are kept whole by keep_glue's trace, and a cut without keep_glue traces nothing; "
            "pass keep_glue=True or drop leaf_functions"
        )
    return _leaf_functions(functions)


def _leaf_functions(functions: Sequence[Callable[..., Any]]) -> tuple[Callable[..., Any], ...]:
    """``leaf_functions`` as a tuple of functions; anything else refused, naming it."""
    if callable(functions) or isinstance(functions, (str, bytes)):  # one function, not a sequence of them
        functions = (functions,)
    leaves = tuple(functions)
    for f in leaves:
        if not callable(f):
            raise FeatxError(
                f"leaf_functions holds {f!r}, which is not a function; accepted: functions the forward "
                "calls (a builtin such as `int`, or your own), kept whole by the trace"
            )
    return leaves


def captured(value: Any) -> Any:
    """``value`` as it is now: each tensor in it cloned (gradients flow through the clone), so that an
    in-place op later in the forward (``ReLU(inplace=True)`` after a tapped ``bn1``) cannot change what a
    tap holds."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, value)


def keep_glue(
    model: nn.Module, upto: CutPath | str | int, leaf_functions: Sequence[Callable[..., Any]] = ()
) -> KeepGlue:
    """``featx.truncate(model, upto, keep_glue=True, leaf_functions=...)``: see ``KeepGlue``."""
    return trace_root(model, leaf_functions).cut(upto)


class KeepGlue(nn.Module):
    """The kept part of a model with the root's glue: returns what the full model computes at the cut.

    At a cut before the last child that is the value the kept child returns (the last call of it, or of a
    module inside it) in the full forward; at a dotted cut (``stages.2``), what that module returns; at the
    last child, the model's output. The kept modules are the model's own module objects under their own
    names, and the root parameters and buffers the glue reads (``cls_token``, ``pos_embed``) keep theirs,
    so ``state_dict()`` keys are a subset of the model's. A container a dotted cut passes through is itself
    a ``KeepGlue`` of that container's forward, cut after its child on the path (its glue kept too); a
    container the root reaches into without calling it (``blocks`` of ``for blk in self.blocks``) holds
    just the modules the graph calls. It comes back in the mode of the module it stands for (the model;
    a nested one, its container), the kept modules in their own, so a model with norms held in eval
    stays so. ``train()``/``eval()`` reach the kept modules as usual, and ``forward`` runs the graph
    traced in the mode the module is in, so mode-dependent glue (``F.dropout(x,
    training=self.training)``) behaves, and draws random numbers, as in the full model.
    ``code`` holds each mode's Python, for reading.

    It takes the arguments of the forward it stands for: an optional one only at the value it was traced
    with (its default), anything else is refused. After each call it checks that the plain attributes its
    graph holds as constants (``reads``) still hold them, and raises ``FeatxError`` naming the attribute
    where one does not (a child's forward left another value behind, or the caller changed it).

    It compiles whole (``torch.compile(keep, fullgraph=True)``) and exports (``torch.export.export``): the
    check of ``reads`` is traced into guards on those attributes (``glue_state.require_reads_hold``), and
    each instance has a ``forward`` of its own (``own_forward``), so that every cut gets its own graphs.
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
        containers: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        # the mode of the module it stands for: the graph it runs is picked by this flag, so an eval
        # model's cut runs the eval graph as it comes back (the kept modules keep their own flags)
        self.training = model.training
        self.upto = upto
        self.taps: Collection[str] = tuple(taps)  # the tapped modules (GlueBackbone: module -> output names)
        # mode -> the module whose last call in the full forward makes the value at the cut (the child, or
        # a module inside it the root calls itself); None where the cut is the model's output
        self.cut_at: dict[str, str | None] = {}
        # containers whose children a recording must track to have that value (a container on the path
        # that calls its grandchildren itself); the root's own calls are recorded anyway
        self.tracks: tuple[str, ...] = ()
        self.source_class = f"{type(model).__module__}.{type(model).__qualname__}"
        _populate(self, model, set(kept), set(used), dict(containers or {}))
        for name in used:
            if "." in name or name in self._parameters or name in self._buffers or name in self._modules:
                continue
            if name in constants:  # no state_dict key: fx made it from a plain tensor
                self.register_buffer(name, constants[name], persistent=False)
            elif not hasattr(self, name):  # a plain attribute of the root the glue reads
                object.__setattr__(self, name, getattr(model, name))
        # The forward's signature, the arguments each mode's graph was traced with at a fixed value, and the
        # plain attributes each mode's graph holds as constants (set by ``_keep``): what ``forward`` checks.
        self.where = label(model, "")
        self.signature: inspect.Signature | None = None
        self.arguments: dict[str, dict[str, Any]] = {}
        self.reads: dict[str, tuple[Read, ...]] = {}
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
        own_forward(self)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        mode = "train" if self.training else "eval"
        if kwargs or len(args) > 1:  # an optional argument: only the value the forward was traced with
            args, kwargs = traced_arguments(
                self.signature, self.arguments.get(mode, {}), self.upto, self.where, args, kwargs
            )
        out = self._forwards[mode](self, *args, **kwargs)
        require_reads_hold(self.reads.get(mode, ()), self.where)  # the constants the graph holds still hold
        return out

    def extra_repr(self) -> str:
        return f"upto={self.upto!r}, keep_glue=True" + (f", taps={list(self.taps)}" if self.taps else "")


def own_forward(module: nn.Module) -> None:
    """Give ``module`` a ``forward`` whose code object is its own: a copy of its class's, bound to it.

    ``torch.compile`` keeps the graphs it compiles on the code object of the frame it enters, at most
    ``torch._dynamo.config.recompile_limit`` (8) of them. Every ``KeepGlue`` runs graphs of its own (a guard
    on each fails for every other), so with the class's one ``forward`` the ninth cut compiled in a process
    (sooner: each mode and input shape takes one) failed under ``fullgraph=True`` and ran eagerly without
    it. fx's ``GraphModule`` avoids the same with a class per instance. ``copy.deepcopy`` binds the copy's
    forward to the copy (the code object shared)."""
    function = type(module).forward
    own = types.FunctionType(
        function.__code__.replace(),  # a new code object: a cache of its own
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,  # `super()` in a subclass's forward
    )
    own.__qualname__ = function.__qualname__
    own.__doc__ = function.__doc__
    module.__dict__["forward"] = types.MethodType(own, module)


class _Kept(nn.Module):
    """The kept modules of a container the graph reaches into without calling it (``blocks.0``..``blocks.4``
    of a ModuleList the root iterates): the same objects under the same names. Never called itself."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.training = source.training  # as the container it holds the modules of
        self.source_class = type(source).__name__

    def extra_repr(self) -> str:
        return f"kept modules of a {self.source_class}"


def _populate(
    keep: nn.Module, source: nn.Module, whole: set[str], needed: set[str], containers: dict[str, nn.Module]
) -> None:
    """Register on ``keep``, in ``source``'s order (so ``state_dict()`` lists keys as the model does), the
    parameters, buffers and modules of ``source`` that are ``whole`` (children kept as they are) or
    ``needed`` (dotted names the graph reads or calls), and ``containers`` (dotted name -> the module
    that stands in for it)."""
    for name, param in source._parameters.items():
        if name in needed and param is not None:
            keep.register_parameter(name, param)
    for name, buf in source._buffers.items():
        if name in needed and buf is not None:
            keep.register_buffer(name, buf, persistent=name not in source._non_persistent_buffers_set)
    for name, child in source._modules.items():
        if child is None:
            continue
        inner = name + "."
        deeper = {k[len(inner) :]: v for k, v in containers.items() if k.startswith(inner)}
        if name in containers:
            keep.add_module(name, containers[name])
        elif (name in whole or name in needed) and not deeper:
            keep.add_module(name, child)
        else:
            below = {n[len(inner) :] for n in needed if n.startswith(inner)}
            if below or deeper:
                holder = _Kept(child)
                _populate(holder, child, set(), below, deeper)
                keep.add_module(name, holder)


# -- cutting a traced graph ----------------------------------------------------------------------------


def _relative(prefix: str, name: str) -> str:
    return name[len(prefix) + 1 :] if prefix else name


def _keep(
    trace: RootTrace,
    prefix: str,
    module: nn.Module,
    graphs: Mapping[str, fx.Graph],
    constants: Mapping[str, torch.Tensor],
    reads: Mapping[str, tuple[Read, ...]],
    arguments: Mapping[str, dict[str, Any]],
    cut: str | None,
    taps: list[str],
    last: bool,
) -> KeepGlue:
    """The ``KeepGlue`` of one level: ``module`` (dotted name ``prefix``, "" the root) run by its own traced
    forward up to the module ``cut`` (dotted from the root; None: the whole forward, for taps inside it),
    returning the cut's value — with ``taps``, a dict of their values too (under ``_VALUE`` for the cut's
    at a container). ``last``: the root's cut at its last child, which is the model's output.

    A wanted module the graph calls (or calls modules inside of) is cut after that call's last; one
    inside a container the graph calls is delegated to that container, made a ``KeepGlue`` of its own
    (recursively), which the graph then calls instead.
    """
    where = label(module, prefix)
    wanted = [*taps, *([cut] if cut is not None else [])]
    found = {mode: _resolve(prefix, graph, wanted, mode, where) for mode, graph in graphs.items()}
    for mode, resolved in found.items():
        _require_taps_whole(resolved, cut, taps, mode)
    # container (relative target) -> the cut (or None) and the taps it is asked for, the same in every mode
    delegated: dict[str, tuple[str | None, tuple[str, ...]]] = {}
    for mode, resolved in found.items():
        asks: dict[str, tuple[str | None, tuple[str, ...]]] = {}
        for name in wanted:
            container = resolved[name][1]
            if container is not None:
                sub_cut, sub_taps = asks.get(container, (None, ()))
                asks[container] = (name, sub_taps) if name == cut else (sub_cut, (*sub_taps, name))
        if mode == next(iter(found)):
            delegated = asks
        elif asks != delegated:
            raise FeatxError(
                f"keep_glue: the forward of {where} reaches {listing(wanted)} through other calls in {mode} "
                f"mode than in {next(iter(found))} mode; keep_glue needs one path in every mode: cut without "
                "keep_glue"
            )
    subs: dict[str, KeepGlue] = {}
    for container, (sub_cut, sub_taps) in delegated.items():
        name = join(prefix, container)
        inner = module.get_submodule(container)
        sub_graphs: dict[str, fx.Graph] = {}
        sub_constants: dict[str, torch.Tensor] = {}
        sub_reads: dict[str, tuple[Read, ...]] = {}
        sub_arguments: dict[str, dict[str, Any]] = {}  # per mode: the caller may pass `self.training`
        for mode, resolved in found.items():
            call = next(node for node, c in resolved.values() if c == container)
            sub_arguments[mode] = concrete(inner, call)
            sub_graphs[mode], made, sub_reads[mode] = trace.container(name, inner, mode, sub_arguments[mode])
            sub_constants.update(made)
        subs[container] = _keep(
            trace,
            name,
            inner,
            sub_graphs,
            sub_constants,
            sub_reads,
            sub_arguments,
            sub_cut,
            list(sub_taps),
            False,
        )

    graphs_cut: dict[str, fx.Graph] = {}
    used: dict[str, None] = {}
    cut_at: dict[str, str | None] = {}
    for mode, graph in graphs.items():
        graphs_cut[mode] = _cut_graph(
            module, prefix, graph, found[mode], subs, delegated, cut, taps, last, mode, where
        )
        for node in graphs_cut[mode].nodes:
            if node.op in ("call_module", "get_attr"):
                used[str(node.target)] = None
        if cut is None or last:
            cut_at[mode] = None
        else:
            node, container = found[mode][cut]
            cut_at[mode] = (
                join(prefix, str(node.target)) if container is None else subs[container].cut_at[mode]
            )
    names = child_names(module)
    if cut is None:
        kept = names
    else:
        first = _relative(prefix, cut).split(".")[0]
        kept = names[: names.index(first) + (1 if _relative(prefix, cut) == first else 0)]
    keep = KeepGlue(module, graphs_cut, kept, list(used), constants, cut or prefix, taps, subs)
    keep.cut_at = cut_at
    keep.where = where
    keep.reads = dict(reads)
    keep.arguments = {mode: dict(values) for mode, values in arguments.items()}
    try:
        keep.signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        keep.signature = None
    if cut is not None and not last:
        node, container = found[next(iter(found))][cut]
        if container is not None:
            keep.tracks = subs[container].tracks
        elif prefix:  # the recording tracks the children of each container down to the one called here
            target = join(prefix, str(node.target)).split(".")
            keep.tracks = tuple(".".join(target[:i]) for i in range(1, len(target)))
    return keep


def _resolve(
    prefix: str, graph: fx.Graph, wanted: list[str], mode: str, where: str
) -> dict[str, tuple[fx.Node, str | None]]:
    """For each wanted module (dotted from the root): the node whose value it is — the last call of it or of
    a module inside it — and None; or the one call of the container it lies in, and that container's
    target (relative to this level)."""
    calls = [n for n in graph.nodes if n.op == "call_module"]
    out: dict[str, tuple[fx.Node, str | None]] = {}
    for name in wanted:
        r = _relative(prefix, name)
        direct = [n for n in calls if n.target == r or str(n.target).startswith(r + ".")]
        around = [n for n in calls if r.startswith(str(n.target) + ".")]
        if direct and around:
            raise FeatxError(
                f"keep_glue: in {mode} mode the forward of {where} calls both `{join(prefix, str(around[0].target))}`"
                f"{line(around[0])} and `{join(prefix, str(direct[0].target))}`{line(direct[0])} inside it, "
                f"so the value at `{name}` is not one module's: cut at `{join(prefix, str(around[0].target))}` "
                "or without keep_glue"
            )
        if direct:
            itself = [n for n in direct if n.target == r]
            if len(itself) > 1 and "." in name:
                # a module a block calls again (torchvision's BasicBlock `relu`, before and after the add)
                # returns other values; which one a cut or tap means is a guess, so it is not made
                lines = ", ".join(line(n).strip(" ()") or "?" for n in itself)
                raise FeatxError(
                    f"keep_glue: in {mode} mode the forward of {where} calls `{name}` {len(itself)} times "
                    f"({lines}), so it has no one value; cut or tap a module called once (such as "
                    f"`{prefix or name.rsplit('.', 1)[0]}`), or without keep_glue"
                )
            out[name] = (direct[-1], None)
            continue
        if not around:
            what = "child" if not prefix else "module"
            raise FeatxError(
                f"keep_glue: in {mode} mode the forward of {where} never calls `{name}` (nor any module "
                f"inside it), so it has no value there; cut at a {what} it calls"
            )
        targets = list(dict.fromkeys(str(n.target) for n in around))
        container = join(prefix, targets[0])
        if len(targets) > 1:
            raise FeatxError(
                f"keep_glue: in {mode} mode the forward of {where} calls both `{container}` and "
                f"`{join(prefix, targets[1])}`, which both hold `{name}`; cut at `{container}` or without "
                "keep_glue"
            )
        if len(around) > 1:
            lines = ", ".join(line(n).strip(" ()") or "?" for n in around)
            raise FeatxError(
                f"keep_glue: in {mode} mode the forward of {where} calls the container `{container}` "
                f"{len(around)} times ({lines}), so `{name}` inside it has no one value; keep_glue cuts "
                f"inside a container called once: cut at `{container}` or without keep_glue"
            )
        out[name] = (around[0], targets[0])
    return out


def _require_taps_whole(
    resolved: dict[str, tuple[fx.Node, str | None]], cut: str | None, taps: list[str], mode: str
) -> None:
    """A tap is what its module returns in the full forward: a container the cut goes into returns it
    after the cut, so the cut has no such value."""
    if cut is None or resolved[cut][1] is None:
        return
    inside = resolved[cut][0]
    for tap in taps:
        node, container = resolved[tap]
        if node is inside and container is None:
            raise FeatxError(
                f"keep_glue: tap `{tap}` is what `{tap}` returns, which the full forward makes after the cut "
                f"at `{cut}` inside it ({mode} mode); tap a module the cut runs whole, or cut at `{tap}`"
            )


def _cut_graph(
    module: nn.Module,
    prefix: str,
    graph: fx.Graph,
    resolved: dict[str, tuple[fx.Node, str | None]],
    subs: dict[str, KeepGlue],
    delegated: dict[str, tuple[str | None, tuple[str, ...]]],
    cut: str | None,
    taps: list[str],
    last: bool,
    mode: str,
    where: str,
) -> fx.Graph:
    """One mode's graph of one level up to the cut, its dead code dropped."""
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    output = next(n for n in nodes if n.op == "output")
    if cut is None or last:  # the whole forward: a container run for taps inside it, the model's output
        end = position[output]
    else:
        # Everything the forward runs up to the cut's (or the last tap's) node is kept, and nothing after it:
        # the value at the cut needs only the graph up to it. What the code after it reads (a residual's
        # input) is dead code for this cut, as in torchvision's `create_feature_extractor`.
        end = max(position[resolved[name][0]] for name in [*taps, cut])
        if not prefix:  # inside a child the modules run are kept whatever order they are registered in
            _require_later_uncalled(module, prefix, nodes[: end + 1], cut, mode, where)
        _require_state_kept(prefix, nodes[: end + 1], nodes[end + 1 :], cut, mode, where)
    tapped = {node for node, container in resolved.values() if container is not None and subs[container].taps}
    # a tap this level's graph makes is copied as soon as it is made: a later call (a module, or the glue)
    # may write to it in place; a tap inside a container is copied by the container's own graph
    direct = {resolved[name][0] for name in taps if resolved[name][1] is None}
    # so is the cut's value when the graph runs on past it (a tap the forward makes later, as a block's
    # `act2` registered before `downsample` but called after it): what runs later may write to it in place
    held = resolved[cut][0] if cut is not None and not last and position[resolved[cut][0]] < end else None
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    raw: dict[fx.Node, fx.Node] = {}  # a container call whose module returns a dict, as copied
    copies: dict[fx.Node, fx.Node] = {}  # a tapped node -> its copy, made right after it
    held_copy: fx.Node | None = None
    for node in nodes[: end + 1]:
        if node.op == "output":
            break
        env[node] = new.node_copy(node, lambda n: env[n])
        if node in tapped:
            raw[node] = env[node]
            env[node] = new.call_function(operator.getitem, (raw[node], _VALUE))
        if node in direct:
            copies[node] = new.call_function(captured, (env[node],))
        if held is not None and node is held:
            held_copy = new.call_function(captured, (env[node],))

    def value(name: str) -> Any:
        node, container = resolved[name]
        if container is not None and delegated[container][0] != name:  # a tap inside the container
            return new.call_function(operator.getitem, (raw[node], name))
        return env[node]

    values = {name: copies[resolved[name][0]] if resolved[name][1] is None else value(name) for name in taps}
    whole = fx.map_arg(output.args[0], lambda n: env[n]) if cut is None or last else None
    at = whole if cut is None or last else held_copy if held_copy is not None else value(cut)
    if prefix:
        new.output({**values, _VALUE: at} if taps else at)
    else:  # the root always has a cut; its taps come back under their names, the cut's last
        new.output({**values, str(cut): at} if taps else at)
    _drop_dead_code(new)
    new.lint()
    return new


def _require_state_kept(
    prefix: str, kept: list[fx.Node], dropped: list[fx.Node], cut: str, mode: str, where: str
) -> None:
    """A buffer or parameter the forward updates in place after the cut is not one the code before the
    cut reads: the cut would read it without ever advancing it, as the full model does on each call."""
    read = {str(n.target) for n in kept if n.op == "get_attr"}
    for node in dropped:
        state = _written_state(node)
        if state is not None and state in read:
            raise FeatxError(
                f"keep_glue: in {mode} mode the forward of {where} updates `{join(prefix, state)}` in place"
                f"{line(node)} after the cut at `{cut}`, and reads it before the cut, which would never "
                f"advance it as the model does; cut after that update, or without keep_glue"
            )


def _written_state(node: fx.Node) -> str | None:
    """The attribute (``steps``) an in-place op (``self.steps.add_(1)``, ``+=``) writes, through views."""
    method = str(node.target) if node.op == "call_method" else ""
    inplace = (method.endswith("_") and not method.endswith("__")) or (
        node.op == "call_function" and node.target in _INPLACE_OPERATORS
    )
    if not inplace or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    base: fx.Node = node.args[0]
    while (
        base.op == "call_method"
        and base.target in PURE_METHODS
        and base.args
        and isinstance(base.args[0], fx.Node)
    ):
        base = base.args[0]
    return str(base.target) if base.op == "get_attr" else None


def _require_later_uncalled(
    module: nn.Module, prefix: str, nodes: list[fx.Node], cut: str, mode: str, where: str
) -> None:
    """No module after the cut (at any level of the path, as far as this module's graph sees) is called
    before the value at the cut is made."""
    later: list[str] = []
    inner, done = module, ""
    for segment in _relative(prefix, cut).split("."):
        names = child_names(inner)
        later += [join(done, n) for n in names[names.index(segment) + 1 :]]
        done = join(done, segment)
        inner = dict(inner.named_children())[segment]
    for node in nodes:
        if node.op != "call_module":
            continue
        target = str(node.target)
        hit = next((n for n in later if target == n or target.startswith(n + ".")), None)
        if hit is not None:
            raise FeatxError(
                f"keep_glue: in {mode} mode the forward of {where} calls `{join(prefix, target)}` (after the "
                f"cut at `{cut}`) before the value at the cut is made; cut at `{join(prefix, hit)}` or later"
            )


def _drop_dead_code(graph: fx.Graph) -> None:
    for node in reversed(list(graph.nodes)):
        if node.users or node.op in ("output", "placeholder"):
            continue
        pure = (
            node.op == "get_attr"
            or (node.op == "call_function" and node.target in PURE_FUNCTIONS)
            or (node.op == "call_method" and node.target in PURE_METHODS)
        )
        if pure:
            graph.erase_node(node)
