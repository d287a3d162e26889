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
* :func:`sample_dpmpp_2m_sde`: its SDE form (diffusers' ``sde-dpmsolver++``, midpoint).
* :func:`ldm.diffusion.unipc.sample_unipc`: UniPC (Zhao et al. 2023), predictor UniP with the corrector UniC
  after every model call, data prediction, B(h) = e^h - 1, order 2 (or 1, 3); in its own module.

In VP terms these equal diffusers' DDPM/DDIM/Euler/Heun/DPMSolverMultistep/UniPCMultistep schedulers
step for step (tests/diffusion/test_vs_diffusers.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Cond, Denoiser, Step, StepCallback, batch_sigma
from ldm.diffusion.denoiser import report_step as _report
from ldm.diffusion.denoiser import sigma_levels as _levels
from ldm.diffusion.unipc import sample_unipc


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): go deterministically to sigma_down, then add sigma_up noise.

    sigma_up^2 = eta^2 * sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 is eta^2 times the
    variance of the DDPM posterior; sigma_down^2 + sigma_up^2 = sigma_next^2.
    """
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * sigma_next * max(sigma**2 - sigma_next**2, 0.0) ** 0.5 / sigma)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


@torch.no_grad()
def sample_ddim(model_fn: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float = 0.0, cond: Cond = None,
                generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """DDIM: x_s = x0_hat + sigma_down * eps_hat + sigma_up * z, with (sigma_down, sigma_up) from eta."""
    levels = _levels(sigmas)
    n = len(levels) - 1
    for i in range(n):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model_fn(x, batch_sigma(sigmas[i], x), cond)  # (B, ...)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = torch.lerp(denoised, x, sigma_down / sigma)  # x0 + sigma_down * (x - x0) / sigma
        if sigma_up > 0:
            x = x + sigma_up * _noise(x, generator)
        _report(callback, i, n, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_ddpm(model_fn: Denoiser, x: Tensor, sigmas: Tensor, *, cond: Cond = None,
                generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """DDPM ancestral sampling: x_s ~ q(x_s | x_t, x0_hat), the posterior of the forward process.

    In sigma space the posterior is N(x0 + (s^2/t^2)(x_t - x0), s^2 (t^2 - s^2) / t^2) for
    levels t > s, the VP posterior of Ho et al. (eq. 7) divided by sqrt(alpha_bar_s).
    """
    levels = _levels(sigmas)
    n = len(levels) - 1
    for i in range(n):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model_fn(x, batch_sigma(sigmas[i], x), cond)  # (B, ...)
        ratio = sigma_next**2 / sigma**2
        x = torch.lerp(denoised, x, ratio)  # the posterior mean
        if sigma_next > 0:
            x = x + (ratio * (sigma**2 - sigma_next**2)) ** 0.5 * _noise(x, generator)
        _report(callback, i, n, x, sigmas, denoised)
    return x


@torch.no_grad()
def invert_ddim(model_fn: Denoiser, x: Tensor, sigmas: Tensor, *, cond: Cond = None,
                callback: StepCallback | None = None) -> Tensor:
    """Run deterministic DDIM upwards: a clean ``x`` -> the noise that DDIM maps back to it.

    ``sigmas`` ascends (e.g. ``sampling_sigmas.flip(0)``, starting at 0). Each step
    predicts eps at the current level and moves to x0_hat + sigma_next * eps; the step from
    sigma = 0 uses the prediction at the first non-zero level, as x is already clean.
    """
    levels = _levels(sigmas)
    if any(b < a for a, b in zip(levels, levels[1:])):
        raise ValueError("invert_ddim needs ascending sigmas (e.g. the sampling sigmas flipped)")
    n = len(levels) - 1
    for i in range(n):
        level = levels[i] if levels[i] > 0 else levels[i + 1]
        denoised = model_fn(x, batch_sigma(level, x), cond)
        x = torch.lerp(denoised, x, levels[i + 1] / level)  # x0 + sigma_next * (x - x0) / level
        _report(callback, i, n, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_euler(model_fn: Denoiser, x: Tensor, sigmas: Tensor, *, cond: Cond = None,
                 generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """Euler steps of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma.

    x + (sigma_next - sigma) (x - D) / sigma = D + (sigma_next / sigma)(x - D): in sigma space
    an Euler step is a deterministic DDIM step.
    """
    return sample_ddim(model_fn, x, sigmas, eta=0.0, cond=cond, callback=callback)


@torch.no_grad()
def sample_euler_ancestral(model_fn: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float = 1.0, cond: Cond = None,
                           generator: torch.Generator | None = None,
                           callback: StepCallback | None = None) -> Tensor:
    """Euler step down to sigma_down, then add sigma_up noise (see :func:`ancestral_step`).

    The Euler step to sigma_down is the DDIM step to sigma_down, so this is DDIM with ``eta``.
    """
    return sample_ddim(model_fn, x, sigmas, eta=eta, cond=cond, generator=generator, callback=callback)


@torch.no_grad()
def sample_heun(model_fn: Denoiser, x: Tensor, sigmas: Tensor, *, cond: Cond = None,
                generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """Heun's 2nd-order method (2 model calls per step; 1 on the last step to sigma = 0)."""
    levels = _levels(sigmas)
    n = len(levels) - 1
    for i in range(n):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model_fn(x, batch_sigma(sigmas[i], x), cond)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = (x_euler - model_fn(x_euler, batch_sigma(sigmas[i + 1], x), cond)) / sigma_next
            x = x + (d + d_next) * (dt / 2)
        _report(callback, i, n, x, sigmas, denoised)
    return x


def _dpmpp_2m(model_fn: Denoiser, x: Tensor, sigmas: Tensor, cond: Cond, generator: torch.Generator | None,
              callback: StepCallback | None, sde: bool) -> Tensor:
    """DPM-Solver++(2M) in half-log-SNR time lambda = -log(sigma), as an ODE or (``sde``) an SDE solver.

    Each step combines the data prediction with the multistep correction, d = D + (D - D_old) h / (2 h_last)
    (none on the first step), and moves by h = log(sigma / sigma_next):
    ODE x' = (s'/s) x - expm1(-h) d; SDE x' = (s'/s) e^-h x + (1 - e^-2h) d + s' sqrt(1 - e^-2h) z.
    The step to sigma = 0 lands on the data prediction.
    """
    levels = _levels(sigmas)
    n = len(levels) - 1
    old_denoised: Tensor | None = None
    h_last = 0.0
    for i in range(n):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model_fn(x, batch_sigma(sigmas[i], x), cond)
        if sigma_next == 0:
            x = denoised  # the first-order step to sigma = 0 lands on the data prediction
        else:
            h = math.log(sigma / sigma_next)  # lambda_next - lambda
            if old_denoised is None:
                d = denoised
            else:
                r = h_last / h
                d = torch.lerp(denoised, old_denoised, -1 / (2 * r))  # (1 + 1/2r) D - (1/2r) D_old
            if sde:
                decay = -math.expm1(-2 * h)  # 1 - e^-2h
                x = (sigma_next / sigma) * math.exp(-h) * x + decay * d + sigma_next * math.sqrt(decay) * _noise(
                    x, generator)
            else:
                x = torch.lerp(d, x, sigma_next / sigma)  # (s'/s) x - expm1(-h) d, as expm1(-h) = s'/s - 1
            h_last = h
        old_denoised = denoised
        _report(callback, i, n, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model_fn: Denoiser, x: Tensor, sigmas: Tensor, *, cond: Cond = None,
                    generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): deterministic, second order from the previous step's prediction."""
    return _dpmpp_2m(model_fn, x, sigmas, cond, generator, callback, sde=False)


@torch.no_grad()
def sample_dpmpp_2m_sde(model_fn: Denoiser, x: Tensor, sigmas: Tensor, *, cond: Cond = None,
                        generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022; the midpoint form of diffusers' ``sde-dpmsolver++``)."""
    return _dpmpp_2m(model_fn, x, sigmas, cond, generator, callback, sde=True)


def progress_bar(desc: str = "sampling", **tqdm_kwargs) -> StepCallback:
    """A callback that shows a tqdm progress bar over the steps (closes itself after the last)."""
    from tqdm.auto import tqdm

    bar = None

    def callback(step: Step) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=step.total, desc=desc, unit="step", **tqdm_kwargs)
        bar.update(1)
        bar.set_postfix(sigma=f"{float(step.sigma_next):.3g}", refresh=False)
        if step.i == step.total - 1:
            bar.close()

    return callback


SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
}
