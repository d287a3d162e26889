"""Keeping the denoiser's x0 estimate in the data range: static clipping and dynamic thresholding.

A pixel-space model predicts x0 in [-1, 1], but early in sampling (high noise, strong guidance) its
estimate overshoots, and the sampler carries the overshoot into high-frequency noise in the final
image. DDPM's and GLIDE's samplers clip the estimate to [-1, 1] (diffusers' ``clip_sample``); Imagen
(Saharia et al. 2022, sec. 2.3) thresholds dynamically: per sample, s = the ``ratio`` quantile of
|x0|, at least 1, and x0 -> clamp(x0, -s, s) / s, which pushes saturated pixels inwards instead of
flattening them (diffusers' ``thresholding``).

Here it wraps the denoiser, so every sampler gets it: a sampler derives its direction from the
clipped x0, as GLIDE does (diffusers' DDIM with ``use_clipped_model_output=True``). Latent models
must not clip: latents are not in [-1, 1].
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Cond, Denoiser, append_dims

Threshold = Literal["none", "clip", "dynamic"]


def dynamic_threshold(x0: Tensor, ratio: float = 0.995, max_value: float = float("inf")) -> Tensor:
    """Imagen's dynamic thresholding of x0 estimates (B, ...), as diffusers' ``_threshold_sample``:
    s = clamp(quantile(|x0|, ratio), 1, max_value) per sample, then clamp(x0, -s, s) / s. (With diffusers'
    default ``sample_max_value=1`` this is plain clipping; Imagen bounds s by nothing.)"""
    flat = x0.reshape(x0.shape[0], -1).abs()
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile needs float32 / float64
    s = torch.quantile(flat, ratio, dim=1).clamp(min=1.0, max=max_value).to(x0.dtype)  # (B,)
    s = append_dims(s, x0.ndim)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def thresholded(model_fn: Denoiser, mode: Threshold, *, limit: float = 1.0, ratio: float = 0.995,
                max_value: float = float("inf")) -> Denoiser:
    """``model_fn`` with its x0 estimate clipped to [-limit, limit] (``clip``) or dynamically thresholded
    (``dynamic``, with ``ratio`` and ``max_value``); ``none`` returns it unchanged."""
    if mode == "none":
        return model_fn
    if mode not in ("clip", "dynamic"):
        raise ValueError(f"unknown threshold {mode!r}: none, clip or dynamic")

    def denoise(x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        x0 = model_fn(x, sigma, cond)
        if mode == "clip":
            return x0.clamp(-limit, limit)
        return dynamic_threshold(x0, ratio, max_value)

    return denoise
