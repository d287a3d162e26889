"""The denoiser interface every sampler and guidance wrapper speaks.

A *denoiser* is a callable ``model_fn(x, sigma, cond) -> x0_hat``: it takes a noisy
sample ``x = x0 + sigma * eps`` of any shape (B, ...), the noise levels ``sigma``
(B,), and an optional condition, and returns the estimate of ``x0`` (B, ...).
Conditions are dicts of tensors with a leading batch dimension, passed to the
network as keyword arguments (``context``, ``context_mask``, ``y``, ``concat``...),
or None for an unconditional model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import Tensor

Cond = Optional[Mapping[str, Tensor]]


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor: ...


@dataclass
class Step:
    """What a sampler reports after each step (for progress bars and intermediate images)."""

    i: int  # step index, 0-based
    total: int  # number of steps
    x: Tensor  # the sample after this step, at noise level sigma_next
    sigma: Tensor  # noise level the step started from (scalar)
    sigma_next: Tensor  # noise level it ended at (scalar)
    denoised: Tensor  # the denoiser's x0 estimate at sigma


StepCallback = Callable[[Step], None]


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1) with ``ndim`` dimensions, to broadcast per-sample values."""
    if v.ndim > ndim:
        raise ValueError(f"cannot broadcast a {v.ndim}-d tensor to {ndim} dimensions")
    return v.reshape(*v.shape, *([1] * (ndim - v.ndim)))


def batch_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """A scalar or (B,) noise level as a (B,) tensor on x's device and dtype."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def concat_cond(a: Cond, b: Cond) -> Cond:
    """Stack two conditions along the batch (for one batched call of two branches)."""
    if a is None and b is None:
        return None
    if a is None or b is None or set(a) != set(b):
        raise ValueError(f"conditions to batch together need the same keys, got {sorted(a or {})} and {sorted(b or {})}")
    return {k: torch.cat([a[k], b[k]]) for k in a}


def report_step(callback: StepCallback | None, i: int, total: int, x: Tensor, sigmas: Tensor,
                denoised: Tensor) -> None:
    """Call ``callback`` (if any) with step ``i`` of ``total``."""
    if callback is not None:
        callback(Step(i=i, total=total, x=x, sigma=sigmas[i], sigma_next=sigmas[i + 1], denoised=denoised))


def sigma_levels(sigmas: Tensor) -> list[float]:
    """The noise levels as Python floats: control flow and step sizes without a device sync per step."""
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("sigmas must be a 1-d tensor of at least two noise levels")
    return sigmas.tolist()
