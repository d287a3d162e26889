"""Encoder and decoder of the LDM autoencoders (Rombach et al. 2022, appendix G; Esser et al. 2021).

Encoder: conv_in -> per level ``num_res_blocks`` ResBlocks (width ``channels * mult``),
a stride-2 downsample between levels -> middle (ResBlock, self-attention, ResBlock) ->
GroupNorm, SiLU, conv_out to ``out_channels``. The decoder mirrors it. With
``len(channel_mult) = L`` levels the downsampling factor is f = 2^(L-1): (1, 2, 4, 4) is f = 8.
The decoder may start with a 1x1 conv on the latent (``latent_projection``: the
``post_quant_conv`` of the CompVis / diffusers KL autoencoders).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ldm.nn import Downsample, ResBlock, SpatialSelfAttention, Upsample, group_norm


def _check(channel_mult, downsample_factor_ok=(1, 2, 4, 8, 16)) -> int:
    f = 2 ** (len(channel_mult) - 1)
    if f not in downsample_factor_ok:
        raise ValueError(f"channel_mult of length {len(channel_mult)} gives f = {f}; use 1 to 5 levels")
    return f


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> features (B, out_channels, H/f, W/f)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 8, channels: int = 128,
                 channel_mult: tuple[int, ...] | list[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attention_levels: tuple[int, ...] | list[int] = (), mid_attention: bool = True,
                 dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.downsample_factor = _check(channel_mult)
        # the architecture, read back by weight converters (ldm.interop)
        self.channels, self.channel_mult, self.num_res_blocks = channels, tuple(channel_mult), num_res_blocks
        self.attention_levels, self.mid_attention, self.groups = tuple(attention_levels), mid_attention, groups
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        blocks: list[nn.Module] = []
        width = channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(width, channels * mult, dropout=dropout, groups=groups))
                width = channels * mult
                if level in attention_levels:
                    blocks.append(SpatialSelfAttention(width, groups=groups))
            if level != len(channel_mult) - 1:
                blocks.append(Downsample(width))
        self.down = nn.ModuleList(blocks)
        self.mid = nn.ModuleList([ResBlock(width, dropout=dropout, groups=groups),
                                  SpatialSelfAttention(width, groups=groups) if mid_attention else nn.Identity(),
                                  ResBlock(width, dropout=dropout, groups=groups)])
        self.norm_out = group_norm(width, groups)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, C, H, W)
        for block in self.down:
            h = block(h)
        for block in self.mid:
            h = block(h)  # (B, C_max, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, H/f, W/f)


class Decoder(nn.Module):
    """Latents (B, in_channels, h, w) -> images (B, out_channels, h*f, w*f).

    ``latent_projection``: a 1x1 conv on the latent before ``conv_in`` (diffusers' / CompVis'
    ``post_quant_conv``); off by default.
    """

    def __init__(self, in_channels: int = 4, out_channels: int = 3, channels: int = 128,
                 channel_mult: tuple[int, ...] | list[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attention_levels: tuple[int, ...] | list[int] = (), mid_attention: bool = True,
                 dropout: float = 0.0, groups: int = 32, latent_projection: bool = False):
        super().__init__()
        self.upsample_factor = _check(channel_mult)
        self.channels, self.channel_mult, self.num_res_blocks = channels, tuple(channel_mult), num_res_blocks
        self.attention_levels, self.mid_attention, self.groups = tuple(attention_levels), mid_attention, groups
        self.latent_proj = nn.Conv2d(in_channels, in_channels, 1) if latent_projection else None
        width = channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.mid = nn.ModuleList([ResBlock(width, dropout=dropout, groups=groups),
                                  SpatialSelfAttention(width, groups=groups) if mid_attention else nn.Identity(),
                                  ResBlock(width, dropout=dropout, groups=groups)])
        blocks: list[nn.Module] = []
        for level in reversed(range(len(channel_mult))):
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(width, channels * channel_mult[level], dropout=dropout, groups=groups))
                width = channels * channel_mult[level]
                if level in attention_levels:
                    blocks.append(SpatialSelfAttention(width, groups=groups))
            if level != 0:
                blocks.append(Upsample(width))
        self.up = nn.ModuleList(blocks)
        self.norm_out = group_norm(width, groups)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight the adaptive GAN weight takes gradient norms at (Esser et al. 2021, eq. 7)."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        if self.latent_proj is not None:
            z = self.latent_proj(z)  # (B, in_channels, h, w)
        h = self.conv_in(z)  # (B, C_max, h, w)
        for block in self.mid:
            h = block(h)
        for block in self.up:
            h = block(h)  # up to (B, C, h*f, w*f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)
