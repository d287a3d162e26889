"""Noised CLIP (Nichol et al. 2022, "GLIDE", sec. 2.4): a contrastive model that also sees noisy images.

CLIP guidance is sound only when the classifier reads the same kind of input the sampler holds:
GLIDE trains its CLIP on noised images ``x_t`` so the gradient can be taken at ``x_t`` itself.
Training (:class:`~ldm.systems.ContrastiveSystem` ``noised_fraction``): a fraction of each batch
becomes ``sqrt(a) x + sqrt(1 - a) eps`` with ``a = cos^2(pi/2 u)``, ``u ~ U(0, 1)`` (the cosine
schedule's alpha_bar at a uniform time). No timestep is given to the towers: the model learns to
read every noise level. Sampling (:func:`vp_input`): the sampler's ``x = x0 + sigma eps`` maps to
the same variance-preserving form by ``x / sqrt(1 + sigma^2)`` (``a = 1 / (1 + sigma^2)``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.diffusion.denoiser import append_dims


def noise_images(images: Tensor, fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """Images (B, 3, H, W) with a random ``fraction`` of rows replaced by their noised versions."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"noised_fraction must be in [0, 1], got {fraction}")
    if fraction == 0.0:
        return images
    b = images.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=images.device)  # noqa: E731
    u = rand(b)
    alpha_bar = torch.cos(0.5 * math.pi * u) ** 2
    eps = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    noised = append_dims(alpha_bar.sqrt(), images.ndim) * images + append_dims((1 - alpha_bar).sqrt(), images.ndim) * eps
    chosen = append_dims(rand(b) < fraction, images.ndim)
    return torch.where(chosen, noised.to(images.dtype), images)


def vp_input(x: Tensor, sigma: Tensor) -> Tensor:
    """The sampler's ``x0 + sigma * eps`` (B, ...) as the variance-preserving ``x_t`` a noised CLIP was trained on."""
    return x / append_dims((1 + sigma.to(x) ** 2).sqrt(), x.ndim)
