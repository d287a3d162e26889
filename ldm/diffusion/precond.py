"""Preconditioners: turn a raw network into a denoiser ``D(x, sigma) -> x0_hat``.

Following Karras et al. 2022 (EDM), table 1: the network F only ever sees a scaled
input ``c_in(sigma) * x`` and a noise conditioning value ``c_noise(sigma)``, and

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma))

* discrete VP models (DDPM, Stable Diffusion): ``c_in = 1 / sqrt(1 + sigma^2)`` turns
  ``x`` into the VP sample, ``c_noise`` is the (fractional) training timestep, and the
  network predicts

  - eps (Ho et al. 2020):        c_skip = 1,               c_out = -sigma
  - v (Salimans & Ho 2022):      c_skip = 1 / (1+sigma^2), c_out = -sigma / sqrt(1+sigma^2)
  - x0:                          c_skip = 0,               c_out = 1

* EDM: c_skip = sd^2/(sigma^2+sd^2), c_out = sigma*sd/sqrt(sigma^2+sd^2),
  c_in = 1/sqrt(sigma^2+sd^2), c_noise = log(sigma)/4.

The network is called ``net(c_in * x, c_noise, **cond)``. For training, each
preconditioner also gives the network's own regression target and the factor
``c_out^2`` that relates an error on that target to an error on x0
(``|D - x0|^2 = c_out^2 |F - target|^2``), which is how the loss expresses every
weighting in one place.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from ldm.diffusion.denoiser import Cond, append_dims
from ldm.diffusion.schedules import DiscreteSchedule, karras_sigmas

#: how sampling spaces its noise levels: a discrete VP schedule's timestep spacings, or Karras et al.'s
SamplingSpacing = Literal["leading", "trailing", "linspace", "karras"]


class Preconditioner(nn.Module):
    """Base class: subclasses define the c_* coefficients and the noise conditioning."""

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) for noise levels ``sigma`` (B,)."""
        raise NotImplementedError

    def noise_cond(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma_from_noise_cond(self, c_noise: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def sigma_min(self) -> float:
        raise NotImplementedError

    @property
    def sigma_max(self) -> float:
        raise NotImplementedError

    def initial_noise_scale(self, sigma: Tensor | float, flow: bool = False) -> Tensor:
        """Std of the marginal at ``sigma`` for unit-variance data: sqrt(1 + sigma^2). (``flow``: the level is a
        flow time, for a sampler in a flow model's own space; see :meth:`flow_space`.)"""
        return (1 + torch.as_tensor(sigma) ** 2).sqrt()

    def flow_space(self, sampler: str | None) -> bool:
        """Whether ``sampler`` runs in this model's flow space (levels t from 1, unscaled noise, the flow denoiser:
        :class:`~ldm.diffusion.FlowPrecond` with Euler / Heun) rather than the sigma space every sampler knows."""
        return False

    def sigma_levels(self, steps: int, spacing: SamplingSpacing = "leading") -> Tensor:
        """``steps`` + 1 descending noise levels ending in 0 (float64): Karras et al.'s between ``sigma_min``
        and ``sigma_max`` (the spacing of a continuous model; discrete schedules override)."""
        return karras_sigmas(steps, self.sigma_min, self.sigma_max)

    #: c_skip is 1 (eps prediction): D = x + c_out * F saves a multiplication per call
    unit_skip = False

    def raw(self, net: nn.Module, x: Tensor, sigma: Tensor, cond: Cond = None) -> tuple[Tensor, Tensor]:
        """(x0_hat, network output) for noisy ``x`` (B, ...) at ``sigma`` (B,)."""
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in self.coefficients(sigma))
        out = net(x * c_in, self.noise_cond(sigma), **(cond or {}))  # (B, ...)
        skip = x if self.unit_skip else c_skip * x
        return torch.addcmul(skip, c_out.to(out.dtype), out), out

    def forward(self, net: nn.Module, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        return self.raw(net, x, sigma, cond)[0]

    def target(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """What the network should output for ``x = x0 + sigma * noise``: (x0 - c_skip x) / c_out."""
        c_skip, c_out, _ = (append_dims(c, x0.ndim) for c in self.coefficients(sigma))
        return (x0 - c_skip * (x0 + append_dims(sigma, x0.ndim) * noise)) / c_out

    def output_weight(self, sigma: Tensor) -> Tensor:
        """c_out^2: an error of 1 on the network output is an error of c_out^2 on x0 (squared)."""
        return self.coefficients(sigma)[1] ** 2

    def bind(self, net: nn.Module, flow: bool = False):
        """The denoiser ``model_fn(x, sigma, cond) -> x0_hat`` for samplers (``flow``: see :meth:`flow_space`)."""
        return partial(self.forward, net)


class VPPrecond(Preconditioner):
    """Common part of the discrete VP parameterisations (subclasses set c_skip / c_out)."""

    def __init__(self, schedule: DiscreteSchedule | None = None):
        super().__init__()
        self.schedule = schedule if schedule is not None else DiscreteSchedule()

    def noise_cond(self, sigma: Tensor) -> Tensor:
        return self.schedule.sigma_to_t(sigma).to(sigma.dtype)

    def sigma_from_noise_cond(self, c_noise: Tensor) -> Tensor:
        return self.schedule.t_to_sigma(c_noise).to(c_noise.dtype)

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def sigma_levels(self, steps: int, spacing: SamplingSpacing = "leading") -> Tensor:
        """The schedule's own timesteps (``spacing`` leading / trailing / linspace), or Karras levels for ``karras``."""
        if spacing == "karras":
            return super().sigma_levels(steps, spacing)
        return self.schedule.sigmas_for(steps, spacing)

    def _c_in(self, sigma: Tensor) -> Tensor:
        return (1 + sigma**2).rsqrt()


class EpsPrecond(VPPrecond):
    """The network predicts the noise eps (DDPM, Stable Diffusion 1.x)."""

    unit_skip = True

    def coefficients(self, sigma):
        return torch.ones_like(sigma), -sigma, self._c_in(sigma)


class VPrecond(VPPrecond):
    """The network predicts v = alpha * eps - sigma_vp * x0 (Salimans & Ho 2022; SD 2.x 768)."""

    def coefficients(self, sigma):
        c_in = self._c_in(sigma)
        return c_in**2, -sigma * c_in, c_in


class X0Precond(VPPrecond):
    """The network predicts x0 directly (DALL-E 2's prior)."""

    def coefficients(self, sigma):
        return torch.zeros_like(sigma), torch.ones_like(sigma), self._c_in(sigma)


class EDMPrecond(Preconditioner):
    """EDM preconditioning (Karras et al. 2022, table 1) for continuous noise levels."""

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.sigma_data = sigma_data
        self._sigma_min, self._sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data * (sigma**2 + sd2).rsqrt()
        c_in = (sigma**2 + sd2).rsqrt()
        return c_skip, c_out, c_in

    def noise_cond(self, sigma):
        return sigma.log() / 4

    def sigma_from_noise_cond(self, c_noise):
        return (4 * c_noise).exp()

    def initial_noise_scale(self, sigma, flow: bool = False):
        return (torch.as_tensor(sigma) ** 2 + self.sigma_data**2).sqrt()

    @property
    def sigma_min(self) -> float:
        return self._sigma_min

    @property
    def sigma_max(self) -> float:
        return self._sigma_max


def sampling_sigmas(precond: Preconditioner, steps: int, spacing: SamplingSpacing = "leading",
                    flow: bool = False) -> Tensor:
    """The noise levels of ``steps`` sampling steps: descending, ending in exactly one 0 (length steps + 1).

    A discrete VP model samples its own timesteps (``spacing`` leading / trailing / linspace); ``karras``,
    and every continuous model (EDM), use Karras et al.'s levels between the preconditioner's
    ``sigma_min`` and ``sigma_max``; a flow-matching model its flow times as sigmas (:mod:`ldm.diffusion.flow`).
    With ``flow`` (a flow model's Euler / Heun: :meth:`Preconditioner.flow_space`) the levels are the flow times
    themselves, from 1 (``spacing`` does not apply).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    levels = precond.sampling_levels(steps) if flow else precond.sigma_levels(steps, spacing)
    return levels.float()
