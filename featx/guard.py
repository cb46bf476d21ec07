"""The guard that leaves the model as it was found: ``preserved(model)``, and the run state it sets.

``with preserved(model) as snapshot:`` takes a ``Snapshot`` of everything of the model a forward can
change, runs the body with autograd off and the RNG state forked, and puts it all back when the body ends,
however it ends; ``snapshot.restore()`` puts it back in between, before each run. The recorder
(``featx.record``) and the runs that check a cut (``featx.verification``) work inside it; this module knows
neither of them.

Also here, the state a run starts from besides the model's: its train/eval flags (``set_mode``) and the
random number generators of its device (``device_of``, ``seed_rng``, ``rng_state``, ``set_rng_state``).
"""

from __future__ import annotations

import contextlib
import operator
from collections import deque
from collections.abc import Iterator
from itertools import filterfalse, repeat
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from featx.errors import FeatxError


def preserved(model: nn.Module) -> Snapshot:
    """The guard: ``with preserved(model) as snapshot:`` runs the body with autograd off, and puts back
    flags, buffers, parameters, module attributes and RNG state afterwards, also when the body raises,
    KeyboardInterrupt included. See ``Snapshot`` for what is kept and how."""
    return Snapshot(model)


class Snapshot:
    """Everything of a model a forward can change, to put back after each run.

    Training flags, ``requires_grad``, the parameter and buffer objects in every module's slots (a forward
    may rebind ``self.avg = ...``), and buffer values (BN running stats: small, and BN updates them inside
    its kernel without bumping their version counter). Parameter values are not copied — that would cost
    a tenth of a forward on a ResNet-50 — but guarded: the recorder saves a parameter's storage just before
    an in-place torch call writes to it (also through ``.data`` or a view), and the version counter
    catches other writes.

    Plain attributes of every module (``self.b.scale = 3.0``) are kept shallowly: the object each one
    holds, and for a ``list``/``dict``/``set`` the objects in it. A write deeper inside another object is
    not seen. TorchScript modules keep their slots in C++, where a Python forward cannot rebind them:
    their flags and buffer values are kept, their slots and attributes are not touched.

    A context manager (``preserved`` makes one): the snapshot is taken when it is made, and the model put
    back when the ``with`` block ends.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # Every module by every name it has (a shared module under each), and each once: the one walk of
        # the tree a sweep needs; recording and resuming look modules up here.
        self.by_name = _named_modules(model)
        seen: set[int] = set()  # model.named_modules(): a shared module under its first name only
        self.named: list[tuple[str, nn.Module]] = []
        for name, m in self.by_name.items():
            if id(m) not in seen:
                seen.add(id(m))
                self.named.append((name, m))
        self._order = list(self.by_name)  # pre-order: a module's subtree follows it
        self._position = {name: i for i, name in enumerate(self._order)}
        self._subtrees: dict[str, list[nn.Module]] = {}
        # One pass over the modules for everything else: a snapshot is taken per sweep, and on a small
        # model it costs a tenth of a forward.
        self.scripted: list[tuple[str, nn.Module]] = []
        self.param_slots: list[tuple[nn.Module, str, nn.Parameter, bool]] = []
        slots: list[tuple[nn.Module, str, torch.Tensor]] = []  # the buffers' slots, cloned below
        self.scripted_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.module_attributes: dict[int, _Attributes] = {}  # id(module) -> its attributes
        # model.named_parameters() and named_buffers(): each tensor once, under its first name
        params: dict[int, tuple[str, nn.Parameter]] = {}
        buffers: dict[int, tuple[str, torch.Tensor]] = {}
        self.train_overridden = False
        self.flags = [(m, m.training) for _, m in self.named]
        for prefix, m in self.named:
            scripted, overrides_train = _class_facts(type(m))
            # TorchScript's train() is its own: only then, or where a module's class overrides train()
            # (mmdetection's norm_eval), can a parent's train() set a module's flag otherwise than the
            # module's own train() would
            self.train_overridden = self.train_overridden or overrides_train
            if scripted:
                self.scripted.append((prefix, m))
                self.scripted_buffers += [(b, b.detach().clone()) for b in m.buffers(recurse=False)]
            else:
                self.module_attributes[id(m)] = _Attributes(prefix, m)
            dot = f"{prefix}." if prefix else ""
            if m._parameters:
                for n, p in m._parameters.items():
                    if p is not None:
                        if not scripted:
                            self.param_slots.append((m, n, p, p.requires_grad))
                        if id(p) not in params:
                            params[id(p)] = (dot + n, p)
            if m._buffers:
                for n, b in m._buffers.items():
                    if b is not None:
                        if not scripted:
                            slots.append((m, n, b))
                        if id(b) not in buffers:
                            buffers[id(b)] = (dot + n, b)
        with torch.no_grad():  # clones outside autograd: no detach() per buffer
            self.buffer_slots = [(m, n, b, b.clone()) for m, n, b in slots]
        self.attributes = list(self.module_attributes.values())
        # restore() puts every module's __dict__ back in one C pass over these
        self._states = [a.state for a in self.attributes]
        self._saved = [a.saved for a in self.attributes]
        self._sizes = [a.size for a in self.attributes]
        self._with_items = [a for a in self.attributes if a.items]
        self._buffers = [buf for _, _, buf, _ in self.buffer_slots]
        self._buffer_values = [saved for *_, saved in self.buffer_slots]
        self._unchanged: dict[str, _Unchanged] = {}  # per module name: its subtree's attributes
        self.params = {key: (name, p, p._version) for key, (name, p) in params.items()}
        self.storages = {_storage(p): key for key, (_, p) in params.items() if p.numel()}
        self.state_names = {key: name for key, (name, _) in [*params.items(), *buffers.items()]}
        self.saved_params: dict[int, torch.Tensor] = {}
        # True until the first restore(): nothing has run since the snapshot was taken, so that one has
        # nothing to put back
        self._pristine = True
        self._exit = contextlib.ExitStack()

    def __enter__(self) -> Snapshot:
        """Autograd off and the RNG state forked until ``__exit__``, which puts the model back."""
        cuda = sorted({p.device.index or 0 for _, p, _ in self.params.values() if p.device.type == "cuda"})
        with contextlib.ExitStack() as stack:
            stack.callback(self._put_back)  # last: after RNG state and grad mode
            stack.enter_context(torch.random.fork_rng(devices=cuda))
            stack.enter_context(torch.no_grad())
            self._exit = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        """Restore RNG state and grad mode, then put flags, slots, buffers and written parameters back
        (``restore``): also when the body raised, KeyboardInterrupt included."""
        self._exit.close()

    def _put_back(self) -> None:
        self._pristine = False  # the body may have changed the model without a restore() first
        self.restore()

    def subtree(self, name: str) -> list[nn.Module]:
        """``self.by_name[name].modules()``: the module and everything below it, each once."""
        found = self._subtrees.get(name)
        if found is None:
            start = self._position[name]
            prefix = f"{name}." if name else ""
            end = start + 1
            while end < len(self._order) and self._order[end].startswith(prefix):
                end += 1
            found = list({id(m): m for m in map(self.by_name.__getitem__, self._order[start:end])}.values())
            self._subtrees[name] = found
        return found

    def attribute_changed(self, name: str) -> str | None:
        """The first attribute in the subtree of module ``name`` (``b.scale``) that no longer holds what it
        held when the snapshot was taken, or None."""
        group = self._unchanged.get(name)
        if group is None:
            found = (self.module_attributes.get(id(m)) for m in self.subtree(name))
            group = self._unchanged[name] = _Unchanged([a for a in found if a is not None])
        return group.changed()

    def save_before_write(self, tensor: torch.Tensor) -> None:
        key = self.storages.get(_storage(tensor))
        if key is not None and key not in self.saved_params:
            self.saved_params[key] = self.params[key][1].detach().clone()

    def restore(self) -> None:
        """Put flags, slots, buffers and written parameters back.

        Raises:
            FeatxError: a parameter changed in a way featx could not see, so could not put back.
        """
        if self._pristine:
            self._pristine = False
            return
        written = [key for key, (_, p, version) in self.params.items() if p._version != version]
        unrestorable = [self.params[key][0] for key in written if key not in self.saved_params]
        with torch.no_grad():
            for module, training in self.flags:
                if module.training != training:
                    if isinstance(module, torch.jit.ScriptModule):
                        module.training = training
                    else:  # what nn.Module.__setattr__ does for a bool, without its checks
                        module.__dict__["training"] = training
            for module, name, param, requires_grad in self.param_slots:
                if module._parameters.get(name) is not param:
                    module._parameters[name] = param
                if param.requires_grad != requires_grad:
                    param.requires_grad_(requires_grad)
            for module, name, buf, _ in self.buffer_slots:
                module._buffers[name] = buf
            if self._buffers:  # the values in one call: a ResNet-50 has 160 buffers
                torch._foreach_copy_(self._buffers, self._buffer_values)
            for buf, saved in self.scripted_buffers:
                buf.copy_(saved)
            _run(map(dict.update, self._states, self._saved))
            for attributes in self._with_items:
                attributes.put_items_back()
            if list(map(len, self._states)) != self._sizes:
                for attributes in self.attributes:
                    attributes.drop_added()
            for key, saved in self.saved_params.items():
                self.params[key][1].copy_(saved)
        # every one: copy_ moves version counters, also of a parameter a buffer shares its counter with
        self.params = {key: (name, p, p._version) for key, (name, p, _) in self.params.items()}
        self.saved_params.clear()
        if unrestorable:
            raise FeatxError(
                f"the forward of `{type(self.model).__name__}` wrote to parameters {unrestorable[:3]} other than "
                "through a torch call featx can see, so featx could not put them back"
            )


def _run(calls: Iterator[object]) -> None:
    """Make every call of a ``map``, keeping nothing: the loop runs in C."""
    deque(calls, maxlen=0)


# What every nn.Module holds in its __dict__ for torch itself (hook tables, slots); featx's own hooks
# change these, a model's code does not.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)
_ABSENT = object()
_OWN_KEYS: dict[tuple[str, ...], list[str]] = {}


def _own_keys(state: dict[str, Any]) -> list[str]:
    """The keys of a module's own attributes in its ``__dict__``, in order (not to be changed): looked up
    by all its keys, which modules of one class mostly share, as picking them out costs more."""
    keys = tuple(state)
    own = _OWN_KEYS.get(keys)
    if own is None:
        if len(_OWN_KEYS) > 4096:  # modules whose attribute names vary without end
            _OWN_KEYS.clear()
        own = _OWN_KEYS[keys] = list(filterfalse(_MODULE_INTERNALS.__contains__, keys))
    return own


class _Attributes:
    """One module's plain attributes as found: each value, and the items of a list, dict or set.

    ``saved`` is a copy of the whole ``__dict__``, torch's own slots included (the same objects; putting
    them back changes nothing), because copying it whole runs in C; only the attributes outside those
    slots (``_MODULE_INTERNALS``) are checked and have their items kept.
    """

    __slots__ = ("items", "module", "name", "own", "saved", "size", "state")

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        state = self.state = module.__dict__
        self.saved = state.copy()
        self.own = _own_keys(state)
        self.items = {key: _items(state[key]) for key in self.own if type(state[key]) in _CONTAINERS}
        self.size = len(state)

    def changed(self) -> str | None:
        state = self.module.__dict__
        items = self.items
        for key in self.own:
            value = self.saved[key]
            if state.get(key, _ABSENT) is not value or (key in items and not _same_items(value, items[key])):
                return f"{self.name}.{key}" if self.name else key
        if len(state) != self.size:
            added = [key for key in state if key not in self.saved and key not in _MODULE_INTERNALS]
            if added:
                return f"{self.name}.{added[0]}" if self.name else added[0]
        return None

    def put_items_back(self) -> None:
        """The items of each list, dict and set attribute as found (its object is back: ``restore``)."""
        for key, items in self.items.items():
            value = self.saved[key]
            if not _same_items(value, items):
                value.clear()
                if isinstance(value, list):
                    value.extend(items)
                else:
                    value.update(items)

    def drop_added(self) -> None:
        """Delete the attributes set since (the others are back: ``restore``)."""
        state = self.module.__dict__
        if len(state) != self.size:
            for key in [key for key in state if key not in self.saved and key not in _MODULE_INTERNALS]:
                del state[key]


class _Unchanged:
    """The attributes of several modules (a subtree), checked for change in one pass.

    A feed check asks this of every module below a unit, once per unit and forward: the pass compares
    every value by identity in C (``map``), and only when something differs is each module asked in turn
    which attribute it was."""

    def __init__(self, attributes: list[_Attributes]) -> None:
        self.attributes = attributes
        self.states: list[dict[str, Any]] = []
        self.keys: list[str] = []
        self.values: list[Any] = []
        for a in attributes:
            own = a.own
            self.keys += own
            self.values += map(a.saved.__getitem__, own)
            self.states += repeat(a.state, len(own))
        self.dicts = [a.state for a in attributes]
        self.sizes = [a.size for a in attributes]
        self.with_items = [a for a in attributes if a.items]

    def changed(self) -> str | None:
        if (
            all(map(operator.is_, map(dict.get, self.states, self.keys, repeat(_ABSENT)), self.values))
            and list(map(len, self.dicts)) == self.sizes
            and all(_same_items(a.saved[k], v) for a in self.with_items for k, v in a.items.items())
        ):
            return None
        for attributes in self.attributes:
            changed = attributes.changed()
            if changed is not None:
                return changed
        return None


def _named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``dict(model.named_modules(remove_duplicate=False))``, in the same (pre-)order, walked with a stack:
    ``named_modules`` nests one generator per level, which costs more than the walk itself."""
    found: dict[str, nn.Module] = {}
    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        found[prefix] = module
        if module._modules:
            dot = f"{prefix}." if prefix else ""
            stack += [(dot + name, m) for name, m in reversed(module._modules.items()) if m is not None]
    return found


_CONTAINERS = frozenset({list, dict, set})


def _items(value: Any) -> list[object] | dict[object, object] | set[object]:
    """A shallow copy of a plain list, dict or set, to see its items replaced in place."""
    return type(value)(value)


def _same_items(value: Any, items: Any) -> bool:
    if len(value) != len(items):
        return False
    if isinstance(items, list):
        return all(a is b for a, b in zip(value, items, strict=True))
    if isinstance(items, dict):
        return all(value.get(k, _ABSENT) is v for k, v in items.items())
    return value == items


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, some subclasses)
        return id(t)


# -- the state a run starts from -----------------------------------------------------------------------------
def rng_state(device: torch.device) -> tuple[torch.Tensor, ...]:
    state = [torch.get_rng_state()]
    if device.type == "cuda":
        state.append(torch.cuda.get_rng_state(device))
    return tuple(state)


def flags_of(module: nn.Module) -> list[tuple[nn.Module, bool]]:
    """The train/eval flag of every module in ``module``, itself included, as it is now."""
    return [(m, m.training) for m in module.modules()]


def set_mode(module: nn.Module, training: bool) -> None:
    """``module.train(training)``, without the Python of ``nn.Module.train`` where nothing overrides it.

    A module whose class overrides ``train`` (mmdetection's ``norm_eval``, frozen stages) is called as
    ``train()`` would call it; every other one gets its flag set and its children visited, as
    ``nn.Module.train`` does, minus its attribute-setting machinery: a sweep sets the flags of every module
    several times.
    """
    if _class_facts(type(module))[1]:
        module.train(training)
        return
    module.__dict__["training"] = training
    for child in module._modules.values():
        if child is not None:
            set_mode(child, training)


_MODULE_TRAIN = nn.Module.train
_CLASS_FACTS: dict[type, tuple[bool, bool]] = {}


def _class_facts(kind: type[nn.Module]) -> tuple[bool, bool]:
    """Whether modules of class ``kind`` are TorchScript, and whether their ``train()`` is their own
    (TorchScript's is): looked up once per class, as ``isinstance(…, ScriptModule)`` costs more than a
    dict lookup."""
    facts = _CLASS_FACTS.get(kind)
    if facts is None:
        scripted = issubclass(kind, torch.jit.ScriptModule)
        facts = _CLASS_FACTS[kind] = (scripted, scripted or kind.train is not _MODULE_TRAIN)
    return facts


def seed_rng(seed: int, device: torch.device) -> None:
    """Seed the generators a forward on ``device`` draws from: the CPU's, and that CUDA device's.

    ``torch.manual_seed`` would seed every accelerator torch knows of, costing a fraction of a millisecond
    per call on a CUDA build, several times per sweep; the other generators are not this forward's.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def set_rng_state(state: tuple[torch.Tensor, ...], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def device_of(tree: Any, model: nn.Module | None = None) -> torch.device:
    """The device a forward on ``tree`` runs on, whose generator it draws from: that of the first tensor
    in ``tree``, else of ``model``'s first parameter, else the CPU."""
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    if model is not None:
        for p in model.parameters():
            return p.device
    return torch.device("cpu")
