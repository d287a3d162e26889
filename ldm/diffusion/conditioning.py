"""Conditioning dropout for classifier-free guidance training.

With probability ``p`` per sample the condition is replaced by a null condition (Ho &
Salimans 2022, Algorithm 1): zeros, or a learned embedding (as DALL-E 2's prior and
Imagen do). The Bernoulli mask is drawn per sample, so a batch mixes conditional and
unconditional examples; the same null is what the sampler's unconditional branch uses.

:class:`ConditionDropout` drops one tensor; :func:`drop_condition` drops a whole dict condition
(context, its mask, a vector) with one draw per sample, the null being :func:`null_condition`.
"""

from __future__ import annotations

from collections.abc import Mapping
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


#: condition keys that are never dropped: concatenated inputs (inpainting masks, low-res images) are
#: part of the task, not the prompt, and stay in both branches of classifier-free guidance
KEEP_KEYS = ("concat",)


def null_condition(cond: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The unconditional counterpart of a dict condition, used in training (dropout) and guidance.

    Feature tensors (``context``, ``y`` vectors) become zeros; masks (keys ending in ``mask``)
    become all-True, so attention over the zero context is defined; :data:`KEEP_KEYS` stay.
    """
    out = {}
    for key, value in cond.items():
        if key in KEEP_KEYS:
            out[key] = value
        elif key.endswith("mask"):
            out[key] = torch.ones_like(value, dtype=torch.bool)
        elif not value.is_floating_point():
            raise ValueError(f"cannot make a null condition for the integer tensor {key!r} (class labels): "
                             "reserve a null class and drop labels in the data instead")
        else:
            out[key] = torch.zeros_like(value)
    return out


def drop_condition(cond: Mapping[str, Tensor], drop: Tensor) -> dict[str, Tensor]:
    """Replace the rows of ``cond`` where ``drop`` (B,) is True by :func:`null_condition` (one draw per sample)."""
    null = null_condition(cond)
    return {k: torch.where(drop.reshape(-1, *([1] * (v.ndim - 1))).to(v.device), null[k], v) for k, v in cond.items()}


def drop_randomly(cond: Mapping[str, Tensor], p: float,
                  generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """(``cond`` with each sample's whole condition nulled with probability ``p``, the drop mask (B,))."""
    first = next(iter(cond.values()))
    drop = torch.rand(len(first), generator=generator, device=generator.device if generator else first.device)
    drop = (drop < p).to(first.device)  # (B,)
    return drop_condition(cond, drop), drop
