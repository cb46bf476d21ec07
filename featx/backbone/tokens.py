"""Token backbones as NCHW maps: a tap on a ViT block (B, N, C tokens) or a Swin stage (B, H, W, C) made into
the (B, C, H, W) map a detection or segmentation head takes, as timm's ``forward_intermediates(x,
output_fmt="NCHW")`` makes it.

Assumed, and read from the model (timm's attributes), never guessed from a token count: the tokens are
``num_prefix_tokens`` leading tokens (class, registers, distillation), then one token per patch of the
input, row by row, ``patch_embed.patch_size`` pixels each (a partial patch at the edge is a token only with
``patch_embed.dynamic_img_pad``); the grid is that of the input the backbone runs on, so a non-square input
gives a non-square map. The final norm (``model.norm``), with ``final_norm: true``, is applied as
``forward_intermediates(..., norm=True)`` applies it: to every tap of a plain ViT, and, on a hierarchical
model (Swin), to the last stage only — it is sized for that stage.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from featx.errors import FeatxError

LAYOUTS = ("tokens", "NHWC")  # what a tap may be made into a map from: (B, N, C) and (B, H, W, C)


@dataclasses.dataclass(frozen=True)
class TokenGrid:
    """How a token model lays out an image: ``prefix`` leading tokens, then one token per ``patch``
    (height, width in pixels) of the input, row by row; with ``pad`` a partial patch at the right or
    bottom edge is a token too (timm's ``dynamic_img_pad``), else it is dropped."""

    prefix: int
    patch: tuple[int, int]
    pad: bool = False

    @property
    def stride(self) -> int:
        """The stride of the map: the patch size (a token per patch), which need not be a power of two
        (14 in DINOv2 and EVA-02).

        Raises:
            FeatxError: the patches are not square, so no one stride says it.
        """
        if self.patch[0] != self.patch[1]:
            raise FeatxError(
                f"the patches are {self.patch[0]}x{self.patch[1]}, not square: featx gives a map one stride "
                "for both H and W"
            )
        return self.patch[0]

    def size(self, height: int, width: int) -> tuple[int, int]:
        """The grid's rows and columns for an input of ``height`` x ``width`` (timm's
        ``patch_embed.dynamic_feat_size``)."""
        if self.pad:
            return -(-height // self.patch[0]), -(-width // self.patch[1])
        return height // self.patch[0], width // self.patch[1]


@dataclasses.dataclass(frozen=True)
class TokenMap:
    """How one tap becomes an NCHW map: its ``layout`` (``tokens`` or ``NHWC``), the ``grid`` of a token
    layout, and whether the model's final norm is applied first (``norm``)."""

    layout: str
    grid: TokenGrid | None = None
    norm: bool = False

    def to_dict(self) -> dict[str, object]:
        return {"layout": self.layout, "final_norm": self.norm}


def to_map(
    value: torch.Tensor, how: TokenMap, height: int, width: int, norm: nn.Module | None = None
) -> torch.Tensor:
    """``value`` (a tap's output on an input of ``height`` x ``width``) as a (B, C, H, W) map: the final
    ``norm`` applied first when ``how.norm``, then the prefix tokens dropped and the patch tokens laid on
    the input's grid (tokens), or the channels moved before the rows (NHWC)."""
    if how.norm:
        assert norm is not None  # the backbone holds the norm of every TokenMap with `norm`
        value = norm(value)
    if how.layout == "NHWC":
        return value.permute(0, 3, 1, 2).contiguous()
    assert how.grid is not None
    rows, columns = how.grid.size(height, width)
    value = value[:, how.grid.prefix :]
    return value.reshape(value.shape[0], rows, columns, value.shape[-1]).permute(0, 3, 1, 2).contiguous()


def grid_of(model: nn.Module) -> TokenGrid | None:
    """The token grid of a timm ViT-like model (``patch_embed.patch_size``, ``num_prefix_tokens``,
    ``patch_embed.dynamic_img_pad``), or None for a model that does not declare one."""
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if isinstance(patch, int):
        patch = (patch, patch)
    if not (isinstance(patch, (tuple, list)) and len(patch) == 2 and all(isinstance(p, int) for p in patch)):
        return None
    prefix = getattr(model, "num_prefix_tokens", 0)
    if not isinstance(prefix, int) or isinstance(prefix, bool):
        return None
    return TokenGrid(prefix, (patch[0], patch[1]), bool(getattr(embed, "dynamic_img_pad", False)))


def final_norm(model: nn.Module, where: str) -> nn.Module:
    """The model's final norm (``model.norm``), for ``final_norm: true``.

    Raises:
        FeatxError: the model has no ``norm`` module (``where`` names the config key).
    """
    norm = getattr(model, "norm", None)
    if not isinstance(norm, nn.Module):
        raise FeatxError(
            f"{where} is true, and `{type(model).__name__}` has no final norm `norm` (timm's ViT, EVA, "
            "BEiT and Swin have one); set `final_norm: false`"
        )
    return norm


def last_stage(model: nn.Module) -> str | None:
    """The module whose output a hierarchical model feeds to its final norm: the last child of the child
    registered just before ``norm`` (Swin's ``layers.3``), or that child itself when it has none."""
    names = [name for name, _ in model.named_children()]
    if "norm" not in names or names.index("norm") == 0:
        return None
    before = names[names.index("norm") - 1]
    inner = [name for name, _ in model.get_submodule(before).named_children()]
    return f"{before}.{inner[-1]}" if inner else before


def evenly_spaced(n_blocks: int, k: int) -> list[int]:
    """``k`` block indices spread evenly over ``n_blocks`` blocks, ending at the last, ``n_blocks // k``
    apart: for 12 blocks and 4, 2, 5, 8, 11 (ViTDet's and mmseg's ``out_indices`` of a 12-block ViT). Not
    timm's ``forward_intermediates(x, indices=4)``, which takes the last four (8, 9, 10, 11); pass these
    as ``indices=[2, 5, 8, 11]``.

    Raises:
        FeatxError: ``k`` is not between 1 and ``n_blocks``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_blocks:
        raise FeatxError(f"{k!r} evenly spaced blocks of {n_blocks}: accepted 1 to {n_blocks}")
    step = n_blocks // k
    return [n_blocks - 1 - step * (k - 1 - i) for i in range(k)]
