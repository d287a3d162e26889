"""Stage 1: the image autoencoder (KL or VQ bottleneck), its losses and discriminator."""

from ldm.autoencoder.bottlenecks import DiagonalGaussian, VectorQuantizer
from ldm.autoencoder.discriminator import PatchDiscriminator
from ldm.autoencoder.first_stage import (
           AutoencoderFirstStage,
           FirstStage,
           IdentityFirstStage,
)
from ldm.autoencoder.losses import (
           AutoencoderLoss,
           adaptive_weight,
           hinge_d_loss,
           vanilla_d_loss,
)
from ldm.autoencoder.model import Autoencoder
from ldm.autoencoder.networks import Decoder, Encoder
from ldm.autoencoder.scale import LatentScaleEstimator

__all__ = ["Autoencoder", "AutoencoderFirstStage", "AutoencoderLoss", "Decoder", "DiagonalGaussian", "Encoder",
           "FirstStage", "IdentityFirstStage", "LatentScaleEstimator", "PatchDiscriminator", "VectorQuantizer",
           "adaptive_weight", "hinge_d_loss", "vanilla_d_loss"]
