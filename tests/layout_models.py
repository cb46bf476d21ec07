"""Small models whose children return feature maps in layouts other than NCHW, or at strides that are not
a power of two: what a backbone must refuse to measure as NCHW maps (``featx.backbone.taps._measure``)."""

from __future__ import annotations

import torch
from torch import nn


class ToNHWC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class ToTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class ChannelsLast(nn.Module):
    """A stride-4 stem, then the map in channels-last layout (B, H, W, C), as timm's swin stages return."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.nhwc = ToNHWC()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nhwc(self.stem(x))


class Tokens(nn.Module):
    """A stride-4 patch stem, then the map as tokens (B, N, C), as a ViT's blocks take them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.tokens = ToTokens()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(self.stem(x))


class StrideThree(nn.Module):
    """A stem of stride 3: no power-of-two stride."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=3)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.stem(x))


class Stride256(nn.Module):
    """A stem of stride 256: a map of 2x2 at a 512x512 input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1, stride=256)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.stem(x))


class FixedSize(nn.Module):
    """Runs at 32x32 only (as a ViT or swin with a fixed ``img_size``); its map (B, 8, 8, 8) reads as NCHW
    and as NHWC alike at that one size."""

    def __init__(self) -> None:
        super().__init__()
        self.check = CheckSize()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(self.check(x))


class CheckSize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != (32, 32):
            raise ValueError(f"input size {tuple(x.shape[2:])} doesn't match the model's (32, 32)")
        return x


class GlueCNN(nn.Module):
    """NCHW maps with glue in the root's forward that reads a tensor of the root itself (as a ViT's
    ``cls_token``): the Sequential of the children loses the glue, a keep_glue cut keeps it."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(2.0))
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.norm = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.stem(x) * self.gain))
