"""The diffusion-prior system: trains a :class:`~ldm.diffusion.prior.PriorTransformer` on precomputed
CLIP embeddings (``ldm precompute embeddings``), and samples image embeddings for texts.

* Data: ``clip_image`` (B, D) is the target, scaled by sqrt(D) so its entries have about unit
  variance (unit-norm CLIP embeddings have entries of size 1 / sqrt(D)); ``clip_text`` (B, D),
  and when the prior reads tokens, ``clip_tokens`` (B, T, W) + ``clip_mask`` (B, T).
* Classifier-free guidance training: the whole text condition is dropped with probability
  ``cond_drop`` (10 % in DALL-E 2).
* Parameterisation, noise levels and weighting come from the preconditioner and the loss of the
  diffusion core (default: x0 prediction on a cosine schedule, as DALL-E 2).
* Sampling (:meth:`sample`): any sampler of the core with guidance; best-of-n draws n embeddings
  per text and keeps the one with the highest dot product with the text embedding (DALL-E 2,
  sec. 2.2).
* Validation: the loss at fixed noise levels with noise fixed per sample key, and on embeddings
  sampled for the validation texts (from initial noise fixed per sample key): cosine similarity
  with the true image embedding (``val/cos_prior``) against the "no prior" baseline that uses the
  text embedding itself (``val/cos_text``), and the retrieval R@1 of the true image among all
  validation images from the predicted embedding (``val/r1_prior``, ``val/r1_text``). Every figure
  is over the valid rows of the whole split, reduced or gathered across ranks once per epoch, the
  same for any world size and batch size (with a deterministic sampler such as DDIM; a stochastic
  one adds per-batch noise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytorch_lightning as L
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ldm.diffusion import (
    SAMPLERS,
    DenoisingLoss,
    DiscreteSchedule,
    Preconditioner,
    X0Precond,
    classifier_free_guidance,
    drop_randomly,
    null_condition,
)
from ldm.metrics.retrieval import recall_at_k
from ldm.diffusion.precond import sampling_sigmas
from ldm.systems.optim import LinearWarmup, Shared, configure
from ldm.systems.validation import (
    RowMeans,
    ValidationAsTest,
    fixed_noise_losses,
    fixed_noise_names,
    gather_rows,
    log_means,
    row_keys,
    row_randn,
    validation_levels,
)


class DiffusionPrior(ValidationAsTest, L.LightningModule):
    """Args:
        prior: the transformer, called ``prior(x, t, text_emb=, text_tokens=, text_mask=)``.
        precond: parameterisation (default: x0 prediction, cosine schedule).
        loss: noise-level sampling and weighting (default: uniform timesteps, MSE on the target).
        cond_drop: probability of dropping the text condition per sample.
        use_tokens: feed the per-token text features (needs ``clip_tokens`` in the shards).
        optimizer: default AdamW with DALL-E 2's lr 1.1e-4 and weight decay 6e-2 (table 3).
        lr_scheduler: stepped per optimizer step (default: constant; :class:`~ldm.systems.optim.LinearWarmup`
            with ``warmup_steps`` ramps it up).
        sampler, steps, cfg, best_of: sampling settings of validation and :meth:`sample`.
        val_timesteps: fixed timesteps of the validation loss.
        val_seed: seed of the fixed validation noise and of validation sampling (drawn per sample key with it).
    """

    #: the validation metric that picks the best checkpoint (``ldm fit``'s default checkpointing)
    checkpoint_monitor = ("val/loss", "min")
    stage = "prior"  # the W&B job_type of its runs (ldm.runs.stage_of)

    def __init__(self, prior: nn.Module, precond: Preconditioner | None = None, loss: DenoisingLoss | None = None,
                 cond_drop: float = 0.1, use_tokens: bool = True,
                 optimizer: OptimizerCallable = lambda params: torch.optim.AdamW(params, lr=1.1e-4, weight_decay=6e-2),
                 lr_scheduler: LRSchedulerCallable = LinearWarmup, sampler: str = "ddim", steps: int = 25,
                 cfg: float = 1.0, best_of: int = 1, val_timesteps: Sequence[int] = (100, 300, 500, 700, 900),
                 val_seed: int = 0):
        super().__init__()
        self.save_hyperparameters(ignore=["prior", "precond", "loss", "optimizer", "lr_scheduler"])  # callables
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if best_of < 1:
            raise ValueError(f"best_of must be >= 1, got {best_of}")
        self.prior = prior
        self.precond = precond if precond is not None else X0Precond(DiscreteSchedule("cosine"))
        self.loss = loss if loss is not None else DenoisingLoss()
        self.cond_drop, self.use_tokens = cond_drop, use_tokens
        self.optimizer_fn, self.lr_scheduler_fn = Shared(optimizer), Shared(lr_scheduler)
        self.sampler, self.steps, self.cfg, self.best_of = sampler, steps, cfg, best_of
        self.val_levels, self.val_seed = validation_levels(self.precond, val_timesteps), val_seed
        self.val_means = RowMeans(fixed_noise_names(self.val_levels))
        self.scale = math.sqrt(getattr(prior, "embed_dim", 1))
        self._val: dict[str, list[Tensor]] = {}

    # -- inputs ------------------------------------------------------------------------------
    def condition(self, batch: dict) -> dict[str, Tensor]:
        missing = [k for k in ("clip_text", "clip_image") if k not in batch]
        if self.use_tokens:
            missing += [k for k in ("clip_tokens", "clip_mask") if k not in batch]
        if missing:
            raise ValueError(f"the prior trains on precomputed CLIP embeddings; the batch lacks {', '.join(missing)} "
                             "(run `ldm precompute embeddings` and set data.decode_images: false)")
        return self.text_condition({"pooled": batch["clip_text"], "tokens": batch.get("clip_tokens"),
                                    "mask": batch.get("clip_mask")})

    def text_condition(self, text: dict[str, Tensor]) -> dict[str, Tensor]:
        """The prior's condition of text features {pooled (B, D), tokens (B, T, W), mask (B, T)}, as a CLIP text
        encoder gives them (``FrozenTextEncoder``) or the embedding shards hold them."""
        cond = {"text_emb": text["pooled"].float()}
        if self.use_tokens:
            cond["text_tokens"], cond["text_mask"] = text["tokens"].float(), text["mask"].bool()
        return cond

    def target(self, batch: dict) -> Tensor:
        return batch["clip_image"].float() * self.scale  # (B, D), entries of about unit variance

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x0, cond = self.target(batch), self.condition(batch)
        if self.cond_drop > 0:
            cond, _ = drop_randomly(cond, self.cond_drop)
        loss = self.loss(self.precond, self.prior, x0, cond).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x0))
        return loss

    def configure_optimizers(self):
        return configure(self, self.optimizer_fn.value, self.lr_scheduler_fn.value)

    # -- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, cond: dict[str, Tensor], *, seed: int = 0, best_of: int | None = None, cfg: float | None = None,
               steps: int | None = None, sampler: str | None = None, noise: Tensor | None = None) -> Tensor:
        """Normalised image embeddings (B, D) for a text condition (``condition`` of a batch).

        Candidate k of every text starts from the noise of seed ``seed + k`` (or from ``noise[k]``, standard
        normal (n, B, D), e.g. drawn per sample so a row's draw does not depend on its batch); best-of-n keeps
        the candidate with the highest dot product with the text embedding, so it never scores below the
        single draw of the same seed.
        """
        best_of = best_of or self.best_of
        cfg = self.cfg if cfg is None else cfg
        text = cond["text_emb"]
        b, d = text.shape
        sigmas = sampling_sigmas(self.precond, steps or self.steps).to(text.device)
        model_fn = self.precond.bind(self.prior)
        if cfg != 1.0:
            model_fn = classifier_free_guidance(model_fn, scale=cfg, uncond=null_condition(cond))
        candidates = []
        for k in range(best_of):
            if noise is not None:
                x = noise[k].to(text)  # (B, D)
            else:
                x = torch.randn(b, d, generator=torch.Generator().manual_seed(seed + k)).to(text.device)
            x = x * self.precond.initial_noise_scale(sigmas[0]).to(text)
            z = SAMPLERS[sampler or self.sampler](model_fn, x, sigmas, cond=cond,
                                                  generator=torch.Generator(text.device).manual_seed(seed + k))
            candidates.append(F.normalize(z / self.scale, dim=-1))
        stack = torch.stack(candidates, dim=1)  # (B, n, D)
        scores = (stack * F.normalize(text, dim=-1)[:, None]).sum(-1)  # (B, n)
        return stack[torch.arange(b, device=text.device), scores.argmax(dim=1)]  # (B, D)

    # -- validation --------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = {"pred": [], "text": [], "image": [], "valid": []}
        self.val_means.reset()

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x0, cond = self.target(batch), self.condition(batch)
        keys, seed = row_keys(batch, batch_idx), self.val_seed
        valid = batch.get("valid", torch.ones(len(x0), dtype=torch.bool, device=x0.device))
        losses = fixed_noise_losses(self.loss, self.precond, self.prior, x0, cond, keys, self.val_levels, seed)
        self.val_means.update(losses, valid)  # no collective here: a rank may hold only padding rows
        noise = torch.stack([row_randn(keys, seed, f"sample{k}", cond["text_emb"]) for k in range(self.best_of)])
        self._val["pred"].append(self.sample(cond, seed=seed, noise=noise))  # noise: (n, B, D)
        self._val["text"].append(F.normalize(cond["text_emb"], dim=-1))
        self._val["image"].append(F.normalize(batch["clip_image"].float(), dim=-1))
        self._val["valid"].append(valid)

    def on_validation_epoch_end(self) -> None:
        log_means(self, self.val_means, prog_bar=["loss"])  # every rank: sums and counts reduced once
        if not self._val.get("pred"):
            return
        every = {k: gather_rows(self, torch.cat(v)) for k, v in self._val.items()}
        valid = every["valid"].bool()
        image = every["image"][valid]
        for name, label in (("pred", "prior"), ("text", "text")):
            guess = every[name][valid]
            self.log(f"val/cos_{label}", (guess * image).sum(-1).mean(), sync_dist=False, rank_zero_only=False)
            # R@1 of the true image among all validation images, from each predicted (or text) embedding
            r1 = recall_at_k(guess, image, ks=(1,))["i2t_R@1"]
            self.log(f"val/r1_{label}", r1, sync_dist=False, rank_zero_only=False)
        self._val = {}
