"""Running a module the way featx compares it: in one mode, from one seed, without autograd."""

from __future__ import annotations

import torch
from torch import nn


def run_in_mode(module: nn.Module, x: torch.Tensor, mode: str, seed: int = 0) -> torch.Tensor:
    """``module(x)`` in ``mode`` (``eval`` or ``train``, the module switched to it) with the global RNG
    seeded with ``seed`` first, so train-mode dropout draws what another run from ``seed`` draws."""
    module.train(mode == "train")
    torch.manual_seed(seed)
    with torch.no_grad():
        return module(x)


def run_as_is(module: nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``module(x)`` in the mode it is in (nothing switched), the global RNG seeded with ``seed`` first."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return module(x)
