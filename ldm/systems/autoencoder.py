"""The autoencoder system: trains an :class:`~ldm.autoencoder.Autoencoder` with its GAN loss.

Manual optimisation of the generator (encoder, bottleneck, decoder) and the discriminator,
each with its own LR scheduler (stepped with it) and gradient-norm clipping; every named loss term
is logged. The latent scale factor (1 / std of the unscaled latents) is estimated on the training
batches (:class:`~ldm.autoencoder.LatentScaleEstimator`) and written into the autoencoder's buffer,
so every checkpoint carries the factor of its own encoder. Validation: PSNR, SSIM, the mean
reconstruction terms, codebook perplexity (VQ), and rFID when Inception weights are available
locally, each over the valid rows of the whole split, reduced across ranks once per epoch (a rank
may hold only padding rows), so the figures are one process's for any world size and batch size.

Under DDP the discriminator takes no part in the generator's loss before ``disc_start`` and the
generator none in the discriminator's backward after it, so DDP must detect unused parameters:
the system says so (``ddp_find_unused_parameters``) and ``ldm fit`` turns ``--trainer.strategy=ddp``
into Lightning's ``ddp_find_unused_parameters_true`` for it; a trainer built by hand with plain DDP
is refused before the first step, naming that strategy.
"""

from __future__ import annotations

import logging
import os
from typing import ClassVar

import pytorch_lightning as L
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable, ReduceLROnPlateau
from torch.nn.parallel import DistributedDataParallel
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.autoencoder import Autoencoder, AutoencoderLoss, LatentScaleEstimator
from ldm.autoencoder.bottlenecks import code_perplexity
from ldm.systems.optim import LinearWarmup, Shared, build_optimizer, build_scheduler
from ldm.systems.validation import Histogram, RowMeans, ValidationAsTest, log_means

log = logging.getLogger(__name__)


def ldm_adam(params) -> torch.optim.Adam:
    """The optimizer of LDM's autoencoders (and of the discriminator): Adam, lr 4.5e-6, betas (0.5, 0.9)."""
    return torch.optim.Adam(params, lr=4.5e-6, betas=(0.5, 0.9))


def _rename_old_scale_state(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before the latent moments moved into ``latent_scale`` held them as ``latent_moments``."""
    old = state_dict.pop(prefix + "latent_moments", None)
    if old is not None:
        state_dict.setdefault(prefix + "latent_scale.moments", old)
        state_dict.setdefault(prefix + "latent_scale.count", state_dict[prefix + "batches_seen"].clone())


def _drop_old_fid_weights(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before rFID moved to :class:`~ldm.metrics.generation.StreamingFID` held a copy of the
    Inception network (``fid.inception.*``); the rFID network loads from its file, rFID on or off."""
    for key in [k for k in state_dict if k.startswith(prefix + "fid.")]:
        del state_dict[key]


class AutoencoderSystem(ValidationAsTest, L.LightningModule):
    """Args:
        autoencoder: encoder + bottleneck + decoder.
        loss: reconstruction / perceptual / regulariser / adversarial terms and the discriminator.
        optimizer: optimizer of the autoencoder (default: :func:`ldm_adam`, Adam, lr 4.5e-6, betas (0.5, 0.9), as LDM).
        disc_optimizer: optimizer of the discriminator (default: the same).
        lr_scheduler: built for each optimizer and stepped with it, so the discriminator's starts at ``disc_start``
            (default: constant; :class:`~ldm.systems.optim.LinearWarmup` with ``warmup_steps`` ramps both). A
            schedule over the run's length needs its ``total_steps``: the trainer's count mixes both optimizers.
        gradient_clip: max gradient norm of each optimizer step (None = off).
        scale_momentum: momentum of the running latent moments behind the scale factor
            (:class:`~ldm.autoencoder.LatentScaleEstimator`).
        fid_weights: local path of torch-fidelity's Inception weights
            (``weights-inception-2015-12-05-6726825d.pth``) for rFID; None = rFID off.
    """

    #: two backward passes per step, each leaving one of generator and discriminator without gradients
    ddp_find_unused_parameters: ClassVar[bool] = True

    #: the validation metric that picks the best checkpoint (``ldm fit``'s default checkpointing)
    checkpoint_monitor = ("val/rec", "min")
    stage = "autoencoder"  # the W&B job_type of its runs (ldm.runs.stage_of)

    def __init__(self, autoencoder: Autoencoder, loss: AutoencoderLoss, optimizer: OptimizerCallable = ldm_adam,
                 disc_optimizer: OptimizerCallable = ldm_adam, lr_scheduler: LRSchedulerCallable = LinearWarmup,
                 gradient_clip: float | None = 1.0, scale_momentum: float = 0.99, fid_weights: str | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["autoencoder", "loss", "optimizer", "disc_optimizer", "lr_scheduler"])
        self.automatic_optimization = False
        self.autoencoder, self.loss = autoencoder, loss
        self.optimizer_fn, self.disc_optimizer_fn = Shared(optimizer), Shared(disc_optimizer)
        self.lr_scheduler_fn = Shared(lr_scheduler)
        self.gradient_clip = gradient_clip
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        self._batches_seen: int | None = None  # the buffer's value on the host, while training
        self.latent_scale = LatentScaleEstimator(scale_momentum)
        self.register_load_state_dict_pre_hook(_rename_old_scale_state)
        self.register_load_state_dict_pre_hook(_drop_old_fid_weights)
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.fid = self._make_fid(fid_weights)
        self.val_means = RowMeans(loss.reconstruction_names)
        num_codes = getattr(autoencoder.bottleneck, "num_codes", None)
        self.val_codes = Histogram(num_codes) if num_codes else None  # VQ: code usage over the whole split

    @staticmethod
    def _make_fid(path: str | None):
        """rFID through the generation metrics' FID path (:class:`~ldm.metrics.generation.StreamingFID`)."""
        if path is None:
            log.warning("rFID is off: no Inception weights given (model.fid_weights)")
            return None
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            log.warning("rFID is off: Inception weights not found at %s", path)
            return None
        from ldm.metrics.generation import InceptionFeatures, StreamingFID

        return StreamingFID(InceptionFeatures(path))

    # -- optimisation ----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        ddp = self.trainer.strategy.model if self.trainer is not None else None
        if isinstance(ddp, DistributedDataParallel) and not ddp.find_unused_parameters:
            raise RuntimeError("the autoencoder needs DDP to find unused parameters (the discriminator sits out the "
                               "generator's backward and the generator the discriminator's): use "
                               "strategy='ddp_find_unused_parameters_true' (`ldm fit --trainer.strategy=ddp` does)")

    def configure_optimizers(self):
        opt_g = build_optimizer(self.optimizer_fn.value, self.autoencoder.parameters())
        opt_d = build_optimizer(self.disc_optimizer_fn.value, self.loss.discriminator.parameters())
        scheds = [build_scheduler(self.lr_scheduler_fn.value, o) for o in (opt_g, opt_d)]
        if isinstance(scheds[0], ReduceLROnPlateau):
            raise ValueError("the autoencoder steps its schedulers with its optimizers, without a metric: "
                             "ReduceLROnPlateau cannot be its lr_scheduler")
        return [opt_g, opt_d], scheds

    def _step(self, opt, sched, loss) -> None:
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.gradient_clip:
            self.clip_gradients(opt, gradient_clip_val=self.gradient_clip, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        x = batch["image"]  # (B, 3, H, W)
        if self._batches_seen is None:  # read once per fit; after that counted on the host (no sync per step)
            self._batches_seen = int(self.batches_seen)
        step = self._batches_seen
        recon, z, info = self.autoencoder(x)
        self.autoencoder.scale_factor.copy_(self.latent_scale.update(z))
        loss_g, terms = self.loss.generator_loss(x, recon, info, self.autoencoder.decoder.last_layer, step)
        self._step(opt_g, sched_g, loss_g)
        if self.loss.uses_gan(step):
            loss_d, d_terms = self.loss.discriminator_loss(x, recon)
            self._step(opt_d, sched_d, loss_d)
            terms.update(d_terms)
        if "perplexity" in info:
            terms["perplexity"], terms["codebook_usage"] = info["perplexity"], info["usage"]
        terms["scale_factor"] = self.autoencoder.scale_factor
        self.log_dict({f"train/{k}": v.detach().float() for k, v in terms.items()}, prog_bar=False,
                      batch_size=len(x))
        self.log("train/loss", terms["total"].detach(), prog_bar=True, batch_size=len(x))
        self.batches_seen += 1
        self._batches_seen += 1

    def on_train_start(self) -> None:
        self._batches_seen = None  # the buffer may have been restored from a checkpoint since

    # -- validation: local sums per step, one reduction per epoch ---------------------------------
    def on_validation_epoch_start(self) -> None:
        for metric in (self.val_means, self.val_codes, self.psnr, self.ssim):
            if metric is not None:
                metric.reset()

    def validation_step(self, batch, batch_idx):
        x = batch["image"]  # (B, 3, H, W)
        valid = batch.get("valid", torch.ones(len(x), dtype=torch.bool, device=x.device))
        recon, _, info = self.autoencoder(x)  # rows are independent: padding rows change no valid row
        self.val_means.update(self.loss.reconstruction_terms(x, recon), valid)  # (B,) per term
        if self.val_codes is not None:
            self.val_codes.update(info["indices"], valid)  # (B, h, w) code indices
        x, recon = x[valid], recon[valid]
        if len(x) == 0:  # only padding here; the metrics still reduce on every rank at the epoch's end
            return
        real, fake = (x.clamp(-1, 1) + 1) / 2, (recon.clamp(-1, 1) + 1) / 2
        self.psnr.update(fake, real)
        self.ssim.update(fake, real)
        if self.fid is not None:
            self.fid.update(x, real=True)  # [-1, 1]; the features quantise to uint8 as for generated images
            self.fid.update(recon, real=False)

    def on_validation_epoch_end(self) -> None:
        # every rank, in this order: each compute() reduces its metric's sums across ranks
        log_means(self, self.val_means)
        if self.val_codes is not None:
            counts = self.val_codes.compute()  # (K,)
            self.val_codes.reset()
            if counts.sum() > 0:
                self.log("val/perplexity", code_perplexity(counts).float(), sync_dist=False, rank_zero_only=False)
                self.log("val/codebook_usage", (counts > 0).float().mean(), sync_dist=False, rank_zero_only=False)
        self.log("val/psnr", self.psnr.compute(), sync_dist=False)
        self.log("val/ssim", self.ssim.compute(), sync_dist=False)
        self.psnr.reset()
        self.ssim.reset()
        if self.fid is not None:
            self.log("val/rfid", self.fid.compute())
            self.fid.reset()
