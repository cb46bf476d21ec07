"""Small modules the tests build models from."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Scale(nn.Module):
    def __init__(self, factor: float = 2.0) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x, scale: float = 1.0):
        return x * self.factor * scale


class Describe(nn.Module):
    """Returns a string: a child whose output holds no tensor."""

    def forward(self, x):
        return f"a tensor of shape {tuple(x.shape)}"


class Between(nn.Module):
    """Two linear children ``a`` and ``b``, with the root's own ``glue(root, x)`` run between them."""

    def __init__(self, glue: Callable[[nn.Module, torch.Tensor], torch.Tensor], width: int = 4) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        self._glue = glue

    def forward(self, x):
        return self.b(self._glue(self, self.a(x)))


class Split(nn.Module):
    def forward(self, x):
        return x * 2, x * 3


class Merge(nn.Module):
    def forward(self, pair):
        a, b = pair
        return a + b


class ReturnsPair(nn.Module):
    """A child that returns a tuple: a cut after it is faithful, but it is no feature map to tap."""

    def __init__(self) -> None:
        super().__init__()
        self.split = Split()
        self.merge = Merge()

    def forward(self, x):
        return self.merge(self.split(x))


class Shout(nn.Module):
    def forward(self, x):
        raise RuntimeError("bad \x1b[31mred\x1b[0m thing \x00 and \x07 bell <stream end>")


class Noisy(nn.Module):
    """Its only child raises with terminal colour codes and a NUL byte in the message."""

    def __init__(self) -> None:
        super().__init__()
        self.child = Shout()

    def forward(self, x):
        return self.child(x)
