"""unCLIP generation (Ramesh et al. 2022): text -> [diffusion prior] -> CLIP image embedding -> decoder -> image,
and the embedding-space edits of the DALL-E 2 paper: variations, interpolations and text diffs.

The decoder is a :class:`~ldm.systems.LatentDiffusion` conditioned on ``clip_image`` (vector route plus
embedding tokens, ``configs/unclip/``); the prior a :class:`~ldm.systems.DiffusionPrior`. Without a prior
the text embedding itself drives the decoder (seed 004's experiment: a decoder trained on image
embeddings only, driven by text embeddings).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.pipelines.editing import invert
from ldm.pipelines.text_to_image import SamplerSettings, TextToImage


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation between unit vectors (B, D) (Shoemake 1985)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))  # (B, 1)
    so = torch.sin(omega)
    return torch.sin((1 - t) * omega) / so * a + torch.sin(t * omega) / so * b


class UnCLIP:
    """Args:
        decoder: the CLIP-image-embedding decoder.
        prior: the diffusion prior (None: the text embedding is used as the image embedding).
        text_encoder: the CLIP whose embeddings both were trained on (default: the decoder's text encoder).
        prior_best_of, prior_cfg, prior_steps: prior sampling settings (default: the prior's own).

    Text -> image is :class:`TextToImage` with the prior (:attr:`pipe`); the edits decode given embeddings with it.
    """

    def __init__(self, decoder, prior=None, text_encoder=None, batch_size: int = 16, prior_best_of: int | None = None,
                 prior_cfg: float | None = None, prior_steps: int | None = None):
        if not decoder.conditioner.reads_embeddings:
            raise ValueError("the decoder must be conditioned on a CLIP embedding (the conditioner's vector: clip_image)")
        self.decoder = decoder
        self.pipe = TextToImage(decoder, batch_size=batch_size, prior=prior, clip_text=text_encoder,
                                prior_options={"best_of": prior_best_of, "cfg": prior_cfg, "steps": prior_steps})
        if self.pipe.text_encoder is None:
            raise ValueError("unCLIP needs the CLIP text encoder the embeddings came from: pass text_encoder")

    @property
    def prior(self):
        """The diffusion prior (None: the text embeddings stand in for image embeddings)."""
        return self.pipe.prior

    @prior.setter
    def prior(self, prior) -> None:
        self.pipe.prior = prior

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    @property
    def clip(self):
        return self.text_encoder.model

    # -- embeddings --------------------------------------------------------------------------
    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        return self.text_encoder.encode_prompts(list(prompts), device=self.decoder.device)

    @torch.no_grad()
    def image_embeddings_for(self, prompts: Sequence[str], seed: int = 0) -> Tensor:
        """CLIP image embeddings (B, D) for prompts: sampled by the prior, or the text embeddings without one."""
        return self.pipe.embeddings(prompts, seed)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """CLIP image embeddings (B, D) of images in [-1, 1]."""
        return self.clip.encode_image(images.to(self.decoder.device))

    # -- decoding ----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, embeddings: Tensor, settings: SamplerSettings, *, image_size: int,
               prompts: Sequence[str] | None = None, progress: bool = False, x_init: Tensor | None = None) -> Tensor:
        """Images (B, 3, H, W) for CLIP image embeddings (B, D); image i from the noise of seed + i
        (or from ``x_init``)."""
        prompts = list(prompts) if prompts is not None else [""] * len(embeddings)
        return self.pipe(prompts, settings, image_size=image_size, progress=progress, x_init=x_init,
                         embeddings=embeddings)

    def __call__(self, prompts: Sequence[str], settings: SamplerSettings, *, image_size: int,
                 progress: bool = False, index_offset: int = 0) -> Tensor:
        """Text -> image through the prior (or the text embedding) and the decoder."""
        return self.pipe(prompts, settings, image_size=image_size, progress=progress, index_offset=index_offset)

    # -- embedding-space edits (DALL-E 2, sec. 3) -----------------------------------------------
    def variations(self, image: Tensor, n: int, settings: SamplerSettings, *, image_size: int,
                   progress: bool = False) -> Tensor:
        """n variations of one image (1, 3, H, W): its CLIP embedding decoded with n seeds (use eta > 0 with DDIM)."""
        emb = self.encode_images(image)[:1].expand(n, -1)
        return self.decode(emb, settings, image_size=image_size, progress=progress)

    def variations_of(self, images: Tensor) -> VariationsOf:
        """A pipeline of the same call as :class:`TextToImage` whose row ``i`` decodes the CLIP image embedding of
        ``images[i]`` (B, 3, H, W) in [-1, 1], not its caption's: ``ldm eval --variations`` scores it against the
        images' own metadata (do variations keep the objects?)."""
        return VariationsOf(self, images)

    def interpolate(self, image_a: Tensor, image_b: Tensor, frames: int, settings: SamplerSettings, *,
                    image_size: int, progress: bool = False) -> Tensor:
        """A strip of ``frames`` images along the slerp between two images' embeddings, one shared decoder noise."""
        a, b = self.encode_images(image_a)[:1], self.encode_images(image_b)[:1]
        ts = [i / (frames - 1) for i in range(frames)] if frames > 1 else [0.0]
        embeddings = torch.cat([slerp(a, b, t) for t in ts])
        out = []
        for i in range(frames):  # each frame alone with the same seed: the same decoder noise for all
            out.append(self.decode(embeddings[i: i + 1], settings, image_size=image_size, progress=progress))
        return torch.cat(out)

    @torch.no_grad()
    def invert(self, image: Tensor, settings: SamplerSettings, progress: bool = False) -> Tensor:
        """The decoder's DDIM-inverted noise latent (1, C, h, w) of one image, conditioned on its own embedding."""
        emb = self.encode_images(image)[:1]
        return invert(self.pipe, image[:1], [""], replace(settings, sampler="ddim", eta=0.0), progress=progress,
                      embeddings=emb)
    @torch.no_grad()
    def text_diff_embeddings(self, image: Tensor, old_prompt: str, new_prompt: str,
                             amounts: Sequence[float]) -> Tensor:
        """``slerp(z_image, normalise(z_text(new) - z_text(old)), a)`` for each amount: (len(amounts), D)."""
        z_i = self.encode_images(image)[:1]
        text = self.text_embeddings([old_prompt, new_prompt])["pooled"].to(z_i)
        z_d = F.normalize(text[1:] - text[:1], dim=-1)
        return torch.cat([slerp(z_i, z_d, float(a)) for a in amounts])

    @torch.no_grad()
    def text_diff(self, image: Tensor, old_prompt: str, new_prompt: str, amounts: Sequence[float],
                  settings: SamplerSettings, *, image_size: int, progress: bool = False) -> Tensor:
        """DALL-E 2's text diffs (sec. 3.3): one frame per amount, the image edited toward the new caption.

        Frame ``a`` decodes :meth:`text_diff_embeddings` with deterministic DDIM from the image's
        DDIM-inverted noise, so amount 0 reconstructs the image. (The paper goes to 0.5 at most;
        beyond that the image's content is mostly lost.)
        """
        ddim = replace(settings, sampler="ddim", eta=0.0)
        x_t = self.invert(image, ddim, progress)
        embeddings = self.text_diff_embeddings(image, old_prompt, new_prompt, amounts)
        return self.decode(embeddings, ddim, image_size=image_size, progress=progress,
                           x_init=x_t.expand(len(embeddings), *x_t.shape[1:]))


class VariationsOf:
    """Variations of a fixed image set, called like a :class:`TextToImage` (``GenerationEvaluator`` does):
    ``pipe(prompts, settings, image_size=, index_offset=i)`` decodes the CLIP image embeddings of ``images[i:i +
    len(prompts)]``, image ``j`` from the noise of ``settings.seed + j`` as every pipeline; the prompts only count
    the rows (the decoder reads no caption here). Made by :meth:`UnCLIP.variations_of`."""

    def __init__(self, unclip: UnCLIP, images: Tensor):
        self.unclip, self.images = unclip, images
        self.system, self.batch_size = unclip.decoder, unclip.pipe.batch_size
        self._embeddings: dict[tuple[int, int], Tensor] = {}  # (offset, n) -> CLIP embeddings: once per guidance sweep

    def __call__(self, prompts: Sequence[str], settings: SamplerSettings, *, image_size: int, progress: bool = True,
                 index_offset: int = 0) -> Tensor:
        rows = self.images[index_offset: index_offset + len(prompts)]
        if len(rows) != len(prompts):
            raise ValueError(f"variations of {len(self.images)} images: rows {index_offset}..{index_offset + len(prompts)} "
                             "asked for")
        key = (index_offset, len(rows))
        if key not in self._embeddings:
            self._embeddings[key] = self.unclip.encode_images(rows)
        embeddings = self._embeddings[key]
        return self.unclip.pipe(list(prompts), settings, image_size=image_size, progress=progress,
                                index_offset=index_offset, embeddings=embeddings)
