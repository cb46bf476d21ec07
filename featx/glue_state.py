"""What a keep_glue trace cannot see: the module state a traced forward writes or reads, watched while fx runs.

``torch.fx`` records the torch operations on the traced tensors and nothing else. A forward that writes
module state (``self.b.gain = 3.0`` around a call, ``self.calls += 1``, a cache dict, a plain tensor
changed in place), switches autograd (``with torch.no_grad():``), draws from Python's or numpy's global
random generator (LayerDrop's ``random.random() < p``: the graph would keep one draw) or is run by hooks
of its own leaves no trace in the graph: the module keep_glue returns would silently skip it. ``Watch`` — a context manager
around one trace — sees these and raises ``FeatxError`` naming the attribute and the model's source line.

A forward that *reads* a plain attribute (``self.stem.hw``, ``self.drop_rate``) gets its value baked into
the graph as a constant. That is right while the attribute holds that value, and wrong once a child's own
forward (which the trace does not run) or the user changes it. ``Watch`` records each such read as a
``Read``; the keep_glue module checks them after every call (``require_reads_hold``) and refuses once one
no longer holds. Tensors in plain attributes are read live by the graph (fx makes them attributes), and
parameters and buffers are traced as graph values, so an in-place update of a buffer (BN's
``num_batches_tracked.add_(1)``) is part of the graph and runs in the mode it was traced in.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import random
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from featx.code_location import in_torch_or_featx, short_path
from featx.errors import FeatxError

_INTERNALS = frozenset(nn.Module().__dict__)  # training, _parameters, _modules, the hook dicts ...
_HOOKS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
)
_MUTABLE = (list, dict, set)
# code fx and keep_glue generate (a GraphModule's forward, a cut's), and Python's own frozen modules
_GENERATED = ("<eval_with_key", "<featx ", "<frozen ")
_DECORATOR = os.path.join("torch", "utils", "_contextlib.py")
# Python's and numpy's global generators: what a draw there returns is not a graph value, so the trace
# would bake one draw into the graph (LayerDrop's `if self.training and random.random() < p: continue`)
_STATE_CALLS = frozenset({"getstate", "setstate", "seed", "get_state", "set_state"})


class StateRefused(FeatxError):
    """``Watch``'s refusal; ``what`` says it in short for a caller that words its own message: what the
    forward does and where (``sets `calls` (model.py:7)``), or what the module has (``has a forward hook
    `h` (model.py:3)``), with ``forward`` telling which."""

    def __init__(self, message: str, what: str, forward: bool = True) -> None:
        super().__init__(message)
        self.what = what
        self.forward = forward


@dataclass(frozen=True)
class Read:
    """A plain attribute the traced forward read, and the value the graph holds for it."""

    module: nn.Module
    name: str  # dotted from the traced module: ``stem.hw``; the traced module's own: ``drop_rate``
    attribute: str
    value: object
    line: str  # `` (model.py:31)`` or ""

    def holds(self) -> bool:
        return _same(_current(self.module, self.attribute), self.value)


_MISSING = object()


def _current(module: nn.Module, name: str) -> object:
    """What ``module.name`` reads as a plain value: the instance's own attribute, else a plain value its
    class holds (``scale = 2.0`` in the class body, which an instance attribute set later overrides)."""
    own = object.__getattribute__(module, "__dict__")  # not `module.__dict__`: the watch patches the lookup
    if name in own:
        return own[name]
    for klass in type(module).__mro__:
        if name in klass.__dict__:
            value = klass.__dict__[name]
            return _MISSING if callable(value) or hasattr(type(value), "__get__") else value
    return _MISSING


def traced_arguments(
    signature: inspect.Signature | None,
    arguments: dict[str, Any],
    upto: str,
    where: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments a cut at ``upto`` passes on to its graph, given the forward's ``signature``: those the
    forward was traced with at a fixed value (``arguments``: an optional argument at its default, a value
    the caller's graph passes) must have that value, since the graph holds the path the forward took for
    it, and are passed on as given (the graph asserts each is the value it was traced with).

    Raises:
        FeatxError: an argument the forward does not take, or one at another value than traced.
    """
    if signature is None:
        return args, kwargs
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        accepted = ", ".join(f"`{n}`" for n in signature.parameters)
        raise FeatxError(
            f"keep_glue: the cut at `{upto}` takes the arguments of the forward of {where} "
            f"({accepted}): {err}"
        ) from None
    for name, value in list(bound.arguments.items()):
        if name in arguments:
            traced = arguments[name]
            if not _same(value, traced):
                raise FeatxError(
                    f"keep_glue: argument `{name}` is {_short_repr(value)}, but the cut at `{upto}` was "
                    f"traced with `{name}={_short_repr(traced)}` and keeps only the path the forward of "
                    f"{where} takes for that; leave `{name}` out, or cut without keep_glue"
                )
    return bound.args, bound.kwargs


def _short_repr(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def require_reads_hold(reads: tuple[Read, ...], where: str) -> None:
    """Raise if an attribute the graph baked in no longer holds the value it was traced with.

    Under ``torch.compile`` (and ``torch.export``) the check is traced instead of run: each attribute is read
    the plain way, so the compiled module guards on its value. A changed attribute then fails the guard,
    and the recompiled check raises (with ``fullgraph=True``, as dynamo's error around this one) rather
    than run the graph compiled for the old value."""
    if torch.compiler.is_compiling():
        _require_reads_hold_traced(reads, where)
        return
    for read in reads:
        if not read.holds():
            now = _current(read.module, read.attribute)
            raise FeatxError(
                f"keep_glue: the forward of {where} reads `{read.name}`{read.line}, which held "
                f"{_show(read.value)} when the cut was made and now holds {_show(now)} (a module's forward "
                "or the caller changed it); the traced graph keeps the value it was made with, so this cut "
                "cannot follow it: cut without keep_glue"
            )


def _require_reads_hold_traced(reads: tuple[Read, ...], where: str) -> None:
    """``require_reads_hold`` as dynamo can trace it: ``getattr`` rather than a look into ``__dict__`` (which
    dynamo does not follow), and a message made of the values known when the cut was made (what the
    attribute holds now may be a symbol while dynamo traces)."""
    for read in reads:
        if not _holds_traced(getattr(read.module, read.attribute, _MISSING), read.value):
            raise FeatxError(
                f"keep_glue: the forward of {where} reads `{read.name}`{read.line}, which held "
                f"{_show(read.value)} when the cut was made and holds another value now (a module's forward "
                "or the caller changed it); the traced graph keeps the value it was made with, so this cut "
                "cannot follow it: cut without keep_glue"
            )


def _holds_traced(now: Any, then: object) -> bool:
    """``_same(now, then)`` for a value read by ``getattr``, in code dynamo traces (no ``_Shallow`` made)."""
    if not isinstance(then, _Shallow):
        return _same(now, then)
    kind = type(now)  # not `type(now) is ...`, which would narrow `now` to `object`
    if kind is not then.kind:
        return False
    items = tuple(itertools.chain.from_iterable(now.items())) if isinstance(now, dict) else tuple(now)
    return len(items) == len(then.items) and all(_same(a, b) for a, b in zip(items, then.items, strict=True))


class Watch:
    """``with Watch(module, where):`` around fx tracing ``module``'s forward (``where``: how a refusal
    names it).

    Raises ``FeatxError`` (on exit, or at once for a write) where the traced forward writes an attribute
    of any module, changes a list/dict/set attribute or a plain tensor attribute in place, switches
    autograd, inference mode or autocast, draws from ``random``'s or ``numpy.random``'s global generator
    (whose state it leaves as found), or where ``module`` has hooks of its own (fx calls ``forward``, not
    the module, so they would not run). Collects in ``reads`` every plain attribute the forward read.
    Only the model's own code counts: frames between the call and the caller of ``__enter__`` whose
    files are neither torch's nor featx's (``code_location.in_torch_or_featx``).
    """

    def __init__(self, module: nn.Module, where: str) -> None:
        self.module = module
        self.where = where
        self.names = {id(m): name for name, m in module.named_modules(remove_duplicate=False)}
        self.reads: list[Read] = []
        self._seen: set[tuple[int, str]] = set()
        self._problem: StateRefused | None = None
        self._top: types.FrameType | None = None
        self._patched: list[tuple[object, str, object]] = []
        self._drawn = False

    # -- entering and leaving ---------------------------------------------------------------------------
    def __enter__(self) -> Watch:
        self._require_no_hooks()
        self._before = _contents(self.module)
        self._top = sys._getframe(1)
        for owner, name, what in (
            (torch._C, "_set_grad_enabled", "switches autograd on or off"),
            (torch._C, "_InferenceMode", "enters inference mode"),
            (torch, "set_autocast_enabled", "switches autocast"),
        ):
            if hasattr(owner, name):
                self._patch(owner, name, self._global_setter(getattr(owner, name), what))
        self._generators = _generators()
        self._states = [generator.state() for generator in self._generators]
        for generator in self._generators:
            for name in dir(generator.module):
                draw = getattr(generator.module, name)
                if getattr(draw, "__self__", None) is generator.instance and name not in _STATE_CALLS:
                    self._patch(generator.module, name, self._random_draw(draw, f"{generator.name}.{name}"))
        _ATTRIBUTES.enter()
        _WATCHING.append(self)
        return self

    def __exit__(self, kind: object, err: object, tb: object) -> None:
        for owner, name, original in reversed(self._patched):
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._patched.clear()
        _WATCHING.remove(self)
        _ATTRIBUTES.leave()
        moved = [
            g.name for g, state in zip(self._generators, self._states, strict=True) if g.state() != state
        ]
        for generator, state in zip(self._generators, self._states, strict=True):
            generator.restore(state)  # the global generators as found, whatever the trace drew
        if self._problem is not None:
            raise self._problem from None
        if moved and not self._drawn:  # a draw the patches missed: `from random import random`
            what = f"draws from `{moved[0]}`'s global generator"
            raise StateRefused(
                f"keep_glue: the forward of {self.where} {what}, whose value the traced graph would keep as a "
                "constant; the cut cannot keep that: cut without keep_glue",
                what,
            )
        if kind is None:
            self._require_contents_unchanged()

    def _patch(self, owner: object, name: str, value: object) -> None:
        original = owner.__dict__.get(name, _MISSING) if isinstance(owner, type) else getattr(owner, name)
        self._patched.append((owner, name, original))
        setattr(owner, name, value)

    # -- what it sees -----------------------------------------------------------------------------------
    def _wrote(self, module: nn.Module, name: str, verb: str) -> None:
        # A flag is set by torch's own `train()`/`eval()`, which the model's code calls
        line = self._model_line(sys._getframe(2), direct=name != "training")
        if line is None or self._problem is not None:
            return  # fx's own constants, torch's bookkeeping: not the model's code
        what = f"{verb} `{self._name(module, name)}`{line}"
        self._problem = StateRefused(
            f"keep_glue: the forward of {self.where} {what}, which the traced graph does not record (the "
            "cut would run with whatever value tracing left); the cut cannot keep that: cut without keep_glue",
            what,
        )
        raise self._problem

    def _read(self, module: nn.Module, name: str, value: object) -> None:
        if isinstance(value, (nn.Module, torch.Tensor)) or (id(module), name) in self._seen:
            return  # modules are called, tensors become attributes the graph reads live
        line = self._model_line(sys._getframe(2), direct=True)
        if line is None:
            return
        self._seen.add((id(module), name))
        self.reads.append(Read(module, self._name(module, name), name, _frozen(value), line))

    def _global_setter(self, original: Callable[..., Any], what: str) -> Callable[..., Any]:
        def watched(*args: Any, **kwargs: Any) -> Any:
            line = self._model_line(sys._getframe(1))
            if line is None and self._decorated(sys._getframe(1)):
                line = " (a decorator of the forward)"
            if line is not None and self._problem is None:
                self._problem = StateRefused(
                    f"keep_glue: the forward of {self.where} {what}{line}, which torch.fx does not record "
                    "(the cut would run in whatever mode its caller is in); the cut cannot keep that: cut "
                    "without keep_glue",
                    f"{what}{line}",
                )
            return original(*args, **kwargs)

        return watched

    def _random_draw(self, original: Callable[..., Any], name: str) -> Callable[..., Any]:
        def watched(*args: Any, **kwargs: Any) -> Any:
            self._drawn = True
            line = self._model_line(sys._getframe(1), direct=True)
            if line is not None:
                if self._problem is None:
                    self._problem = StateRefused(
                        f"keep_glue: the forward of {self.where} calls `{name}()`{line}, whose value the "
                        "traced graph would keep as a constant (one draw for every call of the cut); the cut "
                        "cannot keep that: cut without keep_glue",
                        f"calls `{name}()`{line}",
                    )
                raise self._problem
            return original(*args, **kwargs)

        return watched

    def _model_line(self, frame: types.FrameType | None, direct: bool = False) -> str | None:
        """`` (file:line)`` of the first frame of the model's own code from ``frame`` up to the tracing
        caller; None when there is none. ``direct``: ``frame`` itself must be the model's code, so what
        fx and torch do on the model's behalf (fx setting its constants) does not count."""
        while frame is not None and frame is not self._top:
            filename = frame.f_code.co_filename
            if not in_torch_or_featx(filename) and not filename.startswith(_GENERATED):
                return f" ({short_path(filename)}:{frame.f_lineno})"  # <stdin>, a notebook's: as they are
            if direct:
                return None
            frame = frame.f_back
        return None

    def _decorated(self, frame: types.FrameType | None) -> bool:
        """A context-manager decorator (``@torch.no_grad()``) runs between ``frame`` and the tracer."""
        while frame is not None and frame is not self._top:
            if frame.f_code.co_filename.endswith(_DECORATOR):
                return True
            frame = frame.f_back
        return False

    def _name(self, module: nn.Module, attribute: str) -> str:
        owner = self.names.get(id(module))
        if owner is None:
            return f"{type(module).__name__}.{attribute}"
        return f"{owner}.{attribute}" if owner else attribute

    def _require_no_hooks(self) -> None:
        for kind in _HOOKS:
            hooks = getattr(self.module, kind, None) or {}
            for hook in hooks.values():
                code = getattr(hook, "__code__", None)
                at = f" ({short_path(code.co_filename)}:{code.co_firstlineno})" if code is not None else ""
                what = (
                    f"has a {kind.strip('_').replace('_', ' ')[:-1]} "
                    f"`{getattr(hook, '__name__', type(hook).__name__)}`{at}"
                )
                raise StateRefused(
                    f"keep_glue: {self.where} {what}; fx traces its forward, not the module call, so the cut "
                    "would not run it: remove the hook, or cut without keep_glue",
                    what,
                    forward=False,
                )

    def _require_contents_unchanged(self) -> None:
        after = _contents(self.module)
        for key, value in self._before.items():
            if not _same(after.get(key, _MISSING), value):
                module = next(m for m in _python_modules(self.module) if id(m) == key[0])
                attribute = key[1]
                what = "in place" if isinstance(value, _Version) else "(what it holds)"
                if not isinstance(value, (_Version, _Shallow)):
                    what = "(rebinds it)"
                change = f"changes `{self._name(module, attribute)}` {what}"
                raise StateRefused(
                    f"keep_glue: the forward of {self.where} {change}, which the traced graph does not record; "
                    "the cut cannot keep that: cut without keep_glue",
                    change,
                )


_WATCHING: list[Watch] = []  # the watches entered and not left, each told of every access


class _Attributes:
    """``nn.Module``'s ``__setattr__``, ``__delattr__`` and ``__getattribute__`` replaced by ones that tell
    every entered ``Watch`` (``_WATCHING``) what the code writes and reads, while any is entered or a
    ``watching()`` block runs. Replacing one of these on ``nn.Module`` updates every subclass (a few
    milliseconds with timm loaded), so a sweep that traces the root and many containers keeps them
    replaced across all its traces (``watching``) rather than once per trace; with no watch entered
    the replacements do what the originals do."""

    def __init__(self) -> None:
        self.users = 0
        self.saved: list[tuple[str, object]] = []

    def enter(self) -> None:
        if not self.users:
            setattr_, delattr_ = nn.Module.__setattr__, nn.Module.__delattr__

            def watched_setattr(module: nn.Module, name: str, value: Any) -> None:
                for watch in _WATCHING:
                    watch._wrote(module, name, "sets")
                setattr_(module, name, value)

            def watched_delattr(module: nn.Module, name: str) -> None:
                for watch in _WATCHING:
                    watch._wrote(module, name, "deletes")
                delattr_(module, name)

            def watched_getattribute(module: nn.Module, name: str) -> Any:
                value = object.__getattribute__(module, name)
                # a plain value of the instance or of its class (methods, properties and the like are not)
                if _WATCHING and name not in _INTERNALS and _current(module, name) is not _MISSING:
                    for watch in _WATCHING:
                        watch._read(module, name, value)
                return value

            for name, value in (
                ("__setattr__", watched_setattr),
                ("__delattr__", watched_delattr),
                ("__getattribute__", watched_getattribute),
            ):
                self.saved.append((name, nn.Module.__dict__.get(name, _MISSING)))
                setattr(nn.Module, name, value)
        self.users += 1

    def leave(self) -> None:
        self.users -= 1
        if not self.users:
            for name, original in reversed(self.saved):
                if original is _MISSING:
                    delattr(nn.Module, name)
                else:
                    setattr(nn.Module, name, original)
            self.saved.clear()


_ATTRIBUTES = _Attributes()


@contextlib.contextmanager
def watching() -> Iterator[None]:
    """Keep the attribute watch of ``Watch`` on ``nn.Module`` for every trace in the block (see
    ``_Attributes``): what a sweep's traces of the root and its containers share."""
    _ATTRIBUTES.enter()
    try:
        yield
    finally:
        _ATTRIBUTES.leave()


@dataclass(frozen=True)
class _Generator:
    """A global random generator: the module whose functions draw from it, and the instance behind them."""

    name: str  # `random`, `numpy.random`
    module: types.ModuleType
    instance: Any

    def state(self) -> object:
        if self.name == "random":
            return self.instance.getstate()
        kind, keys, *rest = self.instance.get_state()
        return (kind, keys.tobytes(), *rest)

    def restore(self, state: Any) -> None:
        if self.name == "random":
            self.instance.setstate(state)
        else:
            import numpy

            kind, keys, *rest = state
            self.instance.set_state((kind, numpy.frombuffer(keys, dtype=numpy.uint32), *rest))


def _generators() -> list[_Generator]:
    """Python's global generator, and numpy's when the model's code has imported numpy."""
    found = [_Generator("random", random, random._inst)]
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        found.append(_Generator("numpy.random", numpy_random, numpy_random.mtrand._rand))
    return found


def _contents(module: nn.Module) -> dict[tuple[int, str], object]:
    """Per module and plain attribute: what it holds (a list/dict/set item by item: a write through
    ``self.__dict__`` or into a container passes no ``__setattr__``), and a tensor's version (plain tensor
    attributes, parameters and buffers: fx traces those as graph values, but code may reach them
    otherwise, ``for p in self.parameters()``)."""
    found: dict[tuple[int, str], object] = {}
    for m in _python_modules(module):
        for name, value in [*m.__dict__.items(), *m._parameters.items(), *m._buffers.items()]:
            if name in _INTERNALS and name != "training":
                continue
            if isinstance(value, torch.Tensor):
                found[(id(m), name)] = _Version(value, value._version)
            elif not isinstance(value, nn.Module):
                found[(id(m), name)] = _frozen(value)
    return found


def _python_modules(module: nn.Module) -> list[nn.Module]:
    """The modules whose state is Python's: a TorchScript module keeps its slots in C++, where a Python
    forward cannot rebind them (the guard keeps their buffer values)."""
    return [m for m in module.modules() if not isinstance(m, torch.jit.ScriptModule)]


def _frozen(value: object) -> object:
    """A shallow copy of a list/dict/set, so a later change to it shows; other values as they are."""
    if isinstance(value, dict):
        return _Shallow(type(value), tuple(itertools.chain.from_iterable(value.items())))
    if isinstance(value, (list, set)):
        return _Shallow(type(value), tuple(value))
    return value


@dataclass(frozen=True)
class _Shallow:
    kind: type
    items: tuple[object, ...]


@dataclass(frozen=True)
class _Version:
    tensor: torch.Tensor
    version: int


def _same(now: object, then: object) -> bool:
    """``now`` holds what ``then`` held: the same object, or an equal plain value; containers item by item."""
    if isinstance(then, _Shallow):
        if not isinstance(now, _Shallow):
            now = _frozen(now)
        return (
            isinstance(now, _Shallow)
            and now.kind is then.kind
            and len(now.items) == len(then.items)
            and all(_same(a, b) for a, b in zip(now.items, then.items, strict=True))
        )
    if isinstance(then, _Version):
        return isinstance(now, _Version) and now.tensor is then.tensor and now.version == then.version
    if now is then:
        return True
    if type(now) is not type(then) or isinstance(then, torch.Tensor):
        return False
    try:
        return bool(now == then) or (now != now and then != then)  # NaN is as NaN was
    except Exception:
        return False


def _show(value: object) -> str:
    if value is _MISSING:
        return "nothing"
    if isinstance(value, _Shallow):
        size = len(value.items) // (2 if value.kind is dict else 1)
        return f"a {value.kind.__name__} of {size}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def distinct(reads: Iterator[Read]) -> tuple[Read, ...]:
    """Each read once, in order (the same attribute read in eval and train mode is one read)."""
    seen: dict[tuple[int, str], Read] = {}
    for read in reads:
        seen.setdefault((id(read.module), read.attribute), read)
    return tuple(seen.values())
