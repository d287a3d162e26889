"""Stage 2: CLIP / SigLIP text-image models on open_clip, their losses and zero-shot tasks."""

from ldm.contrastive.losses import ClipLoss, ContrastiveLoss, SigLipLoss
from ldm.contrastive.model import OpenCLIP
from ldm.contrastive.text_encoder import FrozenTextEncoder
from ldm.contrastive.zero_shot import ZeroShotTask

__all__ = ["ClipLoss", "ContrastiveLoss", "FrozenTextEncoder", "OpenCLIP", "SigLipLoss", "ZeroShotTask"]
