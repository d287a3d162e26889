"""The diffusion core: schedules, preconditioners, training loss, samplers, guidance.

Pure torch, shared by the unCLIP prior and the U-Net; general over tensor shapes.
"""

from ldm.diffusion.conditioner import Conditioner, TextEncoder
from ldm.diffusion.conditioning import (
    ConditionDropout,
    drop_condition,
    drop_randomly,
    null_condition,
)
from ldm.diffusion.denoiser import Cond, Denoiser, Step, StepCallback, append_dims
from ldm.diffusion.guidance import (
    classifier_free_guidance,
    gradient_guidance,
    known_region_denoiser,
    rescale_guided_eps,
)
from ldm.diffusion.dit import DiT
from ldm.diffusion.flow import FLOW_SAMPLERS, FlowPrecond, time_shift
from ldm.diffusion.loss import DenoisingLoss, offset_noise_like
from ldm.diffusion.mmdit import MMDiT
from ldm.diffusion.repa import FrozenImageEncoder, RepresentationAlignment
from ldm.diffusion.loss_weighting import (
    EDMWeighting,
    LossWeighting,
    MinSNRWeighting,
    NoWeighting,
)
from ldm.diffusion.precond import (
    EDMPrecond,
    EpsPrecond,
    Preconditioner,
    VPPrecond,
    VPrecond,
    X0Precond,
    sampling_sigmas,
)
from ldm.diffusion.prior import PriorTransformer
from ldm.diffusion.samplers import (
    SAMPLERS,
    invert_ddim,
    progress_bar,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from ldm.diffusion.schedules import DiscreteSchedule, karras_sigmas
from ldm.diffusion.sigma_sampling import (
    LogitNormalSigmas,
    LogNormalSigmas,
    SigmaSampler,
    UniformTimesteps,
)
from ldm.diffusion.unet import UNet
from ldm.diffusion.unipc import sample_unipc

__all__ = [
    "DiT", "MMDiT", "FrozenImageEncoder", "RepresentationAlignment", "FLOW_SAMPLERS", "FlowPrecond", "time_shift",
    "SAMPLERS", "Cond", "ConditionDropout", "Conditioner", "DenoisingLoss", "Denoiser", "DiscreteSchedule", "EDMPrecond",
    "EDMWeighting", "EpsPrecond", "LogNormalSigmas", "LogitNormalSigmas", "LossWeighting", "MinSNRWeighting",
    "NoWeighting", "Preconditioner", "PriorTransformer", "SigmaSampler", "Step", "StepCallback", "TextEncoder", "UNet", "UniformTimesteps",
    "VPPrecond", "VPrecond", "X0Precond", "append_dims", "classifier_free_guidance", "drop_condition", "drop_randomly",
    "gradient_guidance", "invert_ddim", "known_region_denoiser", "karras_sigmas", "null_condition", "offset_noise_like",
    "progress_bar", "rescale_guided_eps", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_euler",
    "sample_euler_ancestral", "sample_heun", "sample_unipc", "sampling_sigmas",
]
