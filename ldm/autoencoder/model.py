"""The autoencoder: encoder -> bottleneck -> decoder, with the latent scale factor.

``encode`` returns latents multiplied by ``scale_factor`` (1 / std of the latents on
training data, Rombach et al. 2022, sec. 4.3.2), which is what the diffusion stages
see; ``decode`` divides it back out. The factor is a buffer, so it travels in the
checkpoint; it is 1 until the system estimates it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.autoencoder.bottlenecks import DiagonalGaussian, VectorQuantizer
from ldm.autoencoder.networks import Decoder, Encoder


class Autoencoder(nn.Module):
    def __init__(self, encoder: Encoder, decoder: Decoder, bottleneck: DiagonalGaussian | VectorQuantizer):
        super().__init__()
        self.encoder, self.decoder, self.bottleneck = encoder, decoder, bottleneck
        self.register_buffer("scale_factor", torch.tensor(1.0))

    @property
    def downsample_factor(self) -> int:
        return self.encoder.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.bottleneck.latent_channels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict]:
        """Images (B, 3, H, W) in [-1, 1] -> (reconstruction, unscaled latent, bottleneck info)."""
        z, info = self.bottleneck(self.encoder(x))  # (B, C, H/f, W/f)
        return self.decoder(z), z, info

    @torch.no_grad()
    def encode_posterior(self, x: Tensor, sample: bool = False) -> tuple[Tensor, Tensor | None]:
        """Images -> (scaled latents, scaled posterior std or None).

        KL: the mode (or a sample with ``sample``) and the posterior std; VQ: the codes and None.
        """
        h = self.encoder(x)
        if isinstance(self.bottleneck, DiagonalGaussian):
            z, info = self.bottleneck(h, sample=sample)
            return z * self.scale_factor, info["std"] * self.scale_factor
        return self.bottleneck(h)[0] * self.scale_factor, None

    @torch.no_grad()
    def encode(self, x: Tensor, sample: bool = False) -> Tensor:
        """Images -> scaled latents (the mode for KL unless ``sample``)."""
        return self.encode_posterior(x, sample)[0]

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents -> images in (about) [-1, 1] (differentiable: CLIP guidance needs d image / d z)."""
        return self.decoder(z / self.scale_factor)
