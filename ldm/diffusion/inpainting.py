"""The concat-channel inpainting route (Stable Diffusion's inpainting models; Rombach et al. 2022, sec. 4.5).

The U-Net gets ``latent_channels + 1`` extra input channels: the masked clean latent
``z * (1 - m)`` and the mask ``m`` (1 = regenerate). Training draws random masks per sample
(:func:`random_masks`): with probability ``p_full`` the whole image (plain generation, so the
model still samples from text alone), else one random box. At sampling the image's latent and the
user's mask go in the same channels; the pipelines also re-impose the known region at every step.
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_masks(batch: int, height: int, width: int, *, p_full: float = 0.25, min_frac: float = 0.25,
                 max_frac: float = 0.75, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> Tensor:
    """(batch, 1, height, width) masks of 0 / 1: the whole image with probability ``p_full``, else one box whose
    sides are ``min_frac`` to ``max_frac`` of the image's, at a uniform position."""
    u = torch.rand(batch, 5, generator=generator)  # full?, box height, box width, top, left
    masks = torch.zeros(batch, 1, height, width)
    for i in range(batch):
        if u[i, 0] < p_full:
            masks[i] = 1
            continue
        bh = max(1, round(height * (min_frac + (max_frac - min_frac) * float(u[i, 1]))))
        bw = max(1, round(width * (min_frac + (max_frac - min_frac) * float(u[i, 2]))))
        top, left = int(float(u[i, 3]) * (height - bh + 1)), int(float(u[i, 4]) * (width - bw + 1))
        masks[i, :, top: top + bh, left: left + bw] = 1
    return masks.to(device)


def inpaint_concat(z: Tensor, mask: Tensor) -> Tensor:
    """The U-Net's extra input (B, C + 1, h, w): the latent with the region to regenerate zeroed, and the mask."""
    mask = mask.to(z.dtype)
    return torch.cat([z * (1 - mask), mask], dim=1)
