"""The ranks of an extraction: one process, or one per ``torchrun`` process with a process group.

gloo on CPU, nccl on CUDA (``--device cuda`` is the rank's local GPU). A collective that fails because a
peer died raises ``RankFailed`` with the backend's first sentence, so the run ends in one line (exit 3).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator

import torch

from featx.errors import FeatxError, one_line
from featx.extraction import signals


class RankFailed(RuntimeError):
    """A collective failed: another rank of the run died (torchrun's agent then stops the rest)."""


@contextlib.contextmanager
def ranks(device: str) -> Iterator[tuple[int, int, torch.device, str]]:
    """This process's rank, the world size, its device and the run's id (the same on every rank).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) a process group is made: gloo on CPU, nccl on CUDA, where
    ``--device cuda`` means the rank's local GPU (``LOCAL_RANK``).
    """
    import uuid

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = device_of(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    made = False
    if world > 1:
        signals.die_with_launcher()  # its SIGTERM then stops this rank as any SIGTERM does
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        made = True
    run_id = [uuid.uuid4().hex if rank == 0 else None]
    if world > 1:
        try:
            dist.broadcast_object_list(run_id, src=0)
        except RuntimeError as err:
            raise RankFailed(_first_sentence(err)) from None
    try:
        yield rank, world, dev, str(run_id[0])
    except BaseException:
        # A signal, a dead peer, an error: tearing the group down would wait for the peers (~5 s on gloo
        # when one is dead) while the process is on its way out; its exit releases the group.
        made = False
        raise
    finally:
        if made:
            dist.destroy_process_group()


def from_rank_0(value: list[str], world: int) -> list[str]:
    """Rank 0's ``value``, on every rank."""
    if world == 1:
        return value
    import torch.distributed as dist

    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def barrier(world: int, dev: torch.device) -> None:
    if world > 1:
        import torch.distributed as dist

        try:
            work = dist.barrier(async_op=True, device_ids=[dev.index] if dev.type == "cuda" else None)
            while not work.is_completed():  # waited for here, where a signal can stop the wait
                time.sleep(0.02)
            work.wait()
        except RuntimeError as err:  # gloo: "Connection closed by peer"; nccl: a DistBackendError
            raise RankFailed(_first_sentence(err)) from None


def _first_sentence(err: BaseException) -> str:
    """A collective's error, short: gloo's "[pair.cc:561] Connection closed by peer [host]:port. This is
    typically caused by..." becomes "Connection closed by peer [host]:port"."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", one_line(err))
    return text.split(". ")[0].rstrip(".")


def device_of(text: str) -> torch.device:
    from featx.devices import torch_device

    dev = torch_device(text, "--device")  # the command line's own checks and sentences
    if dev.type not in ("cpu", "cuda"):  # ranks run on gloo (CPU) or nccl (CUDA)
        raise FeatxError(f"--device `{text}` is not supported by extract; accepted: cpu, cuda, cuda:N")
    return dev
