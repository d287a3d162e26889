"""The conditioner: a batch or a list of prompts -> the denoiser's condition. The one place a condition is built,
for training, validation and every pipeline (text -> image, unCLIP, editing, CLIP guidance).

The condition is a dict of what the network reads (:class:`~ldm.diffusion.UNet`):

* ``context`` (B, T, W) + ``context_mask`` (B, T): the cross-attention tokens: the text encoder's per-token
  features (``text_context``), then ``embedding_tokens`` tokens projected from the vector (unCLIP's decoder,
  Ramesh et al. 2022, sec. 2.1: "projecting [the CLIP embedding] into four extra tokens of context");
* ``y`` (B, D): the vector route, added to the timestep embedding: the pooled text embedding (``vector="text"``)
  or a CLIP embedding (``"clip_text"`` / ``"clip_image"``). Unit-norm CLIP embeddings have entries of about
  1 / sqrt(D); they are scaled by sqrt(D) to unit variance per entry (as the prior's target), or the vector route
  and the embedding tokens see a signal too small to learn from;
* ``concat`` (B, C + 1, h, w): the inpainting route's masked latent and mask (:mod:`ldm.diffusion.inpainting`).

Text comes from a batch's precomputed features (``clip_tokens`` / ``clip_mask`` / ``clip_text``, written by
``ldm precompute embeddings``), from its ``tokens`` through the frozen text encoder, or from prompts through the
encoder's tokenizer: all three give the same condition. The unconditional condition of classifier-free guidance is
:func:`~ldm.diffusion.null_condition` of the condition (what training's condition dropout substitutes), or the
condition of a negative prompt (:meth:`Conditioner.encode_prompts`).

Anchors: sgm's ``GeneralConditioner`` (one module turns a batch into the network's inputs) and DiT's
``LabelEmbedder.token_drop`` (the dropout that makes the null condition lives with the embedding). Unlike sgm's,
ours also encodes prompts, so pipelines never build stand-in batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ldm.diffusion.conditioning import drop_randomly, null_condition
from ldm.diffusion.inpainting import inpaint_concat, random_masks

VectorCond = Literal["text", "clip_text", "clip_image"]
EMBEDDINGS = ("clip_text", "clip_image")


class TextEncoder(nn.Module):
    """What the conditioner needs of a frozen text encoder (:class:`ldm.contrastive.FrozenTextEncoder` is the one
    the project ships): ``tokenizer(list of str) -> (B, T) ids``, ``width`` (W, of the per-token features) and
    ``forward(tokens) -> {"tokens": (B, T, W), "mask": (B, T) bool, "pooled": (B, D) unit-norm}``."""

    width: int

    @property
    def tokenizer(self):
        raise NotImplementedError

    def forward(self, tokens: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str], device: torch.device | str | None = None) -> dict[str, Tensor]:
        """Tokenize and encode a list of prompts (for sampling)."""
        if device is None:
            device = next(self.parameters()).device
        return self(self.tokenizer(list(prompts)).to(device))


class Conditioner(nn.Module):
    """Args:
        text_encoder: frozen :class:`TextEncoder` (``ldm.contrastive.FrozenTextEncoder``); None when batches carry
            precomputed text features, for an unconditional model, or for a decoder of CLIP embeddings alone.
        text_context: cross-attend to the text tokens (False: the context is only the embedding tokens, e.g. a
            decoder trained on CLIP image embeddings without captions).
        vector: what feeds the network's ``y`` route: ``text`` (the pooled text embedding), ``clip_text`` /
            ``clip_image`` (CLIP embeddings of those batch keys); None = off.
        embedding_tokens: project the ``y`` embedding into this many extra context tokens (the unCLIP decoder
            uses 4); needs a CLIP-embedding ``vector`` and ``embedding_dim``.
        embedding_dim: width of that embedding.
        inpainting: build the concat-channel inpainting input (the network's ``concat_channels`` must be the
            latent channels + 1).
        null: the unconditional condition (of guidance and of training's condition dropout): ``zeros``
            (:func:`~ldm.diffusion.null_condition`: zero features) or ``empty_prompt`` (the text encoder's condition
            of the empty prompt "", as Stable Diffusion was trained and is sampled).
        mask_padding: hide the text's padding tokens from cross-attention (False: attend to all of them, as Stable
            Diffusion was trained: its padding tokens carry the text too, through the causal attention).

    :meth:`fit_to` (called by the system with its network) checks the widths on both sides and creates the
    embedding projection, whose output width is the network's context width.
    """

    def __init__(self, text_encoder: TextEncoder | None = None, text_context: bool = True,
                 vector: VectorCond | None = None, embedding_tokens: int = 0, embedding_dim: int | None = None,
                 inpainting: bool = False, null: Literal["zeros", "empty_prompt"] = "zeros",
                 mask_padding: bool = True):
        super().__init__()
        if null not in ("zeros", "empty_prompt"):
            raise ValueError(f"null must be zeros or empty_prompt, got {null!r}")
        if null == "empty_prompt" and text_encoder is None:
            raise ValueError("null: empty_prompt encodes the empty prompt: it needs the conditioner's text_encoder")
        if vector not in (None, "text", *EMBEDDINGS):
            raise ValueError(f"vector must be text, clip_text, clip_image or null, got {vector!r}")
        if embedding_tokens and (vector not in EMBEDDINGS or embedding_dim is None):
            raise ValueError("embedding_tokens need vector clip_image or clip_text and embedding_dim")
        self.text_encoder = text_encoder
        self.text_context, self.vector = text_context, vector
        self.embedding_tokens, self.embedding_dim = embedding_tokens, embedding_dim
        self.inpainting = inpainting
        self.null, self.mask_padding = null, mask_padding
        self.context_dim: int | None = None  # the network's, set by fit_to
        self.embedding_proj: nn.Linear | None = None

    # -- what the network offers ---------------------------------------------------------------
    def fit_to(self, network: nn.Module, latent_channels: int) -> Conditioner:
        """Check this conditioner against the network it feeds (failing at construction, naming both sides) and
        create the embedding projection to the network's context width."""
        self.context_dim = getattr(network, "context_dim", None)
        width = getattr(self.text_encoder, "width", None)
        if self.cross_attends_to_text and width is not None and self.context_dim != width:
            raise ValueError(f"unet.context_dim is {self.context_dim} but the text encoder's token features are "
                             f"{width} wide")
        concat = getattr(network, "concat_channels", 0)
        if self.inpainting and concat != latent_channels + 1:
            raise ValueError(f"inpainting needs unet.concat_channels = latent channels + 1 = {latent_channels + 1}, "
                             f"got {concat}")
        if concat and not self.inpainting:
            raise ValueError(f"unet.concat_channels is {concat}, but nothing fills them: set the conditioner's "
                             "inpainting: true")
        if self.vector is not None and getattr(network, "y_dim", 0) is None:
            raise ValueError(f"the conditioner's vector is {self.vector!r} but the U-Net has no y route (set unet "
                             "y_dim)")
        if self.embedding_tokens:
            if self.context_dim is None:
                raise ValueError("embedding_tokens need a U-Net with cross-attention (context_dim)")
            if self.embedding_proj is None:
                self.embedding_proj = nn.Linear(self.embedding_dim, self.embedding_tokens * self.context_dim)
        return self

    @property
    def cross_attends_to_text(self) -> bool:
        return self.context_dim is not None and self.text_context

    @property
    def uses_text(self) -> bool:
        """Whether the condition reads text (its tokens or its pooled embedding)."""
        return self.cross_attends_to_text or self.vector == "text"

    @property
    def reads_embeddings(self) -> bool:
        """Whether the condition reads a CLIP embedding (an unCLIP decoder)."""
        return self.vector in EMBEDDINGS

    @property
    def is_conditional(self) -> bool:
        return self.uses_text or self.reads_embeddings

    @property
    def tokenizer(self):
        """The text encoder's tokenizer (linked into the data module, so image batches arrive with ``tokens``)."""
        return self.text_encoder.tokenizer if self.text_encoder is not None else None

    def _device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    # -- the condition -------------------------------------------------------------------------
    def text_features(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor | None]:
        """{tokens (B, T, W), mask (B, T), pooled (B, D)}: precomputed or from the text encoder."""
        if "clip_tokens" in batch:
            return {"tokens": batch["clip_tokens"], "mask": batch["clip_mask"].bool(), "pooled": batch.get("clip_text")}
        if self.text_encoder is not None and "tokens" in batch:
            return self.text_encoder(batch["tokens"])
        raise ValueError("this model is conditioned on text, but the batch has neither clip_tokens (precomputed "
                         "embedding shards) nor tokens (set the conditioner's text_encoder so the data module "
                         "tokenizes captions)")

    def scale_embedding(self, embedding: Tensor) -> Tensor:
        """A unit-norm CLIP embedding (B, D) at unit variance per entry."""
        return embedding * embedding.shape[-1] ** 0.5

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The condition of a batch (no ``concat``: see :meth:`with_concat`); {} for an unconditional model."""
        cond: dict[str, Tensor] = {}
        text = self.text_features(batch) if self.uses_text else None
        if self.cross_attends_to_text:
            mask = text["mask"] if self.mask_padding else torch.ones_like(text["mask"], dtype=torch.bool)
            cond["context"], cond["context_mask"] = text["tokens"], mask
        if self.vector == "text":
            if text["pooled"] is None:
                raise ValueError("the conditioner's vector 'text' needs clip_text in precomputed batches")
            cond["y"] = text["pooled"]
        elif self.vector is not None:
            if self.vector not in batch:
                raise ValueError(f"the conditioner's vector {self.vector!r}: the batch has no {self.vector} "
                                 "(precompute embeddings into the shards)")
            cond["y"] = self.scale_embedding(batch[self.vector])
        if self.embedding_proj is not None:
            y = cond["y"]
            tokens = self.embedding_proj(y.to(self.embedding_proj.weight.dtype))  # (B, k * W)
            tokens = tokens.reshape(len(y), self.embedding_tokens, -1)  # (B, k, W)
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            if "context" in cond:  # after the text tokens
                tokens = torch.cat([cond["context"].to(tokens.dtype), tokens], dim=1)
                mask = torch.cat([cond["context_mask"].bool(), mask], dim=1)
            cond["context"], cond["context_mask"] = tokens, mask
        return cond

    def encode_prompts(self, prompts: Sequence[str], negative: Sequence[str] | None = None, *,
                       embeddings: Tensor | None = None, negative_embeddings: Tensor | None = None,
                       ) -> tuple[dict[str, Tensor], dict[str, Tensor]] | tuple[None, None]:
        """(condition, unconditional condition) of prompts for sampling; (None, None) for an unconditional model.

        The unconditional condition is the negative prompts' condition when given (one per prompt), else the null
        condition. ``embeddings`` (B, D) or (1, D): the CLIP embeddings of a decoder of CLIP embeddings (drawn by
        the prior, or of images); without them the prompts' own CLIP text embeddings stand in (unCLIP without a
        prior). ``negative_embeddings`` likewise for the negative prompts.
        """
        if not self.is_conditional:
            if negative:
                raise ValueError("a negative prompt needs a text-conditioned model; this one is unconditional")
            return None, None
        cond = self(self._prompt_batch(prompts, embeddings))
        if not negative:
            return cond, self.null_condition(cond)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        return cond, self(self._prompt_batch(negative, negative_embeddings))

    def _prompt_batch(self, prompts: Sequence[str], embeddings: Tensor | None) -> dict[str, Tensor]:
        """The keys :meth:`forward` reads, from prompts (and CLIP embeddings)."""
        device = self._device()
        needs_encoder = self.uses_text or (self.reads_embeddings and embeddings is None)
        if needs_encoder and self.text_encoder is None:
            raise ValueError("this model was trained on precomputed text features or CLIP embeddings and has no text "
                             "encoder to read prompts: set the conditioner's text_encoder in its config, or give "
                             "the CLIP the embeddings came from (TextToImage(clip_text=...), ldm sample --clip RUN)")
        batch: dict[str, Tensor] = {}
        if needs_encoder:
            batch["tokens"] = self.text_encoder.tokenizer(list(prompts)).to(device)
        if self.reads_embeddings:
            if embeddings is None:
                embeddings = self.text_encoder(batch["tokens"])["pooled"]
            if len(embeddings) not in (1, len(prompts)):
                raise ValueError(f"{len(embeddings)} embeddings for {len(prompts)} prompts")
            batch[self.vector] = embeddings.to(device).expand(len(prompts), -1)
        return batch

    def with_concat(self, cond: Mapping[str, Tensor] | None, known: Tensor, mask: Tensor | None = None,
                    generator: torch.Generator | None = None) -> dict[str, Tensor] | None:
        """For an inpainting model: the condition plus the concat input of ``known`` latents (B, C, h, w) and
        ``mask`` (B, 1, h, w), 1 = regenerate (default: random training masks). Other models: ``cond`` as it is."""
        if not self.inpainting:
            return cond if cond is None else dict(cond)
        if mask is None:
            mask = random_masks(len(known), *known.shape[-2:], generator=generator, device=known.device)
        return {**(cond or {}), "concat": inpaint_concat(known, mask)}

    def null_condition(self, cond: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The unconditional counterpart of ``cond`` (see ``null``)."""
        null = null_condition(cond)
        if self.null == "empty_prompt":
            empty = self(self._prompt_batch([""], None))  # one row: the condition of ""
            for key, value in empty.items():
                null[key] = value.to(cond[key].device, cond[key].dtype).expand_as(cond[key]).clone()
        return null

    def drop(self, cond: Mapping[str, Tensor], p: float,
             generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], Tensor]:
        """(``cond`` with each sample's condition nulled with probability ``p``, the drop mask (B,))."""
        if self.null == "zeros":
            return drop_randomly(cond, p, generator)
        _, drop = drop_randomly(cond, p, generator)
        null = self.null_condition(cond)
        keep = lambda v: drop.reshape(-1, *([1] * (v.ndim - 1))).to(v.device)  # noqa: E731
        return {k: torch.where(keep(v), null[k], v) for k, v in cond.items()}, drop
