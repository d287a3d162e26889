"""Self-attention over the pixels of a feature map, with ``scaled_dot_product_attention``.

Used in the middle of the autoencoder (Rombach et al. 2022) and in the U-Net; SDPA picks
the flash / memory-efficient kernel where the device has one.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.nn.blocks import group_norm


class SpatialSelfAttention(nn.Module):
    def __init__(self, channels: int, heads: int = 1, groups: int = 32):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        q, k, v = rearrange(qkv, "b (three n d) h w -> three b n (h w) d", three=3, n=self.heads)
        if q.stride(-1) != 1:  # NCHW: channels are strided; SDPA's fused kernels need them contiguous, or run math
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        out = rearrange(out, "b n (h w) d -> b (n d) h w", h=h, w=w)
        return x + self.proj(out)
