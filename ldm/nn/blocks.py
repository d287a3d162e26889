"""Convolutional blocks: ResBlock with GroupNorm and optional time embedding, down/up-sampling.

The ResBlock is the one of DDPM / LDM (Ho et al. 2020, appendix B; Rombach et al. 2022):
GroupNorm -> SiLU -> 3x3 conv, twice, with a 1x1 skip when the width changes; a time
embedding, when given, is projected and added after the first convolution.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with at most ``groups`` groups that divide ``channels`` (tiny debug widths too).

    ``eps`` 1e-6 is the LDM autoencoder's and the spatial transformers' value; the SD U-Net's
    ResBlocks use 1e-5 (diffusers' ``norm_eps``), which the U-Net passes through ``ResBlock(eps=)``.
    """
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=eps)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int | None = None, emb_channels: int = 0,
                 dropout: float = 0.0, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = group_norm(in_channels, groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_channels, out_channels) if emb_channels else None
        self.norm2 = group_norm(out_channels, groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        if self.emb is not None and emb is not None:
            h = h + self.emb(F.silu(emb))[:, :, None, None]  # (B, C_out, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, C_out, H, W)
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv.

    Padding is asymmetric (right / bottom only) as in the LDM autoencoder, or one pixel on
    every side (``symmetric``) as in the LDM / Stable Diffusion U-Net.
    """

    def __init__(self, channels: int, symmetric: bool = False):
        super().__init__()
        self.symmetric = symmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1 if symmetric else 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x if self.symmetric else F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)
