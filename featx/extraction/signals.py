"""How a run stops when it is told to: SIGINT and SIGTERM alike, and a torchrun rank with its launcher.

A scheduler stops a job with SIGTERM (Slurm, Kubernetes, ``timeout``), a person with Ctrl-C (SIGINT). Both
become a ``KeyboardInterrupt`` raised in the main thread, so the run unwinds as it does for Ctrl-C: the
DataLoader's workers are shut down, a half-written file's temporary is removed, every finished shard is kept.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import types
from collections.abc import Iterator


class Signalled(KeyboardInterrupt):
    """Raised in the main thread by SIGINT or SIGTERM while ``stopping_on_signals`` is in force."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _raise(number: int, frame: object) -> None:
    raise Signalled(signal.Signals(number).name)


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise ``Signalled`` (a ``KeyboardInterrupt``) naming the signal.

    Installed from the main thread only, and only over Python's default handlers: a handler the caller set
    is left alone. The previous handlers are back when the block ends. DataLoader workers forked inside
    the block inherit the handler, and a worker ends quietly on a ``KeyboardInterrupt``.
    """
    installed = {}
    if threading.current_thread() is threading.main_thread():
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        for number, default in defaults.items():
            if signal.getsignal(number) is default:
                installed[number] = signal.signal(number, _raise)
    try:
        yield
    finally:
        for number, previous in installed.items():
            signal.signal(number, previous)


def quiet_worker(worker_id: int) -> None:
    """A DataLoader worker's init: SIGINT and SIGTERM are ignored in it, the run's process stops it.

    A signal sent to the whole process group (Ctrl-C in a terminal, Slurm's ``scancel``, torchrun's agent
    stopping a rank) reaches the workers too. Left to torch, a worker dies of it or ends on a
    ``KeyboardInterrupt``, and its SIGCHLD can reach the run's process first: the kernel then hands the
    run's own signal to another of its threads, and the main thread sleeps through it in the DataLoader's
    5-second wait. Ignored here, the run's process alone acts on the signal and shuts its workers down; a
    worker whose parent died ends at its next sample (torch's watchdog). A connection error in the thread
    that hands a batch's shared memory to the parent (the parent stopped while fetching it) is not printed:
    that batch is not needed any more.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.excepthook = _quiet_connection_errors  # multiprocessing.resource_sharer reports through it


def _quiet_connection_errors(
    kind: type[BaseException], value: BaseException, tb: types.TracebackType | None
) -> None:
    if not issubclass(kind, (ConnectionError, EOFError)):
        sys.__excepthook__(kind, value, tb)


def die_with_launcher() -> None:
    """Have Linux send this process SIGTERM when its parent (torchrun's agent) dies, so no rank outlives a
    killed launcher; a no-op on other systems, or where ``prctl`` cannot be called."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # no libc to ask: the rank then lives as long as it would anyway
        return
