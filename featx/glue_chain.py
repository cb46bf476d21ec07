"""Whether a container's forward is its children run one after the other (what a plain backbone runs in its
place), or, when not, why: its forward traced with ``torch.fx`` in each mode, as keep_glue traces it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch.fx as fx
from torch import nn

from featx.errors import one_line
from featx.glue_nodes import describe, is_meta, join, line
from featx.glue_state import StateRefused
from featx.glue_trace import defaults, label, trace
from featx.vocab import MODES


class ChainBreak(NamedTuple):
    """Why a container's forward is not its children run one after the other."""

    why: str  # `its forward applies `add` (resnet.py:92)`
    glue_keeps: bool  # keep_glue keeps what the forward does (it refuses a forward that keeps state)


def chain_break(container: nn.Module, prefix: str, units: Sequence[str], whole: bool) -> ChainBreak | None:
    """Why calling ``units`` one after the other (modules inside ``container``, dotted from the root, as a
    plain backbone runs them) would not be what ``container``'s own forward does, or None when it is.

    The forward is traced in each mode (fx, every module it calls a leaf) and must call the units in
    order — a module holding several of them at once counts for those — feeding each what the one before
    returned (the first, its input) and nothing else, with nothing in between but shape reads; with
    ``whole`` (the backbone runs on after the container) it must also end there and return the last unit's
    value. ``nn.Sequential``'s own forward is that chain, and a container without a forward of its own
    (``nn.ModuleList``) has none to differ from. A forward fx cannot trace is not shown to be a chain; one
    that keeps state (``glue_state.Watch``: writes an attribute, has hooks) is none, and keep_glue refuses
    it too (``glue_keeps`` False).
    """
    if type(container).forward in (nn.Sequential.forward, nn.Module.forward):
        return None
    for mode in MODES:
        in_mode = f" in {mode} mode" if mode != MODES[0] else ""
        try:
            graph, _, _ = trace(container, mode, defaults(container), label(container, prefix))
        except StateRefused as err:
            subject = "its forward" if err.forward else "it"
            return ChainBreak(
                f"{subject} {err.what}{in_mode}, which running its children one by one skips", False
            )
        except Exception as err:
            return ChainBreak(
                f"torch.fx cannot trace its forward in {mode} mode to show it does only that "
                f"({type(err).__name__}: {one_line(err)})",
                True,
            )
        why = _chain_break_in(graph, prefix, units, whole)
        if why is not None:
            return ChainBreak(f"its forward {why}{in_mode}", True)
    return None


def _chain_break_in(graph: fx.Graph, prefix: str, units: Sequence[str], whole: bool) -> str | None:
    """``chain_break`` on one traced forward."""
    at = 0  # units[:at] are called, in order
    inert: set[fx.Node] = set()  # shape reads: they neither change nor feed the chain's values
    fed: fx.Node = next(n for n in graph.nodes if n.op == "placeholder")  # what the next unit must get
    for node in graph.nodes:
        if at == len(units) and not whole:
            return None
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            if at < len(units):
                break
            if node.args[0] is not fed:
                return f"returns something other than what `{units[-1]}` returns"
            break
        if node.op == "call_module":
            target = join(prefix, str(node.target))
            covered = 0
            while at + covered < len(units) and (
                units[at + covered] == target or units[at + covered].startswith(target + ".")
            ):
                covered += 1
            if covered == 0:
                where = f"after `{units[-1]}`" if at == len(units) else f"where the chain runs `{units[at]}`"
                return f"calls `{target}`{line(node)} {where}"
            if node.args != (fed,) or node.kwargs:
                given = "its input" if fed.op == "placeholder" else f"what `{units[at - 1]}` returns"
                return f"calls `{target}`{line(node)} with other than {given}"
            at += covered
            fed = node
            continue
        if is_meta(node, inert):  # a shape, or arithmetic on shapes: what a tensor is like
            inert.add(node)
            continue
        # the forward computes with a value itself: a residual's add, a reshape, an in-place write
        return f"applies {describe(node)}{line(node)}"
    if at < len(units):
        return f"never calls `{units[at]}`"
    return None
