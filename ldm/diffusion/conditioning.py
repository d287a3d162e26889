"""Conditioning dropout for classifier-free guidance training.

With probability ``p`` per sample the condition is replaced by a null condition (Ho &
Salimans 2022, Algorithm 1): zeros, or a learned embedding (as DALL-E 2's prior and
Imagen do). The Bernoulli mask is drawn per sample, so a batch mixes conditional and
unconditional examples; the same null is what the sampler's unconditional branch uses.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn


class ConditionDropout(nn.Module):
    """Replace a (B, ...) condition by a null condition with probability ``p`` per sample.

    Args:
        shape: shape of one condition without the batch dimension, e.g. (77, 768) for text
            tokens or (512,) for a CLIP embedding (needed for the learned null).
        p: drop probability during training (0.1 in DALL-E 2 and Stable Diffusion).
        null: ``zero`` (a zero tensor) or ``learned`` (a trained parameter, initialised at 0).
    """

    def __init__(self, shape: tuple[int, ...] | list[int], p: float = 0.1, null: Literal["zero", "learned"] = "zero"):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop probability must be in [0, 1], got {p}")
        if null not in ("zero", "learned"):
            raise ValueError(f"null must be 'zero' or 'learned', got {null!r}")
        self.p = p
        self.shape = tuple(shape)
        if null == "learned":
            self.null = nn.Parameter(torch.zeros(self.shape))
        else:
            self.register_buffer("null", torch.zeros(self.shape), persistent=False)

    def null_like(self, cond: Tensor) -> Tensor:
        """The null condition for a batch like ``cond`` (B, ...)."""
        return self.null.to(cond.dtype).expand(cond.shape[0], *self.shape)

    def forward(self, cond: Tensor, p: float | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(condition with dropped rows replaced, the boolean drop mask (B,))."""
        if tuple(cond.shape[1:]) != self.shape:
            raise ValueError(f"condition of shape {tuple(cond.shape[1:])} per sample, expected {self.shape}")
        p = self.p if p is None else p
        drop = torch.rand(cond.shape[0], generator=generator, device=generator.device if generator else "cpu") < p
        drop = drop.to(cond.device)
        mask = drop.reshape(-1, *([1] * len(self.shape)))
        return torch.where(mask, self.null_like(cond), cond), drop
