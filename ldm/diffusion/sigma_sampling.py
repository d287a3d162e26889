"""Noise-level sampling for training: which sigmas the loss is evaluated at.

* :class:`UniformTimesteps`: t ~ U{0, ..., T-1} of a discrete VP schedule (Ho et al. 2020, Algorithm 1); for a
  flow-matching model (:class:`~ldm.diffusion.flow.FlowPrecond`) the flow time t ~ U(0, 1).
* :class:`LogitNormalSigmas`: u ~ logit-normal(m, s) on (0, 1) (Esser et al. 2024, sec. 3.1), mapped to
  a fractional timestep u * (T-1) of a discrete schedule, to the flow time t = u of a flow-matching model (SD3;
  shifted with its ``shift_training``), or to log-sigma between sigma_min and sigma_max.
* :class:`LogNormalSigmas`: ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, sec. 5).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.diffusion.precond import Preconditioner, VPPrecond


class SigmaSampler:
    def __call__(self, n: int, precond: Preconditioner, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        raise NotImplementedError


def _schedule(precond: Preconditioner, who: str):
    if not isinstance(precond, VPPrecond):
        raise ValueError(f"{who} needs a discrete VP preconditioner (EpsPrecond, VPrecond, X0Precond), "
                         f"got {type(precond).__name__}; use LogNormalSigmas or LogitNormalSigmas with EDM")
    return precond.schedule


class UniformTimesteps(SigmaSampler):
    """Integer timesteps drawn uniformly: the DDPM training algorithm."""

    def __call__(self, n, precond, generator=None, device=None, dtype=torch.float32):
        if hasattr(precond, "training_sigma"):  # flow matching: t ~ U(0, 1)
            gen_device = generator.device if generator is not None else "cpu"
            u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64)
            return precond.training_sigma(u).to(device=device, dtype=dtype)
        schedule = _schedule(precond, "UniformTimesteps")
        t = torch.randint(0, schedule.num_timesteps, (n,), generator=generator, device=generator.device if generator else "cpu")
        return schedule.sigmas.to(t.device)[t].to(device=device, dtype=dtype)


class LogitNormalSigmas(SigmaSampler):
    def __init__(self, mean: float = 0.0, std: float = 1.0):
        self.mean, self.std = mean, std

    def __call__(self, n, precond, generator=None, device=None, dtype=torch.float32):
        gen_device = generator.device if generator is not None else "cpu"
        u = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, device=gen_device,
                                                             dtype=torch.float64))
        if hasattr(precond, "training_sigma"):  # flow matching: t = u (SD3's logit-normal time sampling)
            sigma = precond.training_sigma(u)
        elif isinstance(precond, VPPrecond):
            sigma = precond.schedule.t_to_sigma(u * (precond.schedule.num_timesteps - 1))
        else:
            lo, hi = torch.tensor(precond.sigma_min).log(), torch.tensor(precond.sigma_max).log()
            sigma = (lo + u * (hi - lo)).exp()
        return sigma.to(device=device, dtype=dtype)


class LogNormalSigmas(SigmaSampler):
    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        self.p_mean, self.p_std = p_mean, p_std

    def __call__(self, n, precond, generator=None, device=None, dtype=torch.float32):
        gen_device = generator.device if generator is not None else "cpu"
        log_sigma = self.p_mean + self.p_std * torch.randn(n, generator=generator, device=gen_device)
        return log_sigma.exp().to(device=device, dtype=dtype)
