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


class Looped(nn.Module):
    """A root that calls its grandchildren itself, as timm's EVA does (``for blk in self.blocks``), with a
    position parameter added before them and a scale passed to each."""

    def __init__(self, width: int = 4, depth: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.pos = nn.Parameter(torch.linspace(-1.0, 1.0, width))
        self.blocks = nn.ModuleList(Scale(1.5) for _ in range(depth))
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        x = self.stem(x) + self.pos
        for blk in self.blocks:
            x = blk(x, scale=0.5)
        return self.head(self.drop(x))


class DataDependent(nn.Module):
    """Its forward branches on a tensor's value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        x = self.a(x)
        if x.sum() > 0:
            x = x * 2
        return self.b(x)


class Skip(nn.Module):
    """The output reads the input again after `b`: the data flow is no chain at the cut after `a`."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(x)) + x


class Reuse(nn.Module):
    """`a` runs again after `b`: its last call needs `b`, a child after a cut at `a`."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(self.b(self.a(x)))


class TrainOnly(nn.Module):
    """Glue that runs in train mode only, behind a Python branch on ``self.training``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        x = self.a(x)
        if self.training:
            x = torch.nn.functional.dropout(x, p=0.5) * 3
        return self.b(x)


class WithConstant(nn.Module):
    """Glue that adds a tensor made in the forward: fx keeps it as an attribute of the root."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(x) + torch.tensor([1.0, 2.0, 3.0, 4.0]))


class Around(nn.Module):
    """A root whose ``stage`` is the container a nested cut goes into: ``stem``, ``stage``, ``head``, with no
    glue of its own. ``stage`` defaults to ``DataDependent`` (a container torch.fx cannot trace); ``twice``
    calls it two times."""

    def __init__(self, stage: nn.Module | None = None, twice: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.stage = stage if stage is not None else DataDependent()
        self.head = nn.Linear(4, 2)
        self.twice = twice

    def forward(self, x):
        x = self.stage(self.stem(x))
        if self.twice:
            x = self.stage(x)  # the second call of the container
        return self.head(x)


class ResidualAfterLast(nn.Module):
    """Feature maps through ``stem`` and ``head``; the root adds ``stem``'s output to ``head``'s after its
    last child, so the model's output is not what ``head`` returns."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        h = self.stem(x)
        return self.head(h) + h


class _Pair(nn.Module):
    """Two 1x1 convolutions ``a`` and ``b``, registered in that order; ``how`` says what the forward does."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.how = how
        self.calls = 0

    def forward(self, x):
        if self.how == "counts":
            self.calls += 1  # sets
        if self.how == "swapped":
            return self.a(self.b(x))
        if self.how == "parallel":  # both read the input
            y = self.a(x)
            return self.b(x) + y
        return self.b(self.a(x))


class HoldsPair(nn.Module):
    """``stem``, a ``_Pair`` named ``pair`` and ``head``, run in order: a container to tap inside."""

    def __init__(self, how: str = "chain") -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.pair = _Pair(how)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.head(self.pair(self.stem(x)))


class OwnNorm(nn.BatchNorm2d):
    """A BatchNorm subclass: ``norm: frozen`` replaces only ``nn.BatchNorm2d`` itself, so this one keeps
    normalising by the batch in train mode."""


class WithOwnNorm(nn.Module):
    """``conv`` then ``norm`` (an ``OwnNorm``), run in order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = OwnNorm(4)

    def forward(self, x):
        return self.norm(self.conv(x))


class GlueBetweenConvs(nn.Module):
    """``stem`` and ``block`` convolutions with the root's own glue between them: ``x * 2 + 1`` and, in
    train mode, dropout (so a train-mode tap after it depends on the RNG)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        x = nn.functional.dropout(self.stem(x) * 2 + 1, 0.5, self.training)
        return self.block(x)


class DoublesBetween(nn.Module):
    """``b(2 * a(x))``: the root's ``* 2`` is glue a cut through ``b`` loses, by an amount its weights decide."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)

    def forward(self, x):
        return self.b(2 * self.a(x))


class ScalesByInt(nn.Module):
    """Two 1x1 convolutions; between them the root multiplies by ``int`` of a tensor, which fx cannot
    trace through unless ``int`` is kept whole (``leaf_functions``)."""

    pretrained_cfg = {"input_size": (3, 8, 8)}  # noqa: RUF012 (timm's attribute, read-only here)

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.b(self.a(x) * int(x.abs().sum() > 1))


class _ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class GlueBetweenStages(nn.Module):
    """Three stages of two blocks with the root's own glue before and between them (the input normalised,
    a stage's output scaled): plain cuts at `stage2` and `stage3` lose it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.stage1 = nn.Sequential(_ConvBlock(8, 8, 2), _ConvBlock(8, 8, 1))
        self.stage2 = nn.Sequential(_ConvBlock(8, 16, 2), _ConvBlock(16, 16, 1))
        self.stage3 = nn.Sequential(_ConvBlock(16, 16, 2), _ConvBlock(16, 16, 1))

    def forward(self, x):
        x = self.stem((x - 0.45) / 0.226)
        x = self.stage1(x)
        x = self.stage2(x) * 0.5
        return self.stage3(x)


BUILT: list[nn.Module] = []  # every `Recorded` made, in order: what a verb built from a spec


class Recorded(nn.Module):
    """A small randomly initialised chain that remembers each instance (``BUILT``), so a test can read the
    init a verb built from the spec ``tests.toy_models:Recorded``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        BUILT.append(self)

    def forward(self, x):
        return self.b(self.a(x))
