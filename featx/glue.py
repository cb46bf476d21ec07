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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from featx.cut import CutPath, child_names, resolve_path
from featx.errors import FeatxError
from featx.glue_cut import _keep
from featx.glue_module import KeepGlue as KeepGlue  # featx.glue.KeepGlue, as the docs name it
from featx.glue_state import Read
from featx.glue_trace import Traced, defaults, label, trace, trace_failure
from featx.vocab import MODES


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
        lazy: bool = False,
    ) -> KeepGlue:
        """The module computing the value at ``path`` (a ``CutPath`` resolved against this model, used as
        it is; or ``upto`` as ``truncate`` takes it: a child name, a count, a dotted path such as
        ``stages.2``, resolved here), and with ``taps`` (dotted module names the cut runs)
        the value of each tapped module too: then it returns ``{name: value}``, the cut's last.

        At the last child the value is the model's output, the glue after the child included, as
        ``truncate`` promises; with ``model_output=False`` it is what that child returns, as a backbone's
        tap is (the glue after it is dropped). With ``lazy`` each mode's Python is generated when that
        mode first runs (for modules only featx runs: a sweep's, which no caller gets).

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
            self,
            "",
            self.model,
            self.graphs,
            self.constants,
            self.reads,
            arguments,
            cut.upto,
            taps,
            last,
            lazy,
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


def keep_glue(
    model: nn.Module, upto: CutPath | str | int, leaf_functions: Sequence[Callable[..., Any]] = ()
) -> KeepGlue:
    """``featx.truncate(model, upto, keep_glue=True, leaf_functions=...)``: see ``KeepGlue``."""
    return trace_root(model, leaf_functions).cut(upto)
