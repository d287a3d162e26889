"""Guidance as wrappers around a denoiser ``model_fn(x, sigma, cond) -> x0_hat``.

* :func:`classifier_free_guidance` (Ho & Salimans 2022): one batched call evaluates the
  unconditional and the conditional branch; the result is
  ``D_u + scale * (D_c - D_u)``. Since eps_hat = (x - D) / sigma is affine in D with the
  same x, guiding D equals guiding eps. ``rescale`` (Lin et al. 2024, sec. 3.4, eq. 15-16)
  matches the std of the guided eps to the conditional eps, then mixes by ``rescale``.
* :func:`gradient_guidance`: steer with a differentiable scorer of the predicted clean sample
  (classifier guidance, Dhariwal & Nichol 2021, Algorithm 1; CLIP guidance, Nichol et al. 2022
  "GLIDE" sec. 2.4). In sigma space adding ``scale * grad_x log p(y | x)`` to the score
  ``(D - x) / sigma^2`` is ``D' = D + scale * sigma^2 * grad``, the formula
  eps' = eps - sqrt(1 - alpha_bar) * s * grad of the seed lecture, in x0 terms. The gradient is
  taken through the denoiser (``grad_x score(D(x))``), cheaper at the prediction
  (``grad_{x0} score(x0)``), or on the noisy input for a scorer trained on noised samples.
* :func:`known_region_denoiser` (inpainting): the prediction is replaced by the known clean
  sample outside the mask at every step, so the sampler's last step to sigma = 0 returns the
  known region exactly (the "replace x0" form of Lugmayr et al. 2022's known-region conditioning).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Cond, Denoiser, append_dims, concat_cond

Scorer = Callable[[Tensor, Tensor, Cond], Tensor]  # (x0_hat, sigma, cond) -> (B,) log-likelihood-like score


def _expand(cond: Cond, batch: int) -> Cond:
    if cond is None:
        return None
    return {k: v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 and batch != 1 else v for k, v in cond.items()}


def rescale_guided_eps(eps_cfg: Tensor, eps_cond: Tensor, rescale: float) -> Tensor:
    """Lin et al. 2024, eq. 15-16: std-match eps_cfg to eps_cond per sample, mix by ``rescale``."""
    dims = list(range(1, eps_cfg.ndim))
    std_cond = eps_cond.std(dim=dims, keepdim=True)
    std_cfg = eps_cfg.std(dim=dims, keepdim=True)
    return rescale * eps_cfg * (std_cond / std_cfg) + (1 - rescale) * eps_cfg


def classifier_free_guidance(model_fn: Denoiser, *, scale: float, uncond: Cond, rescale: float = 0.0) -> Denoiser:
    """A denoiser that mixes ``model_fn``'s unconditional and conditional predictions.

    ``uncond`` is the condition of the unconditional branch (the null embedding), with the
    same keys as the conditions the guided denoiser will be called with (batch 1 is expanded).
    """

    def guided(x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        batch = x.shape[0]
        both = model_fn(torch.cat([x, x]), torch.cat([sigma, sigma]), concat_cond(_expand(uncond, batch), cond))
        d_uncond, d_cond = both.chunk(2)  # (B, ...) each
        d = d_uncond + scale * (d_cond - d_uncond)
        if rescale:
            s = append_dims(sigma, x.ndim)
            eps = rescale_guided_eps((x - d) / s, (x - d_cond) / s, rescale)
            d = x - s * eps
        return d

    return guided


GradientAt = Literal["denoised", "prediction", "input"]


def gradient_guidance(model_fn: Denoiser, score_fn: Scorer, *, scale: float,
                      at: GradientAt = "denoised") -> Denoiser:
    """A denoiser whose prediction is moved by ``scale * sigma^2`` times a score gradient w.r.t. the input.

    ``at`` says what the scorer sees and how the gradient is taken:

    * ``"denoised"``: the prediction ``D(x)``, gradient through the denoiser (``grad_x score(D(x))``);
    * ``"prediction"``: the prediction, gradient at the prediction (``grad_{x0} score(x0)``, no
      backward pass through the network: cheaper, GLIDE-style CLIP guidance on x0);
    * ``"input"``: the noisy input itself (``grad_x score(x)``), for a scorer trained on noised
      samples (GLIDE's noised CLIP, Dhariwal & Nichol's noisy classifier).
    """
    if at not in ("denoised", "prediction", "input"):
        raise ValueError(f"at must be 'denoised', 'prediction' or 'input', got {at!r}")

    def guided(x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        with torch.enable_grad():
            if at == "denoised":
                x_in = x.detach().requires_grad_(True)
                denoised = model_fn(x_in, sigma, cond)
                (grad,) = torch.autograd.grad(score_fn(denoised, sigma, cond).sum(), x_in)
            else:
                denoised = model_fn(x, sigma, cond).detach()
                seen = (denoised if at == "prediction" else x).detach().clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(score_fn(seen, sigma, cond).sum(), seen)
        return denoised.detach() + scale * append_dims(sigma, x.ndim) ** 2 * grad

    return guided


def known_region_denoiser(model_fn: Denoiser, known: Tensor, mask: Tensor) -> Denoiser:
    """Inpainting: keep ``known`` (B, ...) where ``mask`` is 0 and the model's prediction where it is 1."""

    def inpaint(x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        return torch.lerp(known, model_fn(x, sigma, cond), mask)

    return inpaint
