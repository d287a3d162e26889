"""The latent-diffusion system: a U-Net trained to denoise first-stage latents, conditioned on text.

Stable Diffusion's recipe (Rombach et al. 2022): a frozen first stage (a stage-1
autoencoder, or the identity for pixel-space diffusion), a frozen text encoder (our
contrastive run or a pretrained open_clip file), the U-Net, a preconditioner and the
denoising loss of :mod:`ldm.diffusion`. This module only wires them:

* latents come from ``batch["latent"]`` (precomputed shards) or the first stage
  (image shards); with ``sample_posterior`` a KL posterior sample is drawn from its std;
* the condition comes from ``batch["clip_tokens" / "clip_mask" / "clip_text"]``
  (precomputed) or the text encoder on ``batch["tokens"]``; both paths give the same loss;
* with probability ``cond_drop`` per sample the whole condition is replaced by the null
  condition (classifier-free guidance training, Ho & Salimans 2022);
* AdamW with linear warmup; gradient clipping is the trainer's ``gradient_clip_val``; EMA is
  Lightning's ``EMAWeightAveraging`` callback (validation and checkpoints then use EMA weights);
* validation: the loss at fixed noise levels with noise (and inpainting masks, and posterior
  samples) fixed per sample key, so curves of different runs compare (``val/loss_t<T>`` per level
  and their mean ``val/loss``); it is the mean over the valid rows of the whole split, reduced
  across ranks once per epoch, the same figure for any world size and batch size
  (:mod:`ldm.systems.validation`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import pytorch_lightning as L
import torch
from pytorch_lightning.cli import OptimizerCallable
from torch import Tensor, nn

from ldm.autoencoder.first_stage import FirstStage, IdentityFirstStage
from ldm.contrastive.text_encoder import FrozenTextEncoder
from ldm.diffusion import DenoisingLoss, EpsPrecond, Preconditioner, drop_randomly
from ldm.diffusion.inpainting import inpaint_concat, random_masks
from ldm.systems.optim import Shared, trainable_with_warmup
from ldm.systems.validation import (
    RowMeans,
    fixed_noise_losses,
    fixed_noise_names,
    log_means,
    row_generators,
    row_keys,
    row_randn,
    validation_levels,
)

log = logging.getLogger(__name__)
# the frozen first stage and text encoder are in eval mode on purpose
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

VectorCond = Literal["text", "clip_text", "clip_image"]


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


class LatentDiffusion(L.LightningModule):
    """Args:
        unet: the denoising network, called ``unet(x, t, context=, context_mask=, y=)``.
        first_stage: frozen image <-> latent maps (default: identity = pixel space).
        text_encoder: frozen text encoder; None when batches carry precomputed text features
            or the model is unconditional.
        precond: parameterisation (default: eps prediction on SD's linear DDPM schedule).
        loss: noise-level sampling and weighting (default: uniform timesteps, no weighting).
        cond_drop: probability of dropping the condition per sample (0.1 in SD).
        vector_cond: what feeds the U-Net's ``y`` route: ``text`` (the pooled text embedding),
            ``clip_text`` / ``clip_image`` (precomputed embeddings of those names); None = off.
        sample_posterior: draw latents from the KL posterior instead of its mode.
        optimizer: optimizer of the U-Net (default AdamW, lr 1e-4, no weight decay).
        warmup_steps: linear learning-rate warmup, in optimizer steps.
        val_timesteps: fixed DDPM timesteps of the validation loss (VP preconditioners).
        val_sigmas: fixed noise levels of the validation loss (any preconditioner; wins over timesteps).
        val_seed: seed of the fixed validation noise (drawn per sample key with it).
        text_context: cross-attend to text tokens (False: the context is only the embedding tokens, e.g. a
            decoder trained on CLIP image embeddings without captions).
        embedding_tokens: project the ``y`` embedding (``clip_image`` / ``clip_text``) into this many extra
            context tokens (the unCLIP decoder uses 4); needs ``embedding_dim``.
        embedding_dim: width of that embedding.
        inpainting: train the concat-channel inpainting route (:mod:`ldm.diffusion.inpainting`): the U-Net's
            ``concat_channels`` must be the latent channels + 1; each sample gets a random mask.
    """

    #: the validation metric that picks the best checkpoint (``ldm fit``'s default checkpointing)
    checkpoint_monitor = ("val/loss", "min")

    def __init__(self, unet: nn.Module, first_stage: FirstStage | None = None,
                 text_encoder: FrozenTextEncoder | None = None, precond: Preconditioner | None = None,
                 loss: DenoisingLoss | None = None, cond_drop: float = 0.1, vector_cond: VectorCond | None = None,
                 sample_posterior: bool = False, optimizer: OptimizerCallable = _adamw, warmup_steps: int = 0,
                 val_timesteps: Sequence[int] = (100, 300, 500, 700, 900), val_sigmas: Sequence[float] | None = None,
                 val_seed: int = 0, text_context: bool = True, embedding_tokens: int = 0,
                 embedding_dim: int | None = None, inpainting: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=["unet", "first_stage", "text_encoder", "precond", "loss"])
        if not 0.0 <= cond_drop <= 1.0:
            raise ValueError(f"cond_drop must be in [0, 1], got {cond_drop}")
        self.unet = unet
        self.first_stage = first_stage if first_stage is not None else IdentityFirstStage()
        self.text_encoder = text_encoder
        self.precond = precond if precond is not None else EpsPrecond()
        self.loss = loss if loss is not None else DenoisingLoss()
        self.cond_drop, self.vector_cond, self.sample_posterior = cond_drop, vector_cond, sample_posterior
        self.optimizer_fn, self.warmup_steps = Shared(optimizer), warmup_steps
        self.val_seed = val_seed
        self.text_context = text_context
        context_dim = getattr(unet, "context_dim", None)
        if embedding_tokens:
            if vector_cond not in ("clip_image", "clip_text") or embedding_dim is None or context_dim is None:
                raise ValueError("embedding_tokens need vector_cond clip_image or clip_text, embedding_dim, and a U-Net "
                                 "with cross-attention (context_dim)")
            # unCLIP's decoder: the CLIP embedding also becomes a few context tokens (Ramesh et al. 2022, sec. 2.1)
            self.embedding_proj: nn.Linear | None = nn.Linear(embedding_dim, embedding_tokens * context_dim)
        else:
            self.embedding_proj = None
        self.embedding_tokens = embedding_tokens
        self.inpainting = inpainting
        self.val_levels = validation_levels(self.precond, val_timesteps, val_sigmas)  # (names, sigmas)
        self.val_means = RowMeans(fixed_noise_names(self.val_levels))
        self._check_shapes()

    def _check_shapes(self) -> None:
        """Mismatched stages fail here, at construction, naming both sides."""
        unet_in = getattr(self.unet, "in_channels", None)
        if unet_in is not None and unet_in != self.first_stage.latent_channels:
            raise ValueError(f"unet.in_channels is {unet_in} but the first stage makes "
                             f"{self.first_stage.latent_channels}-channel latents")
        context_dim = getattr(self.unet, "context_dim", None)
        if self.text_encoder is not None and context_dim is not None and context_dim != self.text_encoder.width:
            raise ValueError(f"unet.context_dim is {context_dim} but the text encoder's token features are "
                             f"{self.text_encoder.width} wide")
        concat = getattr(self.unet, "concat_channels", 0)
        if self.inpainting and concat != self.first_stage.latent_channels + 1:
            raise ValueError(f"inpainting needs unet.concat_channels = latent channels + 1 = "
                             f"{self.first_stage.latent_channels + 1}, got {concat}")
        if concat and not self.inpainting:
            raise ValueError(f"unet.concat_channels is {concat}, but nothing fills them: set inpainting: true")
        if self.vector_cond is not None and getattr(self.unet, "y_dim", 0) is None:
            raise ValueError(f"vector_cond is {self.vector_cond!r} but the U-Net has no y route (set unet y_dim)")

    @property
    def tokenizer(self):
        """Linked into the data module by the CLI, so image batches arrive with ``tokens``."""
        return self.text_encoder.tokenizer if self.text_encoder is not None else None

    @property
    def uses_text(self) -> bool:
        return (getattr(self.unet, "context_dim", None) is not None and self.text_context) or self.vector_cond == "text"

    # -- inputs ------------------------------------------------------------------------------
    def latents(self, batch: dict, generator: torch.Generator | None = None,
                noise: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Scaled latents (B, C, h, w) of a batch: precomputed, or encoded now.

        With ``sample_posterior``, ``noise(z)`` draws the posterior sample's standard normal noise like ``z``
        (default: from ``generator``).
        """
        if "latent" in batch:
            z, std = batch["latent"], batch.get("latent_std")
        else:
            z, std = self.first_stage.encode_posterior(batch["image"])
        if self.sample_posterior:
            if std is None:
                raise ValueError("sample_posterior needs the posterior std: a KL first stage, or latent shards "
                                 "precomputed with --std")
            eps = noise(z) if noise is not None else torch.randn(z.shape, generator=generator, device=z.device,
                                                                 dtype=z.dtype)
            z = z + std * eps
        return z

    def text_features(self, batch: dict) -> dict[str, Tensor]:
        """{tokens (B, T, W), mask (B, T), pooled (B, D)}: precomputed or from the text encoder."""
        if "clip_tokens" in batch:
            return {"tokens": batch["clip_tokens"], "mask": batch["clip_mask"].bool(), "pooled": batch.get("clip_text")}
        if self.text_encoder is not None and "tokens" in batch:
            return self.text_encoder(batch["tokens"])
        raise ValueError("this model is conditioned on text, but the batch has neither clip_tokens (precomputed "
                         "embedding shards) nor tokens (set model.text_encoder so the data module tokenizes captions)")

    def condition(self, batch: dict) -> dict[str, Tensor]:
        """The U-Net's condition for a batch: context + mask (cross-attention), y (vector route)."""
        cond: dict[str, Tensor] = {}
        text = self.text_features(batch) if self.uses_text else None
        if getattr(self.unet, "context_dim", None) is not None and self.text_context:
            cond["context"], cond["context_mask"] = text["tokens"], text["mask"]
        if self.vector_cond == "text":
            if text["pooled"] is None:
                raise ValueError("vector_cond 'text' needs clip_text in precomputed batches")
            cond["y"] = text["pooled"]
        elif self.vector_cond is not None:
            if self.vector_cond not in batch:
                raise ValueError(f"vector_cond {self.vector_cond!r}: the batch has no {self.vector_cond} "
                                 "(precompute embeddings into the shards)")
            y = batch[self.vector_cond]
            # unit-norm CLIP embeddings have entries of about 1 / sqrt(D): scale them to unit variance per entry
            # (as the prior's target), or the vector route and embedding tokens see a signal too small to learn from
            cond["y"] = y * y.shape[-1] ** 0.5 if self.vector_cond in ("clip_image", "clip_text") else y
        if self.embedding_proj is not None:
            y = cond["y"]
            tokens = self.embedding_proj(y.to(self.embedding_proj.weight.dtype)).reshape(len(y), self.embedding_tokens, -1)
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            if "context" in cond:  # appended to the text tokens
                tokens = torch.cat([cond["context"].to(tokens.dtype), tokens], dim=1)
                mask = torch.cat([cond["context_mask"].bool(), mask], dim=1)
            cond["context"], cond["context_mask"] = tokens, mask
        return cond

    def denoiser(self):
        """``model_fn(x, sigma, cond) -> x0_hat`` for the samplers."""
        return self.precond.bind(self.unet)

    # -- training ----------------------------------------------------------------------------
    def drop(self, cond: dict[str, Tensor], generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], Tensor]:
        """(condition with each sample's condition nulled with probability cond_drop, the drop mask (B,))."""
        return drop_randomly(cond, self.cond_drop, generator)

    def with_inpainting_input(self, cond: dict[str, Tensor], z: Tensor, mask: Tensor | None = None,
                              generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """For an inpainting model: add the concat input for ``mask`` (B, 1, h, w) (default: random masks)."""
        if not self.inpainting:
            return cond
        if mask is None:
            mask = random_masks(len(z), *z.shape[-2:], generator=generator, device=z.device)
        return {**cond, "concat": inpaint_concat(z, mask)}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        z = self.latents(batch)  # (B, C, h, w)
        cond = self.with_inpainting_input(self.condition(batch), z)
        if cond and self.cond_drop > 0:
            cond, drop = self.drop(cond)
            self.log("train/cond_dropped", drop.float().mean(), batch_size=len(z))
        losses = self.loss(self.precond, self.unet, z, cond or None)  # (B,)
        loss = losses.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(z))
        return loss

    def configure_optimizers(self):
        return trainable_with_warmup(self.optimizer_fn.value, self, self.warmup_steps)

    # -- validation: loss at fixed noise levels with noise fixed per sample ----------------------
    def on_validation_epoch_start(self) -> None:
        self.val_means.reset()

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        keys, seed = row_keys(batch, batch_idx), self.val_seed
        z = self.latents(batch, noise=lambda like: row_randn(keys, seed, "posterior", like))  # (B, C, h, w)
        valid = batch.get("valid", torch.ones(len(z), dtype=torch.bool, device=z.device))
        mask = None
        if self.inpainting:  # one random mask per sample, the same in any batch
            h, w = z.shape[-2:]
            mask = torch.cat([random_masks(1, h, w, generator=g) for g in row_generators(keys, seed, "mask")])
            mask = mask.to(z.device)  # (B, 1, h, w)
        cond = self.with_inpainting_input(self.condition(batch), z, mask)
        losses = fixed_noise_losses(self.loss, self.precond, self.unet, z, cond or None, keys, self.val_levels, seed)
        self.val_means.update(losses, valid)  # no collective here: a rank may hold only padding rows

    def on_validation_epoch_end(self) -> None:
        log_means(self, self.val_means, prog_bar=["loss"])  # every rank: sums and counts reduced once
