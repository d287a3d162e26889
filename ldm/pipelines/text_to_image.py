"""Text -> image with a trained latent-diffusion run: encode prompts, guide, sample, decode.

The chain of Rombach et al. 2022, sec. 4.3 / Stable Diffusion: prompt tokens -> frozen
text encoder -> U-Net denoiser (preconditioned) wrapped in classifier-free guidance ->
any sampler of :mod:`ldm.diffusion.samplers` from pure noise -> first-stage decoder.

Determinism: the initial noise of image ``i`` is drawn from a CPU generator seeded with
``seed + i``, so an image depends on its seed and prompt only, not on the batch it was
drawn in or the device; ancestral samplers also draw per-chunk noise from ``seed``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

from ldm.diffusion import (
    SAMPLERS,
    classifier_free_guidance,
    progress_bar,
)
from ldm.autoencoder import IdentityFirstStage
from ldm.diffusion.precond import SamplingSpacing as Spacing
from ldm.diffusion.precond import sampling_sigmas
from ldm.diffusion.thresholding import thresholded


@dataclass
class SamplerSettings:
    """How to sample: the sampler's name (a key of ``SAMPLERS``), steps, guidance scale, seed.

    ``eta`` is the noise of DDIM / Euler-ancestral steps; ``rescale`` the guidance rescale of
    Lin et al. 2024; ``spacing`` the timestep spacing (``karras`` for continuous models);
    ``threshold`` what happens to the (guided) x0 estimate at every step (:mod:`ldm.diffusion.thresholding`):
    ``clip`` to [-1, 1], Imagen's ``dynamic`` thresholding, or ``none``; ``auto`` clips a pixel-space
    model and leaves latents alone. ``negative_prompt``: the condition of classifier-free guidance's
    other branch (what to steer away from); empty, it is the null condition (plain CFG).
    """

    sampler: str = "dpmpp_2m"
    steps: int = 20
    cfg: float = 5.0
    seed: int = 0
    eta: float = 0.0
    rescale: float = 0.0
    spacing: Spacing = "leading"
    threshold: Literal["auto", "none", "clip", "dynamic"] = "auto"
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.threshold not in ("auto", "none", "clip", "dynamic"):
            raise ValueError(f"unknown threshold {self.threshold!r}; choose auto, none, clip or dynamic")

    def to_dict(self) -> dict:
        return asdict(self)


def sampler_options(settings: SamplerSettings) -> dict:
    """Keyword arguments of the chosen sampler that come from the settings (eta where it has one)."""
    return {"eta": settings.eta} if "eta" in inspect.signature(SAMPLERS[settings.sampler]).parameters else {}


def check_flow_settings(settings: SamplerSettings) -> None:
    """A flow model's Euler / Heun steps in its flow space (:mod:`ldm.diffusion.flow`) are deterministic and
    unrescaled (diffusers' FlowMatch schedulers); say so instead of ignoring eta or rescale."""
    if settings.eta or settings.rescale:
        raise ValueError(f"{settings.sampler} on a flow-matching model samples deterministically without guidance "
                         "rescale: eta and rescale must be 0 (or use another sampler, which runs in the sigma space)")


def initial_noise(n: int, shape: Sequence[int], seed: int, offset: int = 0) -> Tensor:
    """(n, *shape) standard normal noise; row i from a CPU generator seeded ``seed + offset + i``."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed + offset + i)) for i in range(n)]
    return torch.stack(rows)


class TextToImage:
    """Sample images for prompts from a :class:`~ldm.systems.LatentDiffusion` (in eval mode, frozen).

    Args:
        system: the latent-diffusion run; its :class:`~ldm.diffusion.Conditioner` turns prompts into conditions.
        batch_size: images per sampler call.
        prior: for a decoder of CLIP image embeddings (unCLIP), the :class:`~ldm.systems.DiffusionPrior` that draws
            the image embeddings of the prompts; without one the prompts' CLIP text embeddings stand in.
        clip_text: the CLIP text encoder those embeddings come from (default: the conditioner's own); a decoder
            trained on image embeddings alone has none and needs it to read prompts.
        prior_options: the prior's sampling settings (``best_of``, ``cfg``, ``steps``; default: the prior's own).
    """

    def __init__(self, system, batch_size: int = 16, *, prior=None, clip_text=None, prior_options: dict | None = None):
        self.system = system
        self.batch_size = batch_size
        self.prior = prior
        self.clip_text = clip_text
        self.prior_options = {k: v for k, v in (prior_options or {}).items() if v is not None}
        if prior is not None and not system.conditioner.reads_embeddings:
            raise ValueError("a prior drives a decoder conditioned on CLIP image embeddings (the conditioner's vector: "
                             "clip_image); this run reads text")

    @property
    def conditioner(self):
        return self.system.conditioner

    @classmethod
    def from_checkpoint(cls, path: str, device: str | torch.device = "cpu", weights: str = "ema",
                        **kwargs) -> TextToImage:
        """The pipeline of a latent-diffusion run; ``weights``: its EMA (default) or raw weights."""
        from ldm.systems.loading import load_latent_diffusion

        return cls(load_latent_diffusion(path, weights=weights).to(device), **kwargs)

    def latent_shape(self, image_size: int | tuple[int, int]) -> tuple[int, int, int]:
        """(C, h, w) of the latents of ``image_size`` pixels (a side, or (height, width)), each a multiple of the
        first stage's downsampling factor."""
        fs = self.system.first_stage
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        for name, side in (("height", height), ("width", width)):
            if side < 1 or side % fs.downsample_factor:
                raise ValueError(f"image {name} {side} is not a positive multiple of the first stage's factor "
                                 f"{fs.downsample_factor}")
        return fs.latent_channels, height // fs.downsample_factor, width // fs.downsample_factor

    # -- conditions ------------------------------------------------------------------------------
    @property
    def text_encoder(self):
        """The CLIP text encoder that reads prompts into embeddings (unCLIP), or None."""
        return self.clip_text if self.clip_text is not None else self.conditioner.text_encoder

    @torch.no_grad()
    def embeddings(self, prompts: Sequence[str], seed: int = 0) -> Tensor | None:
        """The CLIP image embeddings (B, D) a decoder of embeddings is conditioned on for ``prompts``: drawn by the
        prior with seed ``seed``, or the prompts' CLIP text embeddings without one; None for other models."""
        if not self.conditioner.reads_embeddings:
            return None
        encoder = self.text_encoder
        if encoder is None:
            raise ValueError("this decoder of CLIP embeddings has no text encoder to read prompts: give the CLIP the "
                             "embeddings came from (TextToImage(clip_text=...), ldm sample --clip RUN)")
        text = encoder.encode_prompts(list(prompts), device=self.system.device)
        if self.prior is None:
            return text["pooled"]
        return self.prior.sample(self.prior.text_condition(text), seed=seed, **self.prior_options)

    def conditions(self, prompts: Sequence[str], like: Tensor, settings: SamplerSettings, *, start: int = 0,
                   embeddings: Tensor | None = None, known: Tensor | None = None, mask: Tensor | None = None,
                   ) -> tuple[dict[str, Tensor] | None, dict[str, Tensor] | None]:
        """(condition, unconditional condition) of ``prompts`` (which stand at index ``start`` of the images being
        sampled, with latents like ``like``); the unconditional one is ``settings.negative_prompt``'s condition, or
        the null condition. ``embeddings`` (B, D) or (1, D): a decoder of CLIP embeddings is conditioned on these
        instead of the prompts' (image embeddings of variations, interpolations, text diffs). A model trained for
        inpainting also reads ``known`` latents and ``mask`` (B, 1, h, w), 1 = regenerate (default: generate all)."""
        seed = settings.seed + start
        if embeddings is None:
            embeddings = self.embeddings(prompts, seed)
        negative = [settings.negative_prompt] * len(prompts) if settings.negative_prompt else None
        negative_embeddings = self.embeddings(negative, seed) if negative else None
        cond, uncond = self.conditioner.encode_prompts(prompts, negative, embeddings=embeddings,
                                                       negative_embeddings=negative_embeddings)
        if self.conditioner.inpainting:
            known = torch.zeros_like(like) if known is None else known
            mask = torch.ones_like(like[:, :1]) if mask is None else mask
            cond = self.conditioner.with_concat(cond, known, mask)
            uncond = self.conditioner.with_concat(uncond, known, mask)
        return cond, uncond

    def flow_space(self, settings: SamplerSettings) -> bool:
        """Whether the sampler runs in the model's flow space (a flow model's Euler / Heun:
        :meth:`~ldm.diffusion.Preconditioner.flow_space`); every other case runs in the sigma space."""
        return self.system.precond.flow_space(settings.sampler)

    def guided_denoiser(self, cond: dict[str, Tensor] | None, uncond: dict[str, Tensor] | None,
                        settings: SamplerSettings, flow: bool = False):
        """The system's denoiser (in the flow space with ``flow``), with classifier-free guidance at
        ``settings.cfg`` when there is a condition (its other branch ``uncond``), and its x0 estimate thresholded as
        ``settings.threshold`` says."""
        model_fn = self.system.denoiser(flow=flow)
        if cond is not None and settings.cfg != 1.0:
            model_fn = classifier_free_guidance(model_fn, scale=settings.cfg, uncond=uncond, rescale=settings.rescale)
        return thresholded(model_fn, self.threshold_mode(settings))

    def threshold_mode(self, settings: SamplerSettings) -> str:
        """``settings.threshold``, with ``auto`` resolved: clip in pixel space, nothing for latents."""
        if settings.threshold != "auto":
            return settings.threshold
        return "clip" if isinstance(self.system.first_stage, IdentityFirstStage) else "none"

    def denoiser_for(self, prompts: Sequence[str], cond: dict[str, Tensor] | None, uncond: dict[str, Tensor] | None,
                     settings: SamplerSettings, flow: bool = False):
        """The denoiser that samples ``prompts`` (subclasses add guidance that reads the prompts)."""
        return self.guided_denoiser(cond, uncond, settings, flow=flow)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], settings: SamplerSettings, *, image_size: int | tuple[int, int],
                 progress: bool = True, index_offset: int = 0, x_init: Tensor | None = None,
                 embeddings: Tensor | None = None) -> Tensor:
        """Images (len(prompts), 3, H, W) in [-1, 1], one per prompt (repeat a prompt for several).

        ``image_size``: a side, or (height, width) for a non-square image (each a multiple of the first stage's
        factor; a convolutional U-Net samples other shapes than it trained on, with the quality that implies).

        ``index_offset``: the global index of the first prompt, when a list is shared out (over ranks):
        image ``i`` uses the noise of seed ``seed + index_offset + i`` wherever it is drawn.
        ``x_init``: the starting latents (len(prompts), C, h, w) at the first noise level, used as they are
        (e.g. DDIM-inverted noise of an image) instead of seeded noise.
        ``embeddings``: for a decoder of CLIP embeddings, the embeddings (len(prompts), D) or (1, D) to decode
        instead of the prompts' (default: drawn by the prior with seed ``seed + index_offset + i`` per chunk).
        """
        if x_init is not None and len(x_init) != len(prompts):
            raise ValueError(f"x_init has {len(x_init)} rows for {len(prompts)} prompts")
        if embeddings is not None and len(embeddings) not in (1, len(prompts)):
            raise ValueError(f"embeddings has {len(embeddings)} rows for {len(prompts)} prompts")
        system = self.system
        flow = self.flow_space(settings)
        if flow:
            check_flow_settings(settings)
        shape = self.latent_shape(image_size)
        sampler = SAMPLERS[settings.sampler]
        extra = sampler_options(settings)
        sigmas = sampling_sigmas(system.precond, settings.steps, settings.spacing, flow=flow).to(system.device)
        out = []
        chunks = math.ceil(len(prompts) / self.batch_size)
        for c in range(chunks):
            lo = c * self.batch_size
            part = list(prompts[lo: lo + self.batch_size])
            if x_init is not None:
                x = x_init[lo: lo + len(part)].to(system.device)
            else:
                x = initial_noise(len(part), shape, settings.seed, offset=index_offset + lo).to(system.device)
                x = x * system.precond.initial_noise_scale(sigmas[0], flow=flow).to(x)
            rows = None if embeddings is None else embeddings if len(embeddings) == 1 else embeddings[lo: lo + len(part)]
            cond, uncond = self.conditions(part, x, settings, start=index_offset + lo, embeddings=rows)
            model_fn = self.denoiser_for(part, cond, uncond, settings, flow=flow)
            gen = torch.Generator(system.device).manual_seed(settings.seed + index_offset + lo)
            desc = f"sampling {settings.sampler}" + (f" [{c + 1}/{chunks}]" if chunks > 1 else "")
            callback = progress_bar(desc) if progress else None
            z = sampler(model_fn, x, sigmas, cond=cond, generator=gen, callback=callback, **extra)
            out.append(system.first_stage.decode(z).clamp(-1, 1).float().cpu())
        return torch.cat(out)
