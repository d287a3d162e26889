"""CLIP-guided sampling (Nichol et al. 2022, "GLIDE", sec. 2.4; seed 001).

Every denoiser call is moved along the gradient of the CLIP similarity between the image and
the prompt: ``D' = D + scale * sigma^2 * grad cos(f(image), g(prompt))`` (the core's
:func:`~ldm.diffusion.gradient_guidance`). Two kinds of CLIP:

* a plain CLIP reads clean images, so it scores the *predicted* clean sample: the first
  stage decodes the prediction (differentiably) and the gradient is taken at the prediction
  (``through_denoiser=False``, cheap) or through the U-Net to the noisy input (``True``);
* a noised CLIP (a contrastive run trained with ``noised_fraction > 0``,
  :mod:`ldm.contrastive.noised`) reads the noisy sample itself, so the gradient is taken at the
  sampler's input, as GLIDE does. Its training noise is pixel noise, so this mode needs a
  pixel-space run (``IdentityFirstStage``); a latent run's noisy latents are not noisy images.

Guidance composes with classifier-free guidance (``settings.cfg``) and with the editing
pipelines (img2img, inpainting), which call :meth:`TextToImage.denoiser_for`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ldm.autoencoder.first_stage import IdentityFirstStage
from ldm.contrastive.noised import vp_input
from ldm.diffusion import gradient_guidance
from ldm.pipelines.text_to_image import SamplerSettings, TextToImage


def clip_similarity(clip, images: Tensor, prompts: Sequence[str]) -> Tensor:
    """Cosine similarity (B,) between CLIP embeddings of images (B, 3, H, W) in [-1, 1] and prompts."""
    with torch.no_grad():
        text = clip.embed_texts(list(prompts))  # (B, D), normalised
    return (clip.encode_image(images.to(text.device)) * text).sum(-1)


class ClipGuided(TextToImage):
    """Text -> image (and the editing pipelines) with CLIP guidance on top of the system's own conditioning.

    Args:
        system: the latent-diffusion run.
        clip: the guiding :class:`~ldm.contrastive.OpenCLIP` (default: the run's own text encoder's CLIP).
        scale: guidance scale (multiplies ``sigma^2`` times the gradient of the cosine similarity).
        noised: the CLIP was trained on noised images: score the noisy input (pixel-space runs only).
        through_denoiser: for a plain CLIP, back-propagate through the U-Net as well.
    """

    def __init__(self, system, clip=None, *, scale: float = 100.0, noised: bool = False,
                 through_denoiser: bool = False, batch_size: int = 16, prior=None, clip_text=None,
                 prior_options: dict | None = None):
        super().__init__(system, batch_size=batch_size, prior=prior, clip_text=clip_text, prior_options=prior_options)
        if clip is None:
            if self.text_encoder is None or not self.text_encoder.has_image_tower:
                raise ValueError("CLIP guidance needs a CLIP: pass clip (a contrastive run) or use a run whose text "
                                 "encoder is a whole CLIP (this one has none, or a text tower alone)")
            clip = self.text_encoder.model
        if noised and not isinstance(system.first_stage, IdentityFirstStage):
            raise ValueError("a noised CLIP reads noisy pixels, but this run diffuses autoencoder latents: "
                             "use a plain CLIP (noised=False), which scores the decoded prediction")
        self.clip = clip.to(system.device).eval().requires_grad_(False)
        self.scale, self.noised, self.through_denoiser = scale, noised, through_denoiser

    def flow_space(self, settings: SamplerSettings) -> bool:
        """CLIP guidance reads sigma-space levels: a flow model's Euler / Heun run in the sigma-space view here."""
        return False

    def denoiser_for(self, prompts: Sequence[str], cond, uncond, settings: SamplerSettings, flow: bool = False):
        model_fn = self.guided_denoiser(cond, uncond, settings)
        if self.scale == 0:
            return model_fn
        decode, prompts = self.system.first_stage.decode, list(prompts)

        def score(x: Tensor, sigma: Tensor, _cond) -> Tensor:
            images = vp_input(x, sigma) if self.noised else decode(x)  # not clamped: clamping zeroes the gradient
            return clip_similarity(self.clip, images, prompts)

        at = "input" if self.noised else ("denoised" if self.through_denoiser else "prediction")
        return gradient_guidance(model_fn, score, scale=self.scale, at=at)
