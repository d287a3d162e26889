"""The latent-diffusion system: a U-Net trained to denoise first-stage latents, conditioned on text.

Stable Diffusion's recipe (Rombach et al. 2022): a frozen first stage (a stage-1
autoencoder, or the identity for pixel-space diffusion), a frozen text encoder (our
contrastive run or a pretrained open_clip file), the U-Net, a preconditioner and the
denoising loss of :mod:`ldm.diffusion`. This module only wires them:

* latents come from ``batch["latent"]`` (precomputed shards) or the first stage
  (image shards); with ``sample_posterior`` a KL posterior sample is drawn from its std;
* the condition is built by the injected :class:`~ldm.diffusion.Conditioner` (text tokens from
  ``batch["clip_tokens" / "clip_mask" / "clip_text"]`` precomputed, or its text encoder on
  ``batch["tokens"]``: both paths give the same loss; CLIP embeddings; the inpainting input), the same
  module every pipeline calls;
* with probability ``cond_drop`` per sample the whole condition is replaced by the null
  condition (classifier-free guidance training, Ho & Salimans 2022);
* AdamW (``optimizer``) with linear warmup (``lr_scheduler``); gradient clipping is the trainer's
  ``gradient_clip_val``; EMA is Lightning's ``EMAWeightAveraging`` callback (validation and checkpoints
  then use EMA weights);
* validation: the loss at fixed noise levels with noise (and inpainting masks, and posterior
  samples) fixed per sample key, so curves of different runs compare (``val/loss_t<T>`` per level
  and their mean ``val/loss``); it is the mean over the valid rows of the whole split, reduced
  across ranks once per epoch, the same figure for any world size and batch size
  (:mod:`ldm.systems.validation`);
* optional representation alignment (REPA, Yu et al. 2025; :mod:`ldm.diffusion.repa`): the tokens of the
  transformer's block ``repa.depth`` are captured during the denoising forward, projected and aligned with a frozen
  image encoder's patch features of the clean ``batch["image"]`` (on latent shards: the first stage's decoding of
  the latent); ``train/loss`` (what the optimizer sees) is
  ``train/loss_denoise + repa.weight * train/repa`` (``train/repa``: the unweighted -cos, in [-1, 1]);
* patch masking (a :class:`~ldm.diffusion.DiT` with ``mask_ratio``) happens inside the backbone and the loss; with
  ``unmask_after_steps`` the backbone's ``mask_ratio`` is set to 0 from that optimizer step on (MaskDiT's unmasked
  fine-tuning phase; derived from the global step, so a resumed run is in the right phase).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
import pytorch_lightning as L
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ldm.autoencoder.first_stage import FirstStage, IdentityFirstStage
from ldm.diffusion import DenoisingLoss, EpsPrecond, Preconditioner
from ldm.diffusion.conditioner import Conditioner
from ldm.diffusion.inpainting import random_masks
from ldm.diffusion.repa import RepresentationAlignment
from ldm.systems.optim import LinearWarmup, Shared, configure
from ldm.systems.validation import (
    RowMeans,
    ValidationAsTest,
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


def _rename_pre_conditioner_keys(module, state_dict, prefix, *args) -> None:
    """Weights saved before the conditioner (issue 15) held its text encoder and embedding projection on the
    system: rename them."""
    for old in [k for k in state_dict if k.startswith((prefix + "embedding_proj.", prefix + "text_encoder."))]:
        state_dict[prefix + "conditioner." + old[len(prefix):]] = state_dict.pop(old)


class LatentDiffusion(ValidationAsTest, L.LightningModule):
    """Args:
        unet: the denoising network, called ``unet(x, t, context=, context_mask=, y=)``.
        first_stage: frozen image <-> latent maps (default: identity = pixel space).
        conditioner: batch / prompts -> the U-Net's condition (text encoder, CLIP-embedding route, embedding tokens,
            inpainting input); default: none (an unconditional model).
        precond: parameterisation (default: eps prediction on SD's linear DDPM schedule).
        loss: noise-level sampling and weighting (default: uniform timesteps, no weighting).
        cond_drop: probability of dropping the condition per sample (0.1 in SD).
        sample_posterior: draw latents from the KL posterior instead of its mode.
        optimizer: optimizer of the U-Net (default AdamW, lr 1e-4, no weight decay).
        lr_scheduler: stepped per optimizer step (default: constant; :class:`~ldm.systems.optim.LinearWarmup`
            with ``warmup_steps`` ramps it up).
        val_timesteps: fixed DDPM timesteps of the validation loss (VP preconditioners).
        val_sigmas: fixed noise levels of the validation loss (any preconditioner; wins over timesteps).
        val_seed: seed of the fixed validation noise (drawn per sample key with it).
        init_from: a run folder (or .ckpt) whose weights this model starts from: fine-tuning, e.g. of a Stable
            Diffusion run imported with ``ldm convert``. Loaded at construction (so EMA starts from them); a resumed
            run (``--ckpt_path``) then restores its own. The architectures must match (errors name the keys).
        repa: representation alignment of a transformer backbone's block with a frozen image encoder (an extra loss
            term; its projector trains with the backbone; on precomputed latents the encoder sees the first stage's
            decoding of each latent).
        unmask_after_steps: set the backbone's patch-masking ``mask_ratio`` to 0 from this optimizer step on
            (MaskDiT's unmasked fine-tuning); None keeps it.
    """

    #: the validation metric that picks the best checkpoint (``ldm fit``'s default checkpointing)
    checkpoint_monitor = ("val/loss", "min")
    stage = "latent_diffusion"  # the W&B job_type of its runs (ldm.runs.stage_of)

    def __init__(self, unet: nn.Module, first_stage: FirstStage | None = None,
                 conditioner: Conditioner | None = None, precond: Preconditioner | None = None,
                 loss: DenoisingLoss | None = None, cond_drop: float = 0.1, sample_posterior: bool = False,
                 optimizer: OptimizerCallable = lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0),
                 lr_scheduler: LRSchedulerCallable = LinearWarmup,
                 val_timesteps: Sequence[int] = (100, 300, 500, 700, 900), val_sigmas: Sequence[float] | None = None,
                 val_seed: int = 0, init_from: str | None = None, repa: RepresentationAlignment | None = None,
                 unmask_after_steps: int | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["unet", "first_stage", "conditioner", "precond", "loss", "optimizer",
                                          "lr_scheduler", "repa"])  # callables: config.yaml holds them
        if not 0.0 <= cond_drop <= 1.0:
            raise ValueError(f"cond_drop must be in [0, 1], got {cond_drop}")
        self.unet = unet
        self.first_stage = first_stage if first_stage is not None else IdentityFirstStage()
        unet_in = getattr(unet, "in_channels", None)
        if unet_in is not None and unet_in != self.first_stage.latent_channels:
            raise ValueError(f"unet.in_channels is {unet_in} but the first stage makes "
                             f"{self.first_stage.latent_channels}-channel latents")
        conditioner = conditioner if conditioner is not None else Conditioner()
        self.conditioner = conditioner.fit_to(unet, self.first_stage.latent_channels)
        self.register_load_state_dict_pre_hook(_rename_pre_conditioner_keys)
        self.precond = precond if precond is not None else EpsPrecond()
        self.loss = loss if loss is not None else DenoisingLoss()
        self.cond_drop, self.sample_posterior = cond_drop, sample_posterior
        self.optimizer_fn, self.lr_scheduler_fn = Shared(optimizer), Shared(lr_scheduler)
        self.val_seed = val_seed
        self.val_levels = validation_levels(self.precond, val_timesteps, val_sigmas)  # (names, sigmas)
        self.val_means = RowMeans(fixed_noise_names(self.val_levels))
        self.repa = repa.fit_to(unet) if repa is not None else None  # the projector trains; the encoder is frozen
        if unmask_after_steps is not None and not hasattr(unet, "mask_ratio"):
            raise ValueError(f"unmask_after_steps turns off patch masking, which {type(unet).__name__} has not "
                             "(a DiT with mask_ratio)")
        self.unmask_after_steps = unmask_after_steps
        if init_from is not None:
            from ldm.systems.loading import load_weights_into

            load_weights_into(self, init_from)

    @property
    def tokenizer(self):
        """Linked into the data module by the CLI, so image batches arrive with ``tokens``."""
        return self.conditioner.tokenizer

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

    @torch.no_grad()
    def clean_images(self, batch: dict) -> Tensor:
        """The clean [-1, 1] images REPA's encoder sees: the batch's own, or, on precomputed latent shards (no
        ``image``), the first stage's decoding of the latent (its reconstruction of the image)."""
        if "image" in batch:
            return batch["image"]
        return self.first_stage.decode(batch["latent"]).clamp(-1, 1)

    def condition(self, batch: dict) -> dict[str, Tensor]:
        """The U-Net's condition for a batch (the conditioner's; {} for an unconditional model)."""
        return self.conditioner(batch)

    def denoiser(self, flow: bool = False):
        """``model_fn(x, sigma, cond) -> x0_hat`` for the samplers (``flow``: in a flow model's own space, for its
        Euler / Heun; :meth:`~ldm.diffusion.Preconditioner.flow_space`)."""
        return self.precond.bind(self.unet, flow=flow)

    @torch.no_grad()
    def flops_per_sample(self, batch: dict) -> int:
        """Training FLOPs per sample: 3 x the network's forward FLOPs on the first sample of ``batch`` (forward +
        backward, the usual MFU convention; the frozen stages' inference is not counted), counted by torch's
        ``FlopCounterMode``. The random state is restored afterwards, so counting changes no training step."""
        from torch.utils.flop_counter import FlopCounterMode

        one = {k: v[:1] if isinstance(v, (Tensor, list, tuple)) else v for k, v in batch.items()}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            z = self.latents(one)  # (1, C, h, w)
            cond = self.conditioner.with_concat(self.condition(one), z) or {}
            sigma = torch.ones(1, device=z.device, dtype=z.dtype)
            counter = FlopCounterMode(display=False)
            with counter:
                self.precond.raw(self.unet, z, sigma, cond)
        return 3 * int(counter.get_total_flops())

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        z = self.latents(batch)  # (B, C, h, w)
        cond = self.conditioner.with_concat(self.condition(batch), z)
        if cond and self.cond_drop > 0:
            cond, drop = self.conditioner.drop(cond, self.cond_drop)
            self.log("train/cond_dropped", drop.float().mean(), batch_size=len(z))
        if self.repa is None:
            loss = self.loss(self.precond, self.unet, z, cond or None).mean()
        else:
            with self.repa.capture(self.unet) as captured:
                denoise = self.loss(self.precond, self.unet, z, cond or None).mean()
            align = self.repa(captured["tokens"], self.clean_images(batch), self.unet.last_grid,
                              self.unet.last_kept).mean()
            self.log("train/loss_denoise", denoise, batch_size=len(z))
            self.log("train/repa", align, prog_bar=True, batch_size=len(z))
            loss = denoise + self.repa.weight * align
        self.log("train/loss", loss, prog_bar=True, batch_size=len(z))
        return loss

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self.unmask_after_steps is not None and self.global_step >= self.unmask_after_steps:
            self.unet.mask_ratio = 0.0  # MaskDiT's unmasked fine-tuning phase

    def configure_optimizers(self):
        return configure(self, self.optimizer_fn.value, self.lr_scheduler_fn.value)

    # -- validation: loss at fixed noise levels with noise fixed per sample ----------------------
    def on_validation_epoch_start(self) -> None:
        self.val_means.reset()

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        keys, seed = row_keys(batch, batch_idx), self.val_seed
        z = self.latents(batch, noise=lambda like: row_randn(keys, seed, "posterior", like))  # (B, C, h, w)
        valid = batch.get("valid", torch.ones(len(z), dtype=torch.bool, device=z.device))
        mask = None
        if self.conditioner.inpainting:  # one random mask per sample, the same in any batch
            h, w = z.shape[-2:]
            mask = torch.cat([random_masks(1, h, w, generator=g) for g in row_generators(keys, seed, "mask")])
            mask = mask.to(z.device)  # (B, 1, h, w)
        cond = self.conditioner.with_concat(self.condition(batch), z, mask)
        losses = fixed_noise_losses(self.loss, self.precond, self.unet, z, cond or None, keys, self.val_levels, seed)
        self.val_means.update(losses, valid)  # no collective here: a rank may hold only padding rows

    def on_validation_epoch_end(self) -> None:
        log_means(self, self.val_means, prog_bar=["loss"])  # every rank: sums and counts reduced once
