"""Loss weightings, each stated as lambda(sigma) on the x0 error |D(x) - x0|^2.

The loss is computed on the network's own output (whatever the preconditioner makes
it predict) and multiplied by ``lambda(sigma) * c_out(sigma)^2``, which is the same
as weighting the x0 error by lambda. So one weighting means the same thing for
every parameterisation:

* :class:`NoWeighting`: plain MSE on the network's target (lambda = 1 / c_out^2);
  with eps prediction this is DDPM's "simple" loss |eps_hat - eps|^2.
* :class:`MinSNRWeighting`: lambda = min(SNR, gamma) (Hang et al. 2023, eq. 9), i.e.
  min(SNR, gamma) / SNR on the eps error and min(SNR, gamma) / (SNR + 1) on the v error.
* :class:`EDMWeighting`: lambda = (sigma^2 + sd^2) / (sigma * sd)^2 (Karras et al. 2022, eq. 8).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.diffusion.precond import Preconditioner
from ldm.diffusion.schedules import snr


class LossWeighting:
    def x0_weight(self, sigma: Tensor, precond: Preconditioner) -> Tensor:
        """lambda(sigma), the weight of the squared x0 error."""
        raise NotImplementedError

    def __call__(self, sigma: Tensor, precond: Preconditioner) -> Tensor:
        """The weight of the squared error on the network output."""
        return self.x0_weight(sigma, precond) * precond.output_weight(sigma)


class NoWeighting(LossWeighting):
    def x0_weight(self, sigma, precond):
        return 1 / precond.output_weight(sigma)

    def __call__(self, sigma, precond):
        return torch.ones_like(sigma)


class MinSNRWeighting(LossWeighting):
    def __init__(self, gamma: float = 5.0):
        self.gamma = gamma

    def x0_weight(self, sigma, precond):
        return snr(sigma).clamp(max=self.gamma)


class EDMWeighting(LossWeighting):
    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def x0_weight(self, sigma, precond):
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
