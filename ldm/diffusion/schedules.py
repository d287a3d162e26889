"""Noise schedules as functions returning noise levels, and the conversions between them.

Everything downstream works in *sigma space* (Karras et al. 2022, "EDM", sec. 2):
a noisy sample is ``x = x0 + sigma * eps``. A discrete variance-preserving (VP)
process with cumulative product ``alpha_bar_t`` (Ho et al. 2020, eq. 4) is the
same process rescaled: ``x_vp = sqrt(alpha_bar) * x`` with

    sigma^2 = (1 - alpha_bar) / alpha_bar,      alpha_bar = 1 / (1 + sigma^2),
    log-SNR lambda = log(alpha_bar / (1 - alpha_bar)) = -2 log(sigma).

So one set of samplers serves DDPM-style discrete models (through the
preconditioner, which rescales the network input) and EDM-style continuous ones.

Beta schedules: linear (Ho et al. 2020, sec. 4), scaled-linear (Stable Diffusion:
linear in sqrt(beta)), cosine (Nichol & Dhariwal 2021, eq. 17, beta clipped at
0.999), and the zero-terminal-SNR rescale (Lin et al. 2024, Algorithm 1).
Continuous sigmas: Karras et al. 2022, eq. 5.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

Spacing = Literal["leading", "trailing", "linspace"]

#: alpha_bar is floored here so that a zero-terminal-SNR schedule keeps a finite sigma_max
#: (4096, as diffusers does); sigma = inf cannot be sampled from.
MIN_ALPHA_BAR = 2.0**-24


# ---- conversions ------------------------------------------------------------------------
def alpha_bar_to_sigma(alpha_bar: Tensor) -> Tensor:
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_alpha_bar(sigma: Tensor) -> Tensor:
    return 1 / (1 + sigma**2)


def sigma_to_logsnr(sigma: Tensor) -> Tensor:
    return -2 * sigma.log()


def logsnr_to_sigma(logsnr: Tensor) -> Tensor:
    return (-logsnr / 2).exp()


def snr(sigma: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) = 1 / sigma^2."""
    return sigma.pow(-2)


# ---- beta schedules ---------------------------------------------------------------------
def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear schedule (Ho et al. 2020)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Stable Diffusion's schedule: linear in sqrt(beta)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved DDPM's cosine schedule: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0 and alpha_bar_0 is unchanged."""
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


BETA_SCHEDULES = {"linear": linear_betas, "scaled_linear": scaled_linear_betas, "cosine": cosine_betas}


# ---- continuous sigmas ------------------------------------------------------------------
def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """``n`` noise levels from sigma_max down to sigma_min (Karras et al. 2022, eq. 5), then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv**rho, torch.zeros(1, dtype=torch.float64)])


def append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


# ---- the discrete VP schedule -----------------------------------------------------------
class DiscreteSchedule(nn.Module):
    """A discrete VP schedule: ``alpha_bar`` at ``num_timesteps`` integer timesteps.

    Converts between timestep, alpha-bar and sigma (linear interpolation of sigma
    between integer timesteps, as diffusers does), and makes sampling sigma lists.

    Args:
        beta_schedule: ``linear``, ``scaled_linear`` or ``cosine``.
        num_timesteps: T, the number of training timesteps.
        beta_start, beta_end: endpoints of the linear / scaled-linear schedules
            (default: 1e-4, 0.02 for linear; 0.00085, 0.012 for scaled-linear).
        zero_terminal_snr: rescale so that alpha_bar_{T-1} = 0 (floored at 2^-24 for sampling).
    """

    def __init__(self, beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "linear",
                 num_timesteps: int = 1000, beta_start: float | None = None, beta_end: float | None = None,
                 zero_terminal_snr: bool = False, alphas_cumprod: Tensor | None = None):
        super().__init__()
        if alphas_cumprod is None:
            if beta_schedule not in BETA_SCHEDULES:
                raise ValueError(f"unknown beta schedule {beta_schedule!r}; choose from {sorted(BETA_SCHEDULES)}")
            kwargs = {k: v for k, v in (("beta_start", beta_start), ("beta_end", beta_end)) if v is not None}
            betas = BETA_SCHEDULES[beta_schedule](num_timesteps, **kwargs)
            if zero_terminal_snr:
                betas = rescale_zero_terminal_snr(betas)
            alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.register_buffer("sigmas", alpha_bar_to_sigma(alphas_cumprod.clamp(min=MIN_ALPHA_BAR)), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at (possibly fractional) timesteps, interpolating sigma linearly."""
        t = torch.as_tensor(t, dtype=self.sigmas.dtype, device=self.sigmas.device).clamp(0, self.num_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        w = t - lo
        return (1 - w) * self.sigmas[lo] + w * self.sigmas[hi]

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Inverse of :meth:`t_to_sigma` (sigma is increasing in t), as a float timestep."""
        sigma = torch.as_tensor(sigma, device=self.sigmas.device)
        s = sigma.to(self.sigmas.dtype).clamp(self.sigmas[0], self.sigmas[-1])
        hi = torch.searchsorted(self.sigmas, s.contiguous()).clamp(1, self.num_timesteps - 1)
        lo = hi - 1
        w = (s - self.sigmas[lo]) / (self.sigmas[hi] - self.sigmas[lo])
        return (lo + w).to(sigma.dtype if sigma.is_floating_point() else torch.float64)

    def timesteps(self, n: int, spacing: Spacing = "leading", offset: int = 0) -> Tensor:
        """``n`` integer sampling timesteps, descending (Lin et al. 2024, table 2)."""
        T = self.num_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"number of steps must be in [1, {T}], got {n}")
        if spacing == "leading":
            ts = torch.arange(n, dtype=torch.float64) * (T // n) + offset
        elif spacing == "trailing":
            ts = torch.round(torch.arange(T, 0, -T / n, dtype=torch.float64)) - 1
        elif spacing == "linspace":
            ts = torch.linspace(0, T - 1, n, dtype=torch.float64).round()
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; use leading, trailing or linspace")
        return ts.long().sort(descending=True).values

    def sigmas_for(self, n: int, spacing: Spacing = "leading", offset: int = 0) -> Tensor:
        """Sampling sigmas for ``n`` steps: the timesteps' sigmas, descending, then 0."""
        return append_zero(self.sigmas[self.timesteps(n, spacing, offset)])
