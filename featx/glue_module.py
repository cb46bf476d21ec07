"""The module a keep_glue cut is: ``KeepGlue`` runs the traced graph of the mode it is in on the model's own
modules (registered as the model has them, ``_populate``; the modules of a container the graph reaches into
without calling it held by a ``_Kept``), takes only the arguments it was traced with and checks after each
call that the attributes its graph holds as constants still hold. ``own_forward`` gives each instance a
``forward`` of its own for ``torch.compile``; ``captured`` copies a tapped value as it is made.
``featx.glue_cut`` makes these modules from a traced forward.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from featx.glue_state import Read, require_reads_hold, traced_arguments
from featx.glue_trace import label
from featx.truncated_model import TruncatedModel


def captured(value: Any) -> Any:
    """``value`` as it is now: each tensor in it cloned (gradients flow through the clone), so that an
    in-place op later in the forward (``ReLU(inplace=True)`` after a tapped ``bn1``) cannot change what a
    tap holds."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, value)


_ABSENT = object()


class KeepGlue(TruncatedModel):
    """The kept part of a model with the root's glue: returns what the full model computes at the cut. It is
    a ``featx.TruncatedModel`` (``upto``: the cut as resolved; ``keep_glue``: True), as the plain cut is.

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
    ``code`` holds each mode's Python, for reading. Made with ``lazy=True`` (the modules a sweep proves,
    which no caller gets) each mode's Python is generated when that mode first runs or is read.

    It takes the arguments of the forward it stands for: an optional one only at the value it was traced
    with (its default), anything else is refused. After each call it checks that the plain attributes its
    graph holds as constants (``reads``) still hold them, and raises ``FeatxError`` naming the attribute
    where one does not (a child's forward left another value behind, or the caller changed it).

    It compiles whole (``torch.compile(keep, fullgraph=True)``) and exports (``torch.export.export``): the
    check of ``reads`` is traced into guards on those attributes (``glue_state.require_reads_hold``), and
    each instance has a ``forward`` of its own (``own_forward``), so that every cut gets its own graphs.
    """

    keep_glue = True

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
        *,
        lazy: bool = False,
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
        # each mode's Python and its compiled forward; made lazily, each mode's graph until then
        self._code: dict[str, str] = {}
        self._forwards: dict[str, Any] = {}
        self._graphs: dict[str, fx.Graph] = dict(graphs)
        self._named = type(model).__name__
        if not lazy:
            for mode in graphs:
                self._forward_of(mode)
            self._graphs = {}
        own_forward(self)

    @property
    def code(self) -> dict[str, str]:
        """Each mode's Python, for reading."""
        for mode in self._graphs:
            self._forward_of(mode)
        return dict(self._code)

    def _forward_of(self, mode: str) -> Any:
        """The compiled forward of ``mode``'s graph, made on first use."""
        made = self._forwards.get(mode)
        if made is None:
            python = self._graphs[mode].python_code(root_module="self")
            namespace = dict(python.globals)
            exec(
                compile(python.src, f"<featx keep_glue {mode} forward of {self._named}>", "exec"),
                namespace,
            )
            self._code[mode] = python.src
            made = self._forwards[mode] = namespace["forward"]
        return made

    def tensors_read(self) -> list[Any] | None:
        """What each mode's graph reads by ``get_attr`` (parameters, buffers, fx's constants), for a lazy
        module, which holds its graphs; None for another, or where a target does not resolve."""
        if not self._graphs:
            return None
        found = []
        for graph in self._graphs.values():
            for node in graph.nodes:
                if node.op == "get_attr":
                    value: Any = self
                    for part in str(node.target).split("."):
                        value = getattr(value, part, _ABSENT)
                        if value is _ABSENT:
                            return None
                    found.append(value)
        return found

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        mode = "train" if self.training else "eval"
        if kwargs or len(args) > 1:  # an optional argument: only the value the forward was traced with
            args, kwargs = traced_arguments(
                self.signature, self.arguments.get(mode, {}), self.upto, self.where, args, kwargs
            )
        forward = self._forwards.get(mode)
        out = (forward or self._forward_of(mode))(self, *args, **kwargs)
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
