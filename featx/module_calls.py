"""How the recorder sees module calls: while a recording runs, ``nn.Module._call_impl`` is featx's
``_call``, which hands each call of a recorded model's modules to that model's recorder
(``featx.recorder._Recorder.call``) and lets every other call through to torch's own. A keep_glue proof's
run that reuses recorded calls (``featx.glue_proof._Reuse``) sees them the same way.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from torch import nn


class _Sees(Protocol):
    """Who is handed a model's module calls: the recorder (``featx.recorder._Recorder``), or a keep_glue
    proof's run that reuses recorded calls (``featx.glue_proof._Reuse``)."""

    @property
    def module_info(self) -> Mapping[int, Any]: ...  # id(module) -> what ``call`` gets as ``info``

    def call(self, module: nn.Module, info: Any, args: tuple, kwargs: dict) -> Any: ...


class _ModuleCalls:
    """Who sees module calls while recordings run: ``nn.Module._call_impl`` (what ``nn.Module.__call__``
    calls) is featx's ``_call`` then, and hands each call of a recorded model's modules to that model's
    recorder (``_Recorder.call``).

    One function on the class, not a forward pre-hook and a hook on every module: with hooks,
    ``_call_impl`` takes its slow path on every call, which on a small model costs a fifth of a forward;
    the call here adds one Python frame. (torch.fx's tracer patches ``__call__`` the same way; replacing a
    dunder updates a slot in every subclass, a millisecond with timm loaded, so featx replaces the method
    ``__call__`` calls.) It is on while any thread records (counted under a lock) and each thread has its
    own recorder, so calls of other models, and from other threads, pass straight through.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.previous: Any = nn.Module._call_impl  # what ``_call`` calls: torch's own
        self.local = threading.local()

    @contextlib.contextmanager
    def seen_by(self, recorder: _Sees) -> Iterator[None]:
        outer = getattr(self.local, "recorder", None)
        with self.lock:
            if not self.users:
                self.previous = nn.Module._call_impl
                nn.Module._call_impl = _call  # type: ignore[method-assign,assignment]
            self.users += 1
        self.local.recorder = recorder
        try:
            yield
        finally:
            self.local.recorder = outer
            with self.lock:
                self.users -= 1
                if not self.users:
                    nn.Module._call_impl = self.previous  # type: ignore[method-assign]


_CALLS = _ModuleCalls()


def _call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``nn.Module._call_impl`` while a recording runs."""
    recorder = getattr(_CALLS.local, "recorder", None)
    if recorder is not None:
        info = recorder.module_info.get(id(module))
        if info is not None:
            return recorder.call(module, info, args, kwargs)
    return _CALLS.previous(module, *args, **kwargs)
