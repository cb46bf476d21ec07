"""One instrumented forward of the full model, inside the guard that leaves it as it was found
(``featx.guard``).

During the forward, featx's ``nn.Module._call_impl`` (``_ModuleCalls``) sees every call of a module of the
model and keeps a stack of the modules currently running, and a ``TorchFunctionMode`` sees every torch
function, tensor method and operator the Python code calls (the outermost call only: ``F.dropout`` is
seen, the ``_VF.dropout`` inside it is not). From that:

- each direct *child* of the model: how often and in which order it is called, a copy of what it returned
  (copies, because ``ReLU(inplace=True)`` and ``out += identity`` overwrite tensors later), the RNG state
  after it, and whether it was *fed* exactly what its predecessor returned — the assumption a children
  cut rests on;
- each *glue* op the root's own ``forward()`` performs outside every child, with its source line;
- the same for each *container* asked for (a module inside a child, such as ``stages``, for nested cuts):
  its children's calls, outputs and feeds — a container's first child must be fed what the module before
  the container returned, as the truncated model feeds it — and the glue of the container's own code;
- each *residual* merge (an add of two activation tensors) at any depth, with the module performing it.

Activations are told from parameters and constants by taint: the input is an activation, and so is every
output of an op or module that read one. The recorder assumes what ``nn.Module.__call__`` gives it:
modules are called through ``nn.Module.__call__`` (as hooks need them to be), and torch functions are
called from Python.

What it saw comes back as values (``Recording``, ``ChildTrace``, ``Op``, ``Merge``), which live in
``featx.recording``; this module is the machinery that fills them (``_Recorder``), seeing module calls
through ``featx.module_calls`` and reading each call with ``featx.call_facts``. ``featx.record.record``
runs it once per mode.
"""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from featx.call_facts import (
    _FACTS,
    _NOT_LEAF,
    _WRITES_INPUT,
    _WRITES_WEIGHTS,
    _call_inputs,
    _facts,
    _made_outputs,
    _source,
    _tensors,
)
from featx.compare import copy_tree, differs
from featx.errors import one_line
from featx.guard import Snapshot, _storage, device_of, rng_state, seed_rng
from featx.module_calls import _CALLS
from featx.recording import ChildTrace, Merge, Op, Recording
from featx.vocab import Shortcut


class _Frame:
    """A module call in progress, and the lineage of the tensors its own code handles.

    ``hops`` maps each tensor seen at this level, by ``id``, to (a weak reference to it, steps from the
    module's input, made by a submodule): the inputs are 0 steps away; an op or a submodule call adds one.
    A merge whose nearer operand is an input is an identity shortcut; one whose nearer operand a submodule
    made (``downsample(x)``, also after a pre-activation norm) is a projection. Weak, because ids are
    reused once a tensor dies; every lookup checks the reference (``_hop``).

    A *leaf* frame is a call of one of torch.nn's own modules without children (``Conv2d``,
    ``BatchNorm2d``, ``ReLU``): its forward is one functional call on its input, never a merge and never
    glue, so the torch calls it makes are looked at only for in-place writes (most run with the mode off:
    ``_leaf_kind``), and it keeps no lineage; what it returns is tainted by its inputs when it returns.
    """

    __slots__ = ("hops", "inputs", "leaf", "module", "name", "unit")

    def __init__(
        self, name: str, module: nn.Module, inputs: list[torch.Tensor], unit: int | None, leaf: bool
    ) -> None:
        self.name = name
        self.module = module
        self.inputs = inputs
        self.unit = unit  # its index among the recording's units, if it is one
        self.leaf = leaf
        self.hops: dict[int, tuple[weakref.ref, int, bool]] = (
            {} if leaf else {id(t): (weakref.ref(t), 0, False) for t in inputs}
        )


def _hop(frame: _Frame, t: torch.Tensor) -> tuple[int, bool] | None:
    entry = frame.hops.get(id(t))
    return None if entry is None or entry[0]() is not t else (entry[1], entry[2])


def _units(model: nn.Module, snapshot: Snapshot, containers: Sequence[str]) -> list[ChildTrace]:
    """The units a recording tracks, fresh: the root's children, then each container's children."""
    units = [
        ChildTrace(name, type(child).__name__, "", i, i - 1 if i else None)
        for i, (name, child) in enumerate(model.named_children())
    ]
    index = {u.name: i for i, u in enumerate(units)}
    tracked: set[str] = set()
    for container in containers:
        if container not in index or container in tracked:
            raise ValueError(f"container `{container}` is not a tracked child")  # featx's own bug
        tracked.add(container)
        for j, (name, child) in enumerate(snapshot.by_name[container].named_children()):
            pred = len(units) - 1 if j else units[index[container]].pred
            units.append(ChildTrace(f"{container}.{name}", type(child).__name__, container, j, pred))
            index[units[-1].name] = len(units) - 1
    return units


class _Recorder(TorchFunctionMode):
    """One recorded forward: ``run()`` runs ``model`` once on a copy of ``example_input``, seeded with
    ``seed``, and returns the ``Recording``. The model is already in ``mode`` (``_set_modes``);
    ``flag_differs`` are the units whose train/eval flags differ from the truncated model's. With
    ``eager_copies`` every unit's output is copied as it returns, else held until something writes to it
    in place. With ``effects`` each unit's ``contained`` is filled in as it returns."""

    def __init__(
        self,
        model: nn.Module,
        snapshot: Snapshot,
        mode: str,
        example_input: Any,
        seed: int,
        flag_differs: set[int],
        containers: Sequence[str],
        module_info: dict[int, tuple[str, int | None, int]],
        *,
        eager_copies: bool = False,
        effects: bool = False,
    ) -> None:
        super().__init__()
        self.effects = effects
        # with ``effects``: the storages each unit now running was fed, and the units that wrote to one
        self.fed: dict[int, set[int]] = {}
        self.wrote_fed: set[int] = set()
        self.model = model
        self.example_input = example_input
        self.seed = seed
        self.eager_copies = eager_copies
        # storage -> children whose returned tensor (held, not yet copied) lives there; copied just
        # before an in-place write to that storage, so most outputs are never copied at all
        self.held: dict[int, list[int]] = {}
        self.snapshot = snapshot
        self.device = device_of(example_input, model)
        units = _units(model, snapshot, containers)
        self.index = {u.name: i for i, u in enumerate(units)}
        self.n_children = sum(not u.container for u in units)
        tracked: dict[str, list[int]] = {c: [] for c in containers}
        for i, u in enumerate(units):
            if u.container:
                tracked[u.container].append(i)
        self.rec = Recording(
            mode=mode,
            children=units[: self.n_children],
            order=[],
            ops=[],
            merges=[],
            input=copy_tree(example_input),
            rng_start=(),
            units=units,
            containers=tracked,
        )
        # the root's children of each tracked container, and how many units share a predecessor (the
        # identity shortcut of the feed check may be taken by the last of them only)
        self.root_child_of = {c: self.index[c.split(".")[0]] for c in tracked}
        self.followers: dict[int | None, int] = {}
        for u in units:
            self.followers[u.pred] = self.followers.get(u.pred, 0) + 1
        self.level_last: dict[str, int | None] = dict.fromkeys(tracked)
        self.level_starts: dict[str, list[tuple[int, int]]] = {c: [] for c in tracked}
        self.stack = [_Frame("", model, [], None, False)]
        self.open_children: list[int] = []
        # the activations, by id: the input and what an op or module made of one (see the module docstring)
        self.activations: dict[int, weakref.ref] = {}
        self.module_info = module_info  # id(module) -> (name, unit index or None, _leaf_kind): record()
        self.mode_depth = 0  # the torch function mode stack's depth with this recorder on top (run())
        self.paused = False
        self.seq = 0
        self.last_returned: int | None = None
        self.starts: list[tuple[int, int]] = []  # (seq, child index) of every child call
        self.flag_differs = flag_differs  # units whose train/eval flags differ from the Sequential's
        self.state_written: str | None = None  # a parameter or buffer the root's own code wrote to
        # set by run() as the forward starts: the grad and autocast state outside it, and the input it
        # is fed, itself, with its version counter then
        self.context: tuple = ()
        self.input_object: torch.Tensor | None = None
        self.input_version = -1

    def run(self) -> Recording:
        """Run the forward once, seeing every module call and torch call it makes, and return what it saw."""
        seed_rng(self.seed, self.device)
        self.rec.rng_start = rng_state(self.device)
        self.context = _context()
        x = copy_tree(self.example_input)
        self.taint(x)
        if isinstance(x, torch.Tensor):
            self.input_object, self.input_version = x, x._version
        with _CALLS.seen_by(self), self:
            self.mode_depth = torch._C._len_torch_function_stack()
            try:
                self.rec.output = self.model(x)
            except Exception as err:
                self.fail(err)
        return self.finish()

    # -- module calls --------------------------------------------------------------------------------
    # ``call`` and ``__torch_function__`` run on every module call and torch call of the forward: they
    # look tensors up by id in plain dicts and check the weak reference inline, rather than through helpers.
    def taint(self, tree: Any) -> None:
        root = self.stack[0]
        for t in _tensors(tree):
            ref = weakref.ref(t)
            self.activations[id(t)] = ref
            root.hops[id(t)] = (ref, 0, False)

    def _is_activation(self, t: torch.Tensor) -> bool:
        ref = self.activations.get(id(t))
        return ref is not None and ref() is t

    def _made(
        self, frame: _Frame, inputs: list[torch.Tensor], outputs: list[torch.Tensor], by_module: bool
    ) -> bool:
        """``outputs`` were made from ``inputs`` in ``frame`` (by an op, or by a submodule that returned):
        they are activations if an input is one (returned), and one step further from the frame's input
        than the farthest input it knows."""
        activations = self.activations
        hops = frame.hops
        active = False
        hop = -1
        for t in inputs:
            ref = activations.get(id(t))
            if ref is not None and ref() is t:
                active = True
            entry = hops.get(id(t))
            if entry is not None and entry[1] > hop and entry[0]() is t:
                hop = entry[1]
        if active or hop >= 0:
            for t in outputs:
                ref = weakref.ref(t)
                if active:
                    activations[id(t)] = ref
                if hop >= 0:
                    hops[id(t)] = (ref, hop + 1, by_module)
        return active

    def call(self, module: nn.Module, info: tuple[str, int | None, int], args: tuple, kwargs: dict) -> Any:
        """One call of a module of the model (not the root), as ``nn.Module._call_impl`` gets it.

        A leaf (``_leaf_kind``) runs with the recorder's mode off: its forward is one functional call on
        its input, which leaves nothing to record but a write to that input (``inplace=True``) or to its
        weight (``max_norm``), and those are taken to happen, here, before the call. Most module calls
        are of leaves inside a child (``Conv2d``, ``ReLU``, ``Identity``); those take the first branch,
        which is ``_pre`` and ``_post`` with everything that cannot apply to them left out."""
        name, child, leaf = info
        stack = self.stack
        parent = stack[-1]
        if (
            leaf
            and child is None
            and len(stack) > 1
            and parent.name not in self.level_last
            and torch._C._len_torch_function_stack() == self.mode_depth
        ):
            inputs = _call_inputs(args, kwargs)
            stack.append(_Frame(name, module, inputs, None, True))
            output = self._leaf(module, leaf, args, kwargs)
            stack.pop()
            outputs = _made_outputs(output, inputs)
            if outputs:
                self._made(parent, inputs, outputs, by_module=True)
            return output
        self._pre(module, info, args, kwargs)
        if leaf and torch._C._len_torch_function_stack() == self.mode_depth:
            output = self._leaf(module, leaf, args, kwargs)
        else:
            output = _CALLS.previous(module, *args, **kwargs)
        self._post(args, output)
        return output

    def _leaf(self, module: nn.Module, leaf: int, args: tuple, kwargs: dict) -> Any:
        """Call a leaf with the recorder's mode off, its in-place writes seen first."""
        mode = torch._C._pop_torch_function_stack()  # first: the writes' storage lookups are torch calls
        try:
            if leaf == _WRITES_INPUT:
                for t in _tensors(args[:1]):
                    self._written(t, root=False)
            elif leaf == _WRITES_WEIGHTS:
                for p in module._parameters.values():
                    if p is not None:
                        self.snapshot.save_before_write(p)
            return _CALLS.previous(module, *args, **kwargs)
        finally:
            torch._C._push_on_torch_function_stack(mode)

    def _pre(self, module: nn.Module, info: tuple[str, int | None, int], args: tuple, kwargs: dict) -> None:
        # This code makes no torch call, except where a unit's calls are checked (paused there).
        name, child, leaf = info
        stack = self.stack
        if child is None:
            if len(stack) == 1:  # the root calls a grandchild itself: glue too
                self.seq += 1
                op = Op(f"call `{name}`", _source(self.model), self.seq, self.last_returned, called=name)
                self.rec.ops.append(op)
            elif stack[-1].name in self.level_last:  # so does a tracked container
                self.seq += 1
                top = stack[-1]
                op = Op(
                    f"call `{name}`",
                    _source(top.module),
                    self.seq,
                    self.level_last[top.name],
                    container=top.name,
                )
                self.rec.ops.append(op)
        stack.append(_Frame(name, module, _call_inputs(args, kwargs), child, leaf != _NOT_LEAF))
        if child is not None:
            self.paused = True
            try:
                self._enter_child(child, args, kwargs)
            finally:
                self.paused = False

    def _post(self, args: tuple, output: Any) -> None:
        frame = self.stack.pop()
        outputs = _made_outputs(output, frame.inputs)
        if outputs:
            self._made(self.stack[-1], frame.inputs, outputs, by_module=True)
        child = frame.unit
        if child is None and len(self.stack) != 1:
            return
        self.paused = True
        try:
            if child is not None:
                self._leave_child(child, output)
            else:  # the root called a grandchild itself
                self.rec.root_calls[frame.name] = copy_tree(output)
        finally:
            self.paused = False

    def _enter_child(self, i: int, args: tuple, kwargs: dict) -> None:
        trace = self.rec.units[i]
        trace.calls += 1
        self.seq += 1
        if trace.container:
            self.level_starts[trace.container].append((self.seq, trace.position))
            if self.stack[-2].name == "":
                # the root calls the container's children itself (a ModuleList it iterates): to the
                # root's glue, this is where that child of the root starts
                self.starts.append((self.seq, self.root_child_of[trace.container]))
        else:
            self.rec.order.append(i)
            self.starts.append((self.seq, i))
            self.open_children.append(i)
        if self.effects:
            self.fed[i] = {_storage(t) for t in _call_inputs(args, kwargs)}
            self.wrote_fed.discard(i)
        if trace.calls == 1:
            trace.start = self.seq
            trace.feed = self._check_feed(i, args, kwargs)
        else:
            trace.feed = f"called {trace.calls} times"

    def _leave_child(self, i: int, output: Any) -> None:
        trace = self.rec.units[i]
        self.seq += 1
        trace.end = self.seq
        trace.returned = True
        trace.rng_after = rng_state(self.device)
        if isinstance(output, torch.Tensor):
            trace.returned_object, trace.returned_version = output, output._version
        if isinstance(output, torch.Tensor) and not self.eager_copies:
            trace.output, trace.held, trace.held_version = output, True, output._version
            self.held.setdefault(_storage(output), []).append(i)
        else:
            trace.output, trace.held = copy_tree(output), False
        if self.effects:
            fed = self.fed.pop(i, set())
            trace.contained = (
                i not in self.wrote_fed
                and not any(_storage(t) in fed for t in _tensors(output))
                and self.snapshot.attribute_changed("") is None
            )
        if trace.container:
            self.level_last[trace.container] = trace.position
            return
        self.last_returned = i
        if self.open_children and self.open_children[-1] == i:
            self.open_children.pop()

    def _written(self, t: torch.Tensor, root: bool) -> None:
        """``t`` is about to be written in place (by the root's own code if ``root``): save the parameter it
        is, copy the held outputs that live in its storage."""
        self.snapshot.save_before_write(t)
        if self.fed:
            storage = _storage(t)
            self.wrote_fed.update(i for i, fed in self.fed.items() if storage in fed)
        if self.held:
            for i in self.held.pop(_storage(t), ()):
                trace = self.rec.units[i]
                if trace.held:
                    trace.output, trace.held = trace.output.detach().clone(), False
        if root and id(t) in self.snapshot.state_names:
            self.state_written = self.snapshot.state_names[id(t)]

    def _check_feed(self, i: int, args: tuple, kwargs: dict) -> str | None:
        trace = self.rec.units[i]
        if kwargs:
            return f"called with keyword arguments {sorted(kwargs)}"
        if len(args) != 1:
            return f"called with {len(args)} positional arguments"
        rng: tuple[torch.Tensor, ...] | None  # None: the predecessor never returned (then it is not fed)
        if trace.pred is None:
            expected, rng = self.rec.input, self.rec.rng_start
            what, since = "the model's input", "the start of the forward"
            original, version = self.input_object, self.input_version
        else:
            prev = self.rec.units[trace.pred]
            what, since = f"what `{prev.name}` returned", f"`{prev.name}` returned"
            if prev.calls == 0:
                return f"called although `{prev.name}` was not called before it"
            in_order = trace.container or self.rec.order[-2:] == [i - 1, i]
            if prev.calls > 1 or not prev.returned or not in_order:
                return f"not called right after `{prev.name}` returned"
            expected, rng = prev.output, prev.rng_after
            original, version = prev.returned_object, prev.returned_version
            self.followers[trace.pred] -= 1
            if not self.followers[trace.pred]:
                prev.returned_object = None  # only these checks need it; do not keep it alive
        unchanged = original is not None and args[0] is original and original._version == version
        difference = None if unchanged else differs(args[0], expected)
        if difference:
            source = self._fed_from(i, args[0]) if i > 1 and not trace.container else None
            if source is not None:  # the root skips a child's output: inception's AuxLogits
                return f"fed what `{source}` returned, not {what} ({difference})"
            return f"fed something other than {what} ({difference})"
        # Each note completes "child `x` is ...": the reasons say it so.
        if not _rng_equal(rng, rng_state(self.device)):
            return f"called after the random number generator advanced since {since}"
        if i in self.flag_differs:
            return "run in other train/eval flags than the Sequential gives it (the model's own train() sets them)"
        if _context() != self.context:
            return "run under another grad or autocast state than the forward was called with"
        if self.state_written is not None:
            return f"called after the model's own code wrote to `{self.state_written}` in place"
        changed = self.snapshot.attribute_changed(trace.name)
        if changed is not None:
            return f"called after `{changed}` was changed"
        return None

    def _fed_from(self, i: int, fed: Any) -> str | None:
        """The nearest child before ``i``'s predecessor that returned the very tensor ``i`` is fed, if any.

        By identity while outputs are held (no value comparisons on the recording's hot path); with
        eager copies, by value."""
        for trace in reversed(self.rec.children[: i - 1]):
            if trace.calls != 1 or not trace.returned:
                continue
            if trace.output is fed or (
                not trace.held
                and isinstance(fed, torch.Tensor)
                and isinstance(trace.output, torch.Tensor)
                and trace.output.shape == fed.shape
                and differs(fed, trace.output) is None
            ):
                return trace.name
        return None

    # -- ops -----------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        facts = _FACTS.get(func)
        if facts is None:
            facts = _facts(func)
        clean, in_place, is_add = facts
        if kwargs and ("out" in kwargs or kwargs.get("inplace") is True):  # F.relu(x, inplace=True): `relu`
            in_place = True
        stack = self.stack
        frame = stack[-1]
        if in_place:
            written = _tensors(args[:1]) + _tensors(kwargs.get("out"))
            for t in written:
                self._written(t, root=len(stack) == 1)
            if frame.leaf:
                return func(*args, **kwargs)
            out = func(*args, **kwargs)
            outputs = _tensors(out) or written  # `x[:, 0] = 0` returns None but changes x
        else:
            if frame.leaf:
                return func(*args, **kwargs)
            out = func(*args, **kwargs)
            outputs = [out] if isinstance(out, torch.Tensor) else _tensors(out)
        if not outputs:  # sizes, dims, flags: reading a tensor is not changing one
            return out
        inputs = _tensors(args) + _tensors(kwargs) if kwargs else _tensors(args)
        is_activation = self._made(frame, inputs, outputs, by_module=False)
        self.seq += 1
        if len(stack) == 1:
            self.rec.ops.append(Op(clean, _source(self.model), self.seq, self.last_returned))
        elif frame.name in self.level_last:
            op = Op(clean, _source(frame.module), self.seq, self.level_last[frame.name])
            op.container = frame.name
            self.rec.ops.append(op)
        if is_add and is_activation:
            self._maybe_merge(frame, args, kwargs)
        return out

    def _maybe_merge(self, frame: _Frame, args: tuple, kwargs: dict) -> None:
        operands = (
            args[0] if args else kwargs.get("input"),
            args[1] if len(args) > 1 else kwargs.get("other"),
        )
        tensors = [t for t in operands if isinstance(t, torch.Tensor) and self._is_activation(t)]
        if len(tensors) < len(operands):
            return
        lineage = [h for h in (_hop(frame, t) for t in tensors) if h is not None]
        nearest = [made_by_module for hops, made_by_module in lineage if hops == min(h for h, _ in lineage)]
        shortcut: Shortcut
        if lineage and min(h for h, _ in lineage) == 0:
            shortcut = "identity"
        elif nearest and all(nearest):
            shortcut = "projection"
        else:
            shortcut = "other"
        child = self.open_children[0] if self.open_children else None
        self.rec.merges.append(Merge(frame.name, child, shortcut, _source(frame.module)))

    def fail(self, err: Exception) -> None:
        self.rec.error = f"{type(err).__name__}: {one_line(err)}"
        self.rec.error_child = self.open_children[0] if self.open_children else None

    def finish(self) -> Recording:
        for trace in self.rec.units:
            if trace.held and trace.output._version != trace.held_version:
                self.rec.copies_unreliable = True
        self.starts.sort()
        levels = {"": self.starts, **self.level_starts}
        seqs = {c: [seq for seq, _ in starts] for c, starts in levels.items()}
        for op in self.rec.ops:
            k = bisect.bisect_right(seqs[op.container], op.seq)
            starts = levels[op.container]
            op.before = starts[k][1] if k < len(starts) else None
        self._find_iterated_children()
        return self.rec

    def _find_iterated_children(self) -> None:
        """Mark the root's grandchild calls that are an ``nn.Sequential`` child's own chain.

        ``for block in self.stages: x = block(x)`` calls what ``self.stages(x)`` would: each of its
        children once, in order. Those calls are then the child's, not glue the cut loses. A ``ModuleList``
        cannot be called as a whole, and a chain called in part, out of order or twice stays glue.
        """
        calls: dict[str, list[Op]] = {}
        for op in self.rec.ops:
            if op.called is not None and not op.container:
                calls.setdefault(op.called.rpartition(".")[0], []).append(op)
        if not calls:
            return
        for i, (name, child) in enumerate(self.model.named_children()):
            ops = calls.get(name)
            if (
                ops
                and self.rec.children[i].calls == 0
                and isinstance(child, nn.Sequential)
                and type(child).forward is nn.Sequential.forward
                and [op.called for op in ops] == [f"{name}.{key}" for key in child._modules]
            ):
                for op in ops:
                    op.inside = i


# -- small pieces --------------------------------------------------------------------------------------
# -- small pieces, shared with verify ------------------------------------------------------------------
def _rng_equal(a: tuple[torch.Tensor, ...] | None, b: tuple[torch.Tensor, ...]) -> bool:
    return a is not None and len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _context() -> tuple:
    """Grad mode and autocast state: a child run under another than the Sequential's can differ."""
    return (
        torch.is_grad_enabled(),
        *((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")),
    )
