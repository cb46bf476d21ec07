"""The trunk of a backbone, read from an observed forward (``featx.observation``): which containers ran as
chains of their children (by tensor identity and version counters), which hold repeated blocks, the trunk's
blocks in forward order, and the stage a pyramid level is named by. See ``featx.discovery``'s docstring."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

from torch import nn

from featx.observation import Call, Observation, TapCandidate, output_tensor

# containers that say nothing of what their children are: a child of one of these is a stage only beside others
_GENERIC = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

# --- the trunk and its pyramid ------------------------------------------------------------------------


def named_children_of(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    module = model.get_submodule(name) if name else model
    return [(f"{name}.{n}" if name else n, child) for n, child in module.named_children()]


def is_chain(model: nn.Module, obs: Observation, name: str) -> bool:
    """Whether the container ``name`` ran as a chain: each of its children called once, the first fed the
    container's input, each next the previous one's output, and the container returned the last's output
    (a container the root iterates without calling it, a ModuleList, needs only the children's chain)."""
    children = [n for n, _ in named_children_of(model, name)]
    if not children or any(len(obs.calls.get(c, ())) != 1 for c in children):
        return False
    ran = sorted(children, key=lambda c: obs.calls[c][0].order)
    if ran != children:
        return False
    if not all(_feeds(obs.calls[a][0], obs.calls[b][0]) for a, b in itertools.pairwise(ran)):
        return False
    own = obs.calls.get(name)
    if own is None:
        return bool(name)  # iterated by its parent (`for stage in self.stages`): its children's chain is all
    if len(own) != 1:
        return False
    first, last = obs.calls[ran[0]][0], obs.calls[ran[-1]][0]
    return (
        bool(first.inputs)
        and bool(own[0].inputs)
        and first.inputs[0] is own[0].inputs[0]
        and first.input_version == own[0].input_version
        and output_tensor(own[0].output) is output_tensor(last.output)
        and own[0].output_version == last.output_version  # no in-place add after it (`out += identity`)
    )


def _feeds(before: Call, after: Call) -> bool:
    """Whether ``after`` was fed exactly what ``before`` returned: the same tensor, not changed in place
    between the two calls."""
    out = output_tensor(before.output)
    return (
        out is not None
        and bool(after.inputs)
        and after.inputs[0] is out
        and after.input_version == before.output_version
    )


def _is_block(module: nn.Module, leaves: bool) -> bool:
    """A module that can be a block of a trunk: one whose children hold parameters (a ``Bottleneck``, a
    ``Sequential`` of blocks; not timm's ``BatchNormAct2d``, whose children are its activation and dropout),
    or with ``leaves`` a leaf with parameters (VGG's convolutions)."""
    children = list(module.children())
    if leaves and not children:
        return any(True for _ in module.parameters(recurse=False))
    return any(True for child in children for _ in child.parameters())


def _repeated(model: nn.Module, obs: Observation, name: str, leaves: bool) -> list[str] | None:
    """The children of ``name`` that make it hold repeated blocks: the called blocks of a class with two or
    more of them, or a single child block that is not a chain of its own; None when there are none."""
    children = [(c, m) for c, m in named_children_of(model, name) if c in obs.calls]
    by_class: dict[type, list[str]] = {}
    for child, module in children:
        if _is_block(module, leaves):
            by_class.setdefault(type(module), []).append(child)
    repeated = [names for names in by_class.values() if len(names) >= 2]
    if repeated:
        return max(repeated, key=len)
    single = not leaves and len(children) == 1 and _is_block(children[0][1], False)
    if single and not is_chain(model, obs, children[0][0]):
        return [children[0][0]]
    return None


def find_trunk(model: nn.Module, obs: Observation) -> list[str]:
    """The trunk blocks in the order they ran (see the module docstring)."""
    for leaves in (False, True):
        found = _trunk_blocks(model, obs, "", leaves)
        if found:
            return sorted(found, key=lambda n: obs.calls[n][0].order)
    return []


def _trunk_blocks(model: nn.Module, obs: Observation, name: str, leaves: bool) -> list[str]:
    """The trunk blocks inside ``name`` (the root, or a chain): the trunks of its children that are chains
    holding one, unless ``name`` itself holds repeated blocks that are not all such chains (then its own
    children are the blocks: torchvision's MobileNet ``features``, whose residual blocks are not chains)."""
    inner: dict[str, list[str]] = {}
    for child, module in named_children_of(model, name):
        if any(True for _ in module.children()) and is_chain(model, obs, child):
            found = _trunk_blocks(model, obs, child, leaves)
            if found:
                inner[child] = found
    chain = is_chain(model, obs, name) if name else _is_chain_root(model, obs)
    repeated = _repeated(model, obs, name, leaves) if chain else None
    # blocks with a forward of their own (residuals) make `name` the trunk; chains without a trunk inside
    # (a stem's Sequential, a classifier's) are not blocks of it
    if repeated is not None and (
        any(c not in inner and not is_chain(model, obs, c) for c in repeated)
        or not any(c in inner for c in repeated)  # Sequentials of a few layers each, repeated
    ):
        return [c for c, _ in named_children_of(model, name) if c in obs.calls]
    if (
        repeated is not None
    ):  # stages: each its trunk, or itself where it holds a single block (davit, starnet)
        ran = [c for c, _ in named_children_of(model, name) if c in obs.calls]
        kind = type(model.get_submodule(repeated[0]))
        stages = not issubclass(kind, _GENERIC) or all(type(model.get_submodule(c)) is kind for c in ran)
        if stages:  # not a stem Sequential beside `layer1..4` in a root of other modules
            return [b for c in ran for b in inner.get(c, [c] if c in repeated else [])]
    return [block for blocks in inner.values() for block in blocks]


def _is_chain_root(model: nn.Module, obs: Observation) -> bool:
    """The root as a chain of its children (a Sequential model): only the children's calls are seen."""
    children = [n for n, _ in named_children_of(model, "")]
    if not children or any(len(obs.calls.get(c, ())) != 1 for c in children):
        return False
    if sorted(children, key=lambda c: obs.calls[c][0].order) != children:
        return False
    return all(_feeds(obs.calls[a][0], obs.calls[b][0]) for a, b in itertools.pairwise(children))


def stage_of(
    model: nn.Module,
    obs: Observation,
    block: str,
    trunk: list[str],
    candidates: Mapping[str, TapCandidate],
    stride: int,
) -> str:
    """The outermost chain ending in ``block`` whose trunk blocks are all at ``stride`` (else ``block``)."""
    name = block
    parts = block.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:cut])
        if parent not in obs.calls or not is_chain(model, obs, parent):
            break
        inside = [b for b in trunk if b.startswith(parent + ".")]
        if not inside or inside[-1] != block:
            break
        if any(candidates.get(b) is None or candidates[b].stride != stride for b in inside):
            break
        name = parent
    return name
