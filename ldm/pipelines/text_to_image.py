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
    null_condition,
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


def initial_noise(n: int, shape: Sequence[int], seed: int, offset: int = 0) -> Tensor:
    """(n, *shape) standard normal noise; row i from a CPU generator seeded ``seed + offset + i``."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed + offset + i)) for i in range(n)]
    return torch.stack(rows)


class TextToImage:
    """Sample images for prompts from a :class:`~ldm.systems.LatentDiffusion` (in eval mode, frozen)."""

    def __init__(self, system, batch_size: int = 16, condition_fn=None):
        """``condition_fn(prompts, start) -> cond`` replaces the text condition of the prompts at
        ``start, start + 1, ...`` of a call (the unCLIP pipelines pass CLIP image embeddings through it)."""
        self.system = system
        self.batch_size = batch_size
        self.condition_fn = condition_fn

    @classmethod
    def from_checkpoint(cls, path: str, device: str | torch.device = "cpu", **kwargs) -> TextToImage:
        from ldm.systems import LatentDiffusion, load_system

        system = load_system(path)
        if not isinstance(system, LatentDiffusion):
            raise TypeError(f"{path} is a {type(system).__name__} run, not a latent-diffusion run "
                            "(ldm sample needs a checkpoint of ldm.systems.LatentDiffusion)")
        return cls(system.to(device), **kwargs)

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

    def condition(self, prompts: Sequence[str], start: int = 0) -> dict[str, Tensor] | None:
        """The condition of ``prompts``, which stand at index ``start`` of the list being sampled."""
        if self.condition_fn is not None:
            return self.condition_fn(prompts, start)
        system = self.system
        embeds = system.vector_cond in ("clip_image", "clip_text")
        if not system.uses_text and not embeds:
            return None  # an unconditional model
        if system.text_encoder is None:
            raise ValueError("this model was trained on precomputed text features or CLIP embeddings and has no text "
                             "encoder to read prompts: set model.text_encoder in its config, or give the CLIP the "
                             "embeddings came from (UnCLIP(text_encoder=...), ldm sample --clip RUN)")
        tokens = system.text_encoder.tokenizer(list(prompts)).to(system.device)
        batch = {"tokens": tokens}
        if embeds:
            # a decoder of CLIP embeddings reads a prompt through its CLIP text embedding (unCLIP without a
            # prior, seed 004); UnCLIP with a prior passes sampled image embeddings through condition_fn
            batch[system.vector_cond] = system.text_encoder(tokens)["pooled"]
        return system.condition(batch) or None

    def with_task_input(self, cond: dict[str, Tensor] | None, like: Tensor, known: Tensor | None = None,
                        mask: Tensor | None = None) -> dict[str, Tensor] | None:
        """For a model trained for inpainting (concat route): add its extra input. ``known`` (B, C, h, w) and
        ``mask`` (B, 1, h, w), 1 = regenerate; without them the whole image is generated."""
        if not getattr(self.system, "inpainting", False):
            return cond
        known = torch.zeros_like(like) if known is None else known
        mask = torch.ones_like(like[:, :1]) if mask is None else mask
        return self.system.with_inpainting_input(cond or {}, known, mask)

    def guided_denoiser(self, cond: dict[str, Tensor] | None, settings: SamplerSettings,
                        uncond: dict[str, Tensor] | None = None):
        """The system's denoiser, with classifier-free guidance at ``settings.cfg`` when there is a condition
        (its other branch ``uncond``, e.g. a negative prompt's condition, else the null condition), and its x0
        estimate thresholded as ``settings.threshold`` says."""
        model_fn = self.system.denoiser()
        if cond is not None and settings.cfg != 1.0:
            model_fn = classifier_free_guidance(model_fn, scale=settings.cfg,
                                                uncond=null_condition(cond) if uncond is None else uncond,
                                                rescale=settings.rescale)
        return thresholded(model_fn, self.threshold_mode(settings))

    def threshold_mode(self, settings: SamplerSettings) -> str:
        """``settings.threshold``, with ``auto`` resolved: clip in pixel space, nothing for latents."""
        if settings.threshold != "auto":
            return settings.threshold
        return "clip" if isinstance(self.system.first_stage, IdentityFirstStage) else "none"

    def denoiser_for(self, prompts: Sequence[str], cond: dict[str, Tensor] | None, settings: SamplerSettings,
                     uncond: dict[str, Tensor] | None = None):
        """The denoiser that samples ``prompts`` (subclasses add guidance that reads the prompts)."""
        return self.guided_denoiser(cond, settings, uncond)

    def negative_condition(self, n: int, start: int, like: Tensor, settings: SamplerSettings):
        """The condition of ``settings.negative_prompt`` for ``n`` images, or None (no negative prompt)."""
        if not settings.negative_prompt:
            return None
        negative = self.condition([settings.negative_prompt] * n, start)
        if negative is None:
            raise ValueError("a negative prompt needs a text-conditioned model; this one is unconditional")
        return self.with_task_input(negative, like)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], settings: SamplerSettings, *, image_size: int | tuple[int, int],
                 progress: bool = True, index_offset: int = 0, x_init: Tensor | None = None) -> Tensor:
        """Images (len(prompts), 3, H, W) in [-1, 1], one per prompt (repeat a prompt for several).

        ``image_size``: a side, or (height, width) for a non-square image (each a multiple of the first stage's
        factor; a convolutional U-Net samples other shapes than it trained on, with the quality that implies).

        ``index_offset``: the global index of the first prompt, when a list is shared out (over ranks):
        image ``i`` uses the noise of seed ``seed + index_offset + i`` wherever it is drawn.
        ``x_init``: the starting latents (len(prompts), C, h, w) at the first noise level, used as they are
        (e.g. DDIM-inverted noise of an image) instead of seeded noise.
        """
        if x_init is not None and len(x_init) != len(prompts):
            raise ValueError(f"x_init has {len(x_init)} rows for {len(prompts)} prompts")
        system = self.system
        shape = self.latent_shape(image_size)
        sampler = SAMPLERS[settings.sampler]
        extra = sampler_options(settings)
        sigmas = sampling_sigmas(system.precond, settings.steps, settings.spacing).to(system.device)
        out = []
        chunks = math.ceil(len(prompts) / self.batch_size)
        for c in range(chunks):
            lo = c * self.batch_size
            part = list(prompts[lo: lo + self.batch_size])
            if x_init is not None:
                x = x_init[lo: lo + len(part)].to(system.device)
            else:
                x = initial_noise(len(part), shape, settings.seed, offset=index_offset + lo).to(system.device)
                x = x * system.precond.initial_noise_scale(sigmas[0]).to(x)
            cond = self.with_task_input(self.condition(part, lo), x)
            uncond = self.negative_condition(len(part), lo, x, settings) if cond is not None else None
            model_fn = self.denoiser_for(part, cond, settings, uncond)
            gen = torch.Generator(system.device).manual_seed(settings.seed + index_offset + lo)
            desc = f"sampling {settings.sampler}" + (f" [{c + 1}/{chunks}]" if chunks > 1 else "")
            callback = progress_bar(desc) if progress else None
            z = sampler(model_fn, x, sigmas, cond=cond, generator=gen, callback=callback, **extra)
            out.append(system.first_stage.decode(z).clamp(-1, 1).float().cpu())
        return torch.cat(out)
