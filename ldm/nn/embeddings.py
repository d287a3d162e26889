"""Noise-level embeddings: sinusoidal features of a (fractional) timestep, then an MLP.

The features are those of the DDPM / LDM U-Net (Ho et al. 2020, appendix B; the
Transformer's positional encoding, Vaswani et al. 2017, sec. 3.5): for ``half = dim // 2``
frequencies ``f_i = max_period^(-i / half)``, ``[cos(t f_i), sin(t f_i)]``. This is the
layout of CompVis' ``timestep_embedding`` and of diffusers' ``Timesteps(flip_sin_to_cos=True,
downscale_freq_shift=0)``, so weights converted from Stable Diffusion see the same features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(B,) timesteps (any real values) -> (B, dim) sinusoidal features, cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of width ``channels`` -> Linear -> SiLU -> Linear to ``emb_channels``."""

    def __init__(self, channels: int, emb_channels: int):
        super().__init__()
        self.channels = channels
        self.linear_1 = nn.Linear(channels, emb_channels)
        self.linear_2 = nn.Linear(emb_channels, emb_channels)

    def forward(self, t: Tensor) -> Tensor:
        h = timestep_embedding(t, self.channels).to(self.linear_1.weight.dtype)  # (B, channels)
        return self.linear_2(F.silu(self.linear_1(h)))  # (B, emb_channels)
