"""Inference chains over trained checkpoints (text -> image, editing, unCLIP) and the evaluation runner."""

from ldm.pipelines.editing import img2img, inpaint, invert, reconstruct
from ldm.pipelines.text_to_image import (
           SamplerSettings,
           TextToImage,
           initial_noise,
           sampling_sigmas,
)
from ldm.pipelines.unclip import UnCLIP, slerp

__all__ = ["SamplerSettings", "TextToImage", "UnCLIP", "img2img", "initial_noise", "inpaint", "invert", "reconstruct",
           "sampling_sigmas", "slerp"]
