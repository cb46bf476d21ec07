"""Cutting a traced forward (``featx.glue`` traces it): ``_keep`` makes the ``KeepGlue`` of one level, the
graph of each mode kept up to the cut's node (and the last tap's) and its dead code dropped
(``_cut_graph``), a module on the path inside a container delegated to that container's own ``KeepGlue``,
traced the same way. Before cutting it checks, refusing in one line: which node is the value at each cut
or tap and that the value is one module's (``_resolve``, ``_require_taps_whole``), that no child after the
cut runs before it (``_require_later_uncalled``), and that no state read before the cut is updated in place
after it (``_require_state_kept``).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from featx.cut import child_names
from featx.errors import FeatxError, listing
from featx.glue_module import KeepGlue, captured
from featx.glue_nodes import PURE_FUNCTIONS, PURE_METHODS, join, line
from featx.glue_state import Read
from featx.glue_trace import concrete, label

if TYPE_CHECKING:
    from featx.glue import RootTrace

_VALUE = ""  # the key of a container's own value in the dict its keep_glue module returns with taps


_INPLACE_OPERATORS = frozenset(
    getattr(operator, f"i{n}")
    for n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or")
)


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
    lazy: bool = False,
) -> KeepGlue:
    """The ``KeepGlue`` of one level: ``module`` (dotted name ``prefix``, "" the root) run by its own traced
    forward up to the module ``cut`` (dotted from the root; None: the whole forward, for taps inside it),
    returning the cut's value — with ``taps``, a dict of their values too (under ``_VALUE`` for the cut's
    at a container). ``last``: the root's cut at its last child, which is the model's output. ``lazy``:
    each level's Python is generated when it first runs (``KeepGlue``).

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
            lazy,
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
    keep = KeepGlue(module, graphs_cut, kept, list(used), constants, cut or prefix, taps, subs, lazy=lazy)
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
