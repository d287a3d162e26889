"""Image editing with a trained latent-diffusion run: img2img, inpainting, DDIM inversion.

* :func:`img2img` (SDEdit, Meng et al. 2022): encode the image, noise it to the level reached
  after ``(1 - strength)`` of the sampling schedule, and sample the rest with the prompt.
* :func:`inpaint`: sample from noise while the denoiser's prediction keeps the image's latent
  outside the mask at every step (:func:`~ldm.diffusion.known_region_denoiser`); a model trained
  for inpainting (``Conditioner(inpainting=True)``) also reads the masked latent and the mask
  through its concat channels (:mod:`ldm.diffusion.inpainting`); the last step
  returns the known latent exactly, so outside the mask the result is the autoencoder's
  reconstruction of the input (up to the decoder's receptive field at the mask's edge).
* :func:`invert` / :func:`reconstruct`: deterministic DDIM from the image's latent up to noise
  (Song et al. 2021, sec. 4.3) and back down with the same condition.

Images are (B, 3, H, W) in [-1, 1]; prompts one per image; ``settings`` as for text -> image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.diffusion import (
    SAMPLERS,
    invert_ddim,
    known_region_denoiser,
    progress_bar,
)
from ldm.diffusion.samplers import sample_ddim
from ldm.pipelines.text_to_image import (
    SamplerSettings,
    TextToImage,
    initial_noise,
    sampler_options,
    sampling_sigmas,
)


def _denoiser(pipe: TextToImage, prompts: Sequence[str], settings: SamplerSettings, like: Tensor,
              known: Tensor | None = None, mask: Tensor | None = None, embeddings: Tensor | None = None):
    """(guided denoiser, condition) for the prompts (and the negative prompt of ``settings``); an inpainting-trained
    model also gets the known latents and the mask (default: generate everything) in its concat channels; a decoder
    of CLIP embeddings is conditioned on ``embeddings`` when given."""
    cond, uncond = pipe.conditions(prompts, like, settings, embeddings=embeddings, known=known, mask=mask)
    return pipe.denoiser_for(prompts, cond, uncond, settings), cond


def _bar(progress: bool, desc: str):
    return progress_bar(desc) if progress else None


def _sample(model_fn, x: Tensor, sigmas: Tensor, cond, settings: SamplerSettings, progress: bool = False,
            desc: str = "sampling") -> Tensor:
    gen = torch.Generator(x.device).manual_seed(settings.seed)
    return SAMPLERS[settings.sampler](model_fn, x, sigmas, cond=cond, generator=gen, callback=_bar(progress, desc),
                                      **sampler_options(settings))


@torch.no_grad()
def img2img(pipe: TextToImage, images: Tensor, prompts: Sequence[str], settings: SamplerSettings,
            strength: float = 0.6, progress: bool = False) -> Tensor:
    """SDEdit: ``strength`` 0 returns the (reconstructed) input, 1 samples from pure noise."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    system = pipe.system
    z0 = system.first_stage.encode(images.to(system.device))  # (B, C, h, w)
    sigmas = sampling_sigmas(system.precond, settings.steps, settings.spacing).to(z0)
    start = min(settings.steps - 1, round((1.0 - strength) * settings.steps))
    sigmas = sigmas[start:]
    noise = initial_noise(len(z0), z0.shape[1:], settings.seed).to(z0)
    x = z0 + sigmas[0] * noise  # the marginal at sigma_start around this image
    model_fn, cond = _denoiser(pipe, prompts, settings, z0)
    return system.first_stage.decode(_sample(model_fn, x, sigmas, cond, settings, progress, "img2img")).clamp(-1, 1)


def latent_mask(mask: Tensor, shape: Sequence[int]) -> Tensor:
    """A pixel mask (B, 1, H, W), 1 = regenerate, as a latent mask (B, 1, h, w): a latent is regenerated
    when any pixel it covers is."""
    return (F.adaptive_max_pool2d(mask.float(), tuple(shape[-2:])) > 0).float()


@torch.no_grad()
def inpaint(pipe: TextToImage, images: Tensor, mask: Tensor, prompts: Sequence[str], settings: SamplerSettings,
            decode: bool = True, progress: bool = False) -> Tensor:
    """Regenerate the masked pixels (mask 1) for the prompts; keep the rest (latents with ``decode=False``)."""
    system = pipe.system
    z0 = system.first_stage.encode(images.to(system.device))
    m = latent_mask(mask.to(z0.device), z0.shape)  # (B, 1, h, w)
    sigmas = sampling_sigmas(system.precond, settings.steps, settings.spacing).to(z0)
    x = initial_noise(len(z0), z0.shape[1:], settings.seed).to(z0) * system.precond.initial_noise_scale(sigmas[0]).to(z0)
    model_fn, cond = _denoiser(pipe, prompts, settings, z0, known=z0, mask=m)  # the concat route, if trained
    z = _sample(known_region_denoiser(model_fn, z0, m), x, sigmas, cond, settings, progress, "inpainting")
    return system.first_stage.decode(z).clamp(-1, 1) if decode else z


@torch.no_grad()
def invert(pipe: TextToImage, images: Tensor, prompts: Sequence[str], settings: SamplerSettings,
           progress: bool = False, embeddings: Tensor | None = None) -> Tensor:
    """The noise latents (B, C, h, w) that deterministic DDIM with these prompts (or, for a decoder of CLIP
    embeddings, these ``embeddings``) maps back to the images."""
    system = pipe.system
    z0 = system.first_stage.encode(images.to(system.device))
    sigmas = sampling_sigmas(system.precond, settings.steps, settings.spacing).to(z0)
    model_fn, cond = _denoiser(pipe, prompts, settings, z0, embeddings=embeddings)
    return invert_ddim(model_fn, z0, sigmas.flip(0), cond=cond, callback=_bar(progress, "DDIM inversion"))


@torch.no_grad()
def reconstruct(pipe: TextToImage, noise: Tensor, prompts: Sequence[str], settings: SamplerSettings,
                decode: bool = True, progress: bool = False, embeddings: Tensor | None = None) -> Tensor:
    """Deterministic DDIM from inverted noise: images (or latents with ``decode=False``)."""
    system = pipe.system
    sigmas = sampling_sigmas(system.precond, settings.steps, settings.spacing).to(noise)
    model_fn, cond = _denoiser(pipe, prompts, settings, noise, embeddings=embeddings)
    z = sample_ddim(model_fn, noise, sigmas, cond=cond, callback=_bar(progress, "DDIM reconstruction"))
    return system.first_stage.decode(z).clamp(-1, 1) if decode else z
