"""What one instrumented forward of the full model saw, as values: the children's calls, outputs and feeds
(``ChildTrace``), the glue ops of the root's and each tracked container's own code (``Op``), the residual
merges (``Merge``), all in one ``Recording`` per mode. ``featx.recorder`` fills them (``featx.record``
runs it); the anatomy, the replay and the keep_glue proof read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from featx.vocab import Shortcut


@dataclass
class Op:
    """A glue op: a torch call the root's (or a tracked container's) own code made while none of its
    children was running."""

    name: str
    source: str
    seq: int
    after: int | None  # the child that last returned before the op (an index among the container's)
    before: int | None = None  # the next child called after it; filled in when the forward ends
    called: str | None = None  # for the root's call of a grandchild: its qualified name
    # The child whose own chain this call is: the root iterates an ``nn.Sequential`` child
    # (``for block in self.stages: x = block(x)``), calling each of its children once, in order, which
    # is what calling the child does. Filled in when the forward ends.
    inside: int | None = None
    container: str = ""  # whose code made it: "" the root, else a tracked container's dotted name


@dataclass
class Merge:
    """A residual: an add of two activation tensors inside ``module`` ("" is the root)."""

    module: str
    child: int | None  # the top-level child holding ``module``; None when the root merges
    shortcut: Shortcut
    source: str


@dataclass
class ChildTrace:
    name: str  # dotted from the root
    type: str
    container: str = ""  # whose child it is ("" the root)
    position: int = 0  # its index among the container's children
    # The module the truncated model runs right before this one, as a unit index (None: the model's
    # input): the previous sibling, or for a container's first child what comes before the container.
    pred: int | None = None
    calls: int = 0
    start: int | None = None  # sequence number of the first call
    end: int | None = None  # sequence number of the last return
    output: Any = None  # a copy of what the last call returned
    returned: bool = False
    rng_after: tuple[torch.Tensor, ...] | None = None
    # What the last call returned, itself, and its version counter then: the next child's feed check
    # needs no value comparison when it gets this very tensor, unmodified.
    returned_object: Any = None
    returned_version: int = -1
    # True while ``output`` is the returned tensor itself rather than a copy (see _Recorder.held)
    held: bool = False
    held_version: int = -1
    # None when the child was called once with exactly what its predecessor returned (same values,
    # dtype, shape and strides, RNG untouched in between), else why not.
    feed: str | None = "never called"
    # Filled in by a recording that watches effects (``record(..., effects=True)``): True when its last
    # call wrote to nothing it was fed, returned nothing that shares storage with what it was fed, and
    # returned with every plain attribute of every module of the model as found (so neither it nor
    # anything before it changed one). Then its output is all a caller sees of that call, but for the RNG
    # state after it and the module state inside it: what keep_glue's proof reuses (``featx.glue_proof``).
    contained: bool = False


@dataclass
class Recording:
    """What one instrumented forward of the full model in one mode saw."""

    mode: str
    children: list[ChildTrace]  # the root's children; ``units`` starts with them
    order: list[int]  # child indices in call order
    ops: list[Op]
    merges: list[Merge]
    input: Any  # pristine copy of the input the forward got
    rng_start: tuple[torch.Tensor, ...]
    error: str | None = None  # the full forward raised
    error_child: int | None = None  # the child that was running when it raised
    copies_unreliable: bool = False  # a held output changed without a write featx saw
    output: Any = None  # what the model's forward returned (None when it raised)
    # A copy of what each module the root calls itself, not a child (``blocks.3`` in
    # ``for blk in self.blocks: x = blk(x)``), returned on its last call: keep_glue's value at such a cut.
    root_calls: dict[str, Any] = field(default_factory=dict)
    units: list[ChildTrace] = field(default_factory=list)  # the root's children, then tracked containers'
    containers: dict[str, list[int]] = field(default_factory=dict)  # container -> its children's units
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def unit(self, name: str) -> ChildTrace:
        """A child of the root or of a tracked container, by its dotted name."""
        return self.units[self.unit_index(name)]

    def has_unit(self, name: str) -> bool:
        """Whether ``name`` is a child of the root or of a tracked container."""
        if len(self._index) != len(self.units):
            self._index = {u.name: i for i, u in enumerate(self.units)}
        return name in self._index

    def unit_index(self, name: str) -> int:
        if len(self._index) != len(self.units):
            self._index = {u.name: i for i, u in enumerate(self.units)}
        return self._index[name]
