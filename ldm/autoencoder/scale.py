"""The latent scale factor, estimated while the autoencoder trains.

Latent diffusion (Rombach et al. 2022) divides the latents by their standard deviation so that the
diffusion model sees inputs of about unit variance: 0.18215 for Stable Diffusion's KL-f8, which CompVis's
``scale_by_std`` measured as ``1 / z.flatten().std()`` on the first batch of a trained encoder
(``ldm/models/diffusion/ddpm.py``). Here the factor ``1 / sqrt(E[z^2] - E[z]^2)`` (over every element of
the latents) follows the encoder as it trains: the two moments are exponential moving averages over the
training batches, the first batch taken as it is, so every checkpoint carries the factor of its own
encoder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LatentScaleEstimator(nn.Module):
    """Running moments of the latents and the scale factor ``1 / std`` they give.

    Args:
        momentum: weight of the running moments at each update (0.99: a window of about 100 batches).

    Buffers (in the state dict, so a resumed run continues the same averages): ``moments`` = running
    (E[z], E[z^2]); ``count`` = the updates so far.
    """

    def __init__(self, momentum: float = 0.99):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("moments", torch.tensor([0.0, 1.0]))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @property
    def scale(self) -> Tensor:
        """``1 / std`` of the latents seen so far: a scalar, 1 before the first update."""
        var = (self.moments[1] - self.moments[0] ** 2).clamp(min=1e-12)
        return var.rsqrt()

    @torch.no_grad()
    def update(self, z: Tensor) -> Tensor:
        """Adds a batch of latents (any shape, e.g. (B, C, h, w)); returns the new :attr:`scale`."""
        m = 0.0 if int(self.count) == 0 else self.momentum
        batch = torch.stack([z.float().mean(), z.float().pow(2).mean()])  # (2,): E[z], E[z^2] of the batch
        self.moments.mul_(m).add_(batch, alpha=1 - m)
        self.count += 1
        return self.scale
