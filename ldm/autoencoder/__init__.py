"""Stage 1: the image autoencoder (KL or VQ bottleneck), its losses and discriminator."""

from ldm.autoencoder.bottlenecks import DiagonalGaussian, VectorQuantizer
from ldm.autoencoder.discriminator import PatchDiscriminator
from ldm.autoencoder.losses import AutoencoderLoss, adaptive_weight, hinge_d_loss, vanilla_d_loss
from ldm.autoencoder.model import Autoencoder
from ldm.autoencoder.networks import Decoder, Encoder

__all__ = ["Autoencoder", "AutoencoderLoss", "Decoder", "DiagonalGaussian", "Encoder", "PatchDiscriminator",
           "VectorQuantizer", "adaptive_weight", "hinge_d_loss", "vanilla_d_loss"]
