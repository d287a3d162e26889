"""LightningModules: thin systems that wire parts, own optimizers, logging and EMA."""

from ldm.systems.autoencoder import AutoencoderSystem

__all__ = ["AutoencoderSystem"]
