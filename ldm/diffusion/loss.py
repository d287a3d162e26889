"""The denoising training loss: per-sample values, reduced by the system.

Algorithm (Ho et al. 2020, Algorithm 1, in sigma space): draw sigma from the
sigma sampler and noise n ~ N(0, I) (plus offset noise), form x = x0 + sigma * n,
run the preconditioned network, and regress its output onto the preconditioner's
target, weighted by the configured :mod:`loss weighting <ldm.diffusion.loss_weighting>`.
The defaults (uniform timesteps, eps prediction, no weighting) are exactly DDPM's
|eps - eps_theta(sqrt(abar) x0 + sqrt(1 - abar) eps, t)|^2.

Offset noise (Guttenberg 2023): ``noise += offset * n_c`` with one n_c ~ N(0, 1) per
sample and channel, shared over the spatial dimensions, so the model learns to
change the mean of a channel (very dark or bright images). It needs inputs with
spatial dimensions (B, C, ...).

Patch masking (MaskDiT, Zheng et al. 2024): ``mask`` (B, 1 | C, ...) weights the squared error per element and the
per-sample value is the mean over the counted elements, sum(mask * err^2) / sum(mask), so masked patches count
nothing. Without one, a backbone that drops tokens in training (:class:`~ldm.diffusion.DiT` with ``mask_ratio``) says
which output elements it predicted from its blocks through ``net.output_mask()`` after the forward, and that is used.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.diffusion.denoiser import Cond
from ldm.diffusion.loss_weighting import LossWeighting, NoWeighting
from ldm.diffusion.precond import Preconditioner
from ldm.diffusion.sigma_sampling import SigmaSampler, UniformTimesteps


def offset_noise_like(x: Tensor, offset: float, generator: torch.Generator | None = None) -> Tensor:
    """N(0, I) noise of x's shape plus ``offset`` times one N(0, 1) per (sample, channel)."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if offset:
        if x.ndim < 3:
            raise ValueError(f"offset noise needs (B, C, ...) inputs with spatial dimensions, got shape {tuple(x.shape)}")
        shift = torch.randn(x.shape[:2], generator=generator, device=x.device, dtype=x.dtype)
        noise = noise + offset * shift.reshape(*x.shape[:2], *([1] * (x.ndim - 2)))
    return noise


class DenoisingLoss(nn.Module):
    """Per-sample denoising loss (B,).

    Args:
        sigma_sampler: how training noise levels are drawn (default: uniform timesteps).
        weighting: lambda(sigma) of the x0 error (default: none = plain MSE on the network target).
        offset_noise: strength of per-channel offset noise (0 = off; 0.1 is common).
    """

    def __init__(self, sigma_sampler: SigmaSampler | None = None, weighting: LossWeighting | None = None,
                 offset_noise: float = 0.0):
        super().__init__()
        self.sigma_sampler = sigma_sampler if sigma_sampler is not None else UniformTimesteps()
        self.weighting = weighting if weighting is not None else NoWeighting()
        self.offset_noise = offset_noise

    def forward(self, precond: Preconditioner, net: nn.Module, x0: Tensor, cond: Cond = None, *,
                sigma: Tensor | None = None, noise: Tensor | None = None,
                generator: torch.Generator | None = None, mask: Tensor | None = None) -> Tensor:
        if sigma is None:
            sigma = self.sigma_sampler(x0.shape[0], precond, generator, device=x0.device, dtype=x0.dtype)  # (B,)
        sigma = sigma.to(device=x0.device, dtype=x0.dtype)
        if noise is None:
            noise = offset_noise_like(x0, self.offset_noise, generator)  # (B, ...)
        x = x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))) * noise  # (B, ...)
        _, out = precond.raw(net, x, sigma, cond)  # (B, ...)
        target = precond.target(x0, noise, sigma)  # (B, ...)
        if mask is None and callable(getattr(net, "output_mask", None)):
            mask = net.output_mask()  # (B, 1, ...) the patches the backbone's blocks saw, or None
        if mask is None:
            mse = (out - target).pow(2).flatten(1).mean(dim=1)  # (B,)
        else:
            mask = mask.to(out.dtype).expand_as(out)  # (B, ...)
            mse = (mask * (out - target).pow(2)).flatten(1).sum(dim=1) / mask.flatten(1).sum(dim=1).clamp_min(1)
        return self.weighting(sigma, precond).to(mse.dtype) * mse
