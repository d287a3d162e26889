"""First stages: what maps images to the space a diffusion model works in, and back.

* :class:`AutoencoderFirstStage`: a trained stage-1 autoencoder loaded frozen from its run
  (latent diffusion, Rombach et al. 2022); ``encode`` gives scaled latents.
* :class:`IdentityFirstStage`: pixel space (images in [-1, 1] are the diffusion data), so a
  pixel-space model such as GLIDE's 64x64 base model (Nichol et al. 2022) is only a config.

Both are frozen modules that stay in eval mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FirstStage(nn.Module):
    """Interface: ``encode(images) -> z``, ``decode(z) -> images``, plus the shape of z."""

    latent_channels: int
    downsample_factor: int

    def encode(self, images: Tensor, sample: bool = False) -> Tensor:
        raise NotImplementedError

    def encode_posterior(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """(mode, std or None) of the latent posterior: for drawing a fresh latent each step."""
        return self.encode(images), None

    def decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always in eval mode


class AutoencoderFirstStage(FirstStage):
    """The frozen autoencoder of a stage-1 run (a run folder or a .ckpt inside one)."""

    def __init__(self, checkpoint: str):
        super().__init__()
        from ldm.autoencoder.model import Autoencoder
        from ldm.run_parts import load_part

        self.checkpoint = checkpoint
        self.autoencoder = load_part(checkpoint, "autoencoder", Autoencoder)
        self.requires_grad_(False)
        self.eval()
        self.latent_channels = self.autoencoder.latent_channels
        self.downsample_factor = self.autoencoder.downsample_factor

    @torch.no_grad()
    def encode(self, images: Tensor, sample: bool = False) -> Tensor:
        return self.autoencoder.encode(images, sample=sample)  # (B, C, H/f, W/f), scaled

    @torch.no_grad()
    def encode_posterior(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.autoencoder.encode_posterior(images)

    def decode(self, z: Tensor) -> Tensor:
        # no no_grad here: the weights are frozen, so a graph is built only for a z that requires grad
        # (CLIP guidance differentiates a score of the decoded image w.r.t. the latent)
        return self.autoencoder.decode(z)  # (B, 3, H, W)


class IdentityFirstStage(FirstStage):
    """Pixel space: z = image."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.latent_channels = channels
        self.downsample_factor = 1

    def encode(self, images: Tensor, sample: bool = False) -> Tensor:
        return images

    def decode(self, z: Tensor) -> Tensor:
        return z
