"""Running a module the way featx compares it: in one mode, from one seed, without autograd; and what a model
computes at one of its modules (``value_at``), the reference the tests compare features with."""

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


def value_at(model: nn.Module, module: str, x: torch.Tensor) -> torch.Tensor:
    """What the full model computes at ``module`` (the root: its output), seen by a forward hook."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(module).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        handle.remove()
    return seen[0]
