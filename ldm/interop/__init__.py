"""Pretrained weights in and out: diffusers and CompVis / Stability layouts <-> ldm modules (pure state-dict functions)."""

from ldm.interop.autoencoder import (
    autoencoder_from_diffusers,
    autoencoder_kwargs_from_diffusers,
    autoencoder_spec,
    autoencoder_state_from_compvis,
    autoencoder_state_from_diffusers,
    autoencoder_state_to_compvis,
    autoencoder_to_diffusers,
)
from ldm.interop.unet import (
    unet_export_options,
    unet_from_diffusers,
    unet_kwargs_from_diffusers,
    unet_state_from_compvis,
    unet_state_from_diffusers,
    unet_state_to_compvis,
    unet_to_diffusers,
)

__all__ = [
    "autoencoder_from_diffusers", "autoencoder_kwargs_from_diffusers", "autoencoder_spec",
    "autoencoder_state_from_compvis", "autoencoder_state_from_diffusers", "autoencoder_state_to_compvis",
    "autoencoder_to_diffusers", "unet_export_options", "unet_from_diffusers", "unet_kwargs_from_diffusers",
    "unet_state_from_compvis", "unet_state_from_diffusers", "unet_state_to_compvis", "unet_to_diffusers",
]
