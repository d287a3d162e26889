"""Samplers as pure functions: ``sample_NAME(model_fn, x, sigmas, *, cond, generator, callback)``.

All work in sigma space (``x = x0 + sigma * eps``, see :mod:`ldm.diffusion.schedules`),
with a denoiser ``model_fn(x, sigma, cond) -> x0_hat`` and a descending list of noise
levels ending in 0 (``sigmas``, length steps + 1). ``x`` is the initial sample at
``sigmas[0]`` (for a VP model: ``randn * sqrt(1 + sigmas[0]^2)``). Any tensor shape
works: images (B, C, H, W), latents, embedding vectors (B, D).

* :func:`sample_ddpm`: ancestral sampling from the DDPM posterior q(x_s | x_t, x0_hat)
  (Ho et al. 2020, Algorithm 2, eq. 7, "fixed small" variance), for any sub-sequence of levels.
* :func:`sample_ddim`: DDIM (Song et al. 2021, eq. 12); eta = 0 deterministic, eta = 1 is DDPM.
* :func:`invert_ddim`: deterministic DDIM run upwards, image -> noise (Song et al. 2021, sec. 4.3).
* :func:`sample_euler`: Euler on the probability-flow ODE dx/dsigma = (x - D(x)) / sigma (Karras et al. 2022).
* :func:`sample_euler_ancestral`: Euler to a lower level, then fresh noise (k-diffusion).
* :func:`sample_heun`: Karras et al. 2022, Algorithm 1 without churn (Euler on the last step to 0).
* :func:`sample_dpmpp_2m`: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data prediction,
  multistep, first order on the first step and on the last step to sigma = 0.

In VP terms these equal diffusers' DDPM/DDIM/Euler/Heun/DPMSolverMultistep schedulers
step for step (tests/diffusion/test_samplers_vs_diffusers.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Cond, Denoiser, Step, StepCallback, batch_sigma


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _report(callback: StepCallback | None, i: int, total: int, x: Tensor, sigma: Tensor, sigma_next: Tensor,
            denoised: Tensor) -> None:
    if callback is not None:
        callback(Step(i=i, total=total, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))


def _check(sigmas: Tensor) -> None:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("sigmas must be a 1-d tensor of at least two noise levels")


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """(sigma_down, sigma_up): go deterministically to sigma_down, then add sigma_up noise.

    sigma_up^2 = eta^2 * sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 is eta^2 times the
    variance of the DDPM posterior; sigma_down^2 + sigma_up^2 = sigma_next^2.
    """
    if eta == 0 or float(sigma_next) == 0:
        return sigma_next, torch.zeros_like(sigma_next)
    sigma_up = (eta * sigma_next * (sigma**2 - sigma_next**2).clamp(min=0).sqrt() / sigma).clamp(max=sigma_next)
    return (sigma_next**2 - sigma_up**2).sqrt(), sigma_up


@torch.no_grad()
def sample_ddim(model_fn: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float = 0.0, cond: Cond = None,
                generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """DDIM: x_s = x0_hat + sigma_down * eps_hat + sigma_up * z, with (sigma_down, sigma_up) from eta."""
    _check(sigmas)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model_fn(x, batch_sigma(sigma, x), cond)  # (B, ...)
        eps = (x - denoised) / sigma
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = denoised + sigma_down * eps
        if float(sigma_up) > 0:
            x = x + sigma_up * _noise(x, generator)
        _report(callback, i, n, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_ddpm(model_fn: Denoiser, x: Tensor, sigmas: Tensor, *, cond: Cond = None,
                generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """DDPM ancestral sampling: x_s ~ q(x_s | x_t, x0_hat), the posterior of the forward process.

    In sigma space the posterior is N(x0 + (s^2/t^2)(x_t - x0), s^2 (t^2 - s^2) / t^2) for
    levels t > s, the VP posterior of Ho et al. (eq. 7) divided by sqrt(alpha_bar_s).
    """
    _check(sigmas)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model_fn(x, batch_sigma(sigma, x), cond)  # (B, ...)
        ratio = sigma_next**2 / sigma**2
        mean = denoised + ratio * (x - denoised)
        if float(sigma_next) > 0:
            std = (ratio * (sigma**2 - sigma_next**2)).sqrt()
            x = mean + std * _noise(x, generator)
        else:
            x = mean
        _report(callback, i, n, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def invert_ddim(model_fn: Denoiser, x: Tensor, sigmas: Tensor, *, cond: Cond = None,
                callback: StepCallback | None = None) -> Tensor:
    """Run deterministic DDIM upwards: a clean ``x`` -> the noise that DDIM maps back to it.

    ``sigmas`` ascends (e.g. ``sampling_sigmas.flip(0)``, starting at 0). Each step
    predicts eps at the current level and moves x0_hat + sigma_next * eps; the step from
    sigma = 0 uses the prediction at the first non-zero level, as x is already clean.
    """
    if sigmas.ndim != 1 or len(sigmas) < 2 or bool((sigmas[1:] < sigmas[:-1]).any()):
        raise ValueError("invert_ddim needs ascending sigmas (e.g. the sampling sigmas flipped)")
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        level = sigma if float(sigma) > 0 else sigma_next
        denoised = model_fn(x, batch_sigma(level, x), cond)
        eps = (x - denoised) / level
        x = denoised + sigma_next * eps
        _report(callback, i, n, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_euler(model_fn: Denoiser, x: Tensor, sigmas: Tensor, *, cond: Cond = None,
                 generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """Euler steps of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma."""
    _check(sigmas)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model_fn(x, batch_sigma(sigma, x), cond)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
        _report(callback, i, n, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(model_fn: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float = 1.0, cond: Cond = None,
                           generator: torch.Generator | None = None,
                           callback: StepCallback | None = None) -> Tensor:
    """Euler step down to sigma_down, then add sigma_up noise (see :func:`ancestral_step`)."""
    _check(sigmas)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model_fn(x, batch_sigma(sigma, x), cond)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if float(sigma_up) > 0:
            x = x + sigma_up * _noise(x, generator)
        _report(callback, i, n, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_heun(model_fn: Denoiser, x: Tensor, sigmas: Tensor, *, cond: Cond = None,
                generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """Heun's 2nd-order method (2 model calls per step; 1 on the last step to sigma = 0)."""
    _check(sigmas)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model_fn(x, batch_sigma(sigma, x), cond)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if float(sigma_next) == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = (x_euler - model_fn(x_euler, batch_sigma(sigma_next, x), cond)) / sigma_next
            x = x + (d + d_next) / 2 * dt
        _report(callback, i, n, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model_fn: Denoiser, x: Tensor, sigmas: Tensor, *, cond: Cond = None,
                    generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver++(2M) in half-log-SNR time lambda = -log(sigma)."""
    _check(sigmas)
    n = len(sigmas) - 1
    old_denoised: Tensor | None = None
    h_last: Tensor | None = None
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model_fn(x, batch_sigma(sigma, x), cond)
        if float(sigma_next) == 0:
            x = denoised  # the first-order step to sigma = 0 lands on the data prediction
        else:
            h = sigma.log() - sigma_next.log()  # lambda_next - lambda
            if old_denoised is None:
                d = denoised
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - torch.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        _report(callback, i, n, x, sigma, sigma_next, denoised)
    return x


SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}
