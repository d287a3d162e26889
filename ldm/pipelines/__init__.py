"""Inference chains over trained checkpoints (text -> image, and the unCLIP tools)."""

from ldm.pipelines.text_to_image import (
    SamplerSettings,
    TextToImage,
    initial_noise,
    sampling_sigmas,
)

__all__ = ["SamplerSettings", "TextToImage", "initial_noise", "sampling_sigmas"]
