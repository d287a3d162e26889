"""LightningModules: thin systems that wire parts, own optimizers, logging and EMA."""

from ldm.systems.autoencoder import AutoencoderSystem
from ldm.systems.contrastive import ContrastiveSystem
from ldm.systems.latent_diffusion import LatentDiffusion
from ldm.systems.loading import load_autoencoder, load_clip, load_prior, load_system
from ldm.systems.prior import DiffusionPrior

__all__ = ["AutoencoderSystem", "ContrastiveSystem", "DiffusionPrior", "LatentDiffusion", "load_autoencoder", "load_clip",
           "load_prior", "load_system"]
