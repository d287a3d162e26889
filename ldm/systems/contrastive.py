"""The contrastive system: trains an :class:`~ldm.contrastive.OpenCLIP` with CLIP's or SigLIP's loss.

The optimizer's weight decay on every parameter but gains, biases and the logit scale / bias, token
and positional embeddings included: open_clip_train's rule (``main.py``: no decay where
``p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n``); ``decay_embeddings=False``
also exempts the embeddings (this system's default before issue 15). By default AdamW with linear warmup
then cosine decay to 0 at the trainer's last step (open_clip_train's); the logit scale is clamped to
ln(100) after every step. Logs the loss, the temperature (exp logit scale), the bias and the in-batch
image->text accuracy. Validation embeds the whole validation split, gathers it exactly across ranks
(the data module pads ranks to equal length and marks the padding) and logs image<->text recall@k,
the zero-shot accuracy of each configured task, and ``val/loss``: the contrastive loss with the whole
validation split (its valid rows) as one batch. An in-batch loss
depends on what shares the batch; over the whole split it is one figure for any world size and
validation batch size (larger than the training loss, which sees fewer negatives), at the cost of
the N x N similarities that recall@k computes anyway. Nothing in ``validation_step`` is a collective,
so a rank whose batch is all padding cannot leave the others waiting.
"""

from __future__ import annotations

import math

import pytorch_lightning as L
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable

from ldm.contrastive import ContrastiveLoss, OpenCLIP, ZeroShotTask
from ldm.contrastive.noised import noise_images
from ldm.metrics.retrieval import recall_at_k, zero_shot_accuracy
from ldm.systems.optim import Shared, WarmupCosine, configure
from ldm.systems.validation import ValidationAsTest, gather_rows


def open_clip_adamw(params) -> torch.optim.AdamW:
    """open_clip_train's AdamW for ViT-B: lr 5e-4, weight decay 0.2, betas (0.9, 0.98), eps 1e-6."""
    return torch.optim.AdamW(params, lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)


def no_weight_decay(name: str, p: torch.nn.Parameter, decay_embeddings: bool = True) -> bool:
    """open_clip_train's exclusion rule (``main.py``) on a parameter of the open_clip model; with
    ``decay_embeddings=False`` also every parameter named ``*embedding*`` (token, positional, class)."""
    return (p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            or (not decay_embeddings and "embedding" in name))


class ContrastiveSystem(ValidationAsTest, L.LightningModule):
    """Args:
        model: the CLIP / SigLIP model.
        loss: :class:`~ldm.contrastive.ClipLoss` or :class:`~ldm.contrastive.SigLipLoss`.
        optimizer: called with two parameter groups: the one its weight decay applies to, and the one without
            (gains, biases and the logit scale / bias: open_clip_train's rule, :func:`no_weight_decay`). Default:
            :func:`open_clip_adamw` (AdamW, lr 5e-4, weight decay 0.2, betas (0.9, 0.98), eps 1e-6).
        lr_scheduler: stepped per optimizer step (default: 100 steps of linear warmup, then cosine decay to 0
            at the trainer's last step, :class:`~ldm.systems.optim.WarmupCosine`).
        decay_embeddings: decay the token and positional embeddings, as open_clip_train does; ``False``
            exempts them (this system's default before issue 15; set it to resume such a run's optimizer state).
        zero_shot: zero-shot classification tasks evaluated on the validation split.
        recall_ks: k of the retrieval recall@k.
        noised_fraction: the fraction of training images replaced by noised versions at a random
            noise level (a "noised CLIP" for CLIP-guided sampling, :mod:`ldm.contrastive.noised`); 0 = off.
    """

    #: the validation metric that picks the best checkpoint (``ldm fit``'s default checkpointing)
    checkpoint_monitor = ("val/loss", "min")
    stage = "contrastive"  # the W&B job_type of its runs (ldm.runs.stage_of)

    def __init__(self, model: OpenCLIP, loss: ContrastiveLoss, optimizer: OptimizerCallable = open_clip_adamw,
                 lr_scheduler: LRSchedulerCallable = lambda optimizer: WarmupCosine(optimizer, warmup_steps=100),
                 zero_shot: list[ZeroShotTask] | None = None, recall_ks: list[int] | None = None,
                 noised_fraction: float = 0.0, decay_embeddings: bool = True):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "loss", "optimizer", "lr_scheduler"])  # callables: config.yaml
        self.model, self.loss = model, loss
        self.optimizer_fn, self.lr_scheduler_fn = Shared(optimizer), Shared(lr_scheduler)
        self.decay_embeddings = decay_embeddings
        self.zero_shot = list(zero_shot or [])
        self.recall_ks = list(recall_ks or [1, 5, 10])
        if not 0.0 <= noised_fraction <= 1.0:
            raise ValueError(f"noised_fraction must be in [0, 1], got {noised_fraction}")
        self.noised_fraction = noised_fraction
        self._val: dict[str, list[torch.Tensor]] = {}

    @property
    def tokenizer(self):
        """Linked into the data module by the CLI: batches arrive with ``tokens``."""
        return self.model.tokenizer

    def _bias(self):
        return self.model.logit_bias if self.loss.uses_bias else None

    @torch.no_grad()
    def flops_per_sample(self, batch: dict) -> int:
        """Training FLOPs per (image, caption) pair: 3 x the two towers' forward FLOPs on the first sample of ``batch``
        (forward + backward, the usual MFU convention; the loss's B x B similarities are not counted), counted by
        torch's ``FlopCounterMode``. The throughput monitor turns them into MFU where the GPU's peak is known."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.model.encode_image(batch["image"][:1])
            self.model.encode_text(batch["tokens"][:1])
        return 3 * int(counter.get_total_flops())

    def training_step(self, batch, batch_idx):
        img = self.model.encode_image(noise_images(batch["image"], self.noised_fraction))  # (B, D), normalised
        txt = self.model.encode_text(batch["tokens"])  # (B, D)
        scale = self.model.logit_scale.exp()
        loss = self.loss(img, txt, scale, self._bias())
        with torch.no_grad():
            acc = ((img @ txt.t()).argmax(dim=1) == torch.arange(len(img), device=img.device)).float().mean()
        n = len(img)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        # logit_scale as CLIP logs it (the multiplier exp(t), learned as t) and the temperature the papers report
        self.log_dict({"train/logit_scale": scale, "train/temperature": 1.0 / scale, "train/in_batch_acc": acc},
                      batch_size=n)
        if self.model.logit_bias is not None:
            self.log("train/logit_bias", self.model.logit_bias.detach().squeeze(), batch_size=n)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    # -- validation: exact over ranks ------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = {"image": [], "text": [], "valid": [], **{t.name: [] for t in self.zero_shot}}

    def validation_step(self, batch, batch_idx):
        img = self.model.encode_image(batch["image"])
        txt = self.model.encode_text(batch["tokens"])
        valid = batch.get("valid", torch.ones(len(img), dtype=torch.bool, device=img.device))
        self._val["image"].append(img)
        self._val["text"].append(txt)
        self._val["valid"].append(valid)
        for task in self.zero_shot:
            labels = [task.label_of(m) for m in batch["meta"]]
            self._val[task.name].append(torch.tensor(labels, device=img.device))

    def _gathered(self, key: str) -> torch.Tensor:
        return gather_rows(self, torch.cat(self._val[key]))

    def on_validation_epoch_end(self) -> None:
        if not self._val.get("image"):
            return
        valid = self._gathered("valid").bool()
        img, txt = self._gathered("image")[valid], self._gathered("text")[valid]
        if len(img):  # the same rows on every rank: the loss of one process holding them all, no collective
            loss = self.loss(img, txt, self.model.logit_scale.exp(), self._bias(), gather=False)
            self.log("val/loss", loss, prog_bar=True, sync_dist=False, rank_zero_only=False)
        for name, value in recall_at_k(img, txt, self.recall_ks).items():
            self.log(f"val/{name}", value, sync_dist=False, rank_zero_only=False)
        for task in self.zero_shot:
            labels = self._gathered(task.name)[valid]
            classes = task.classifier(self.model)  # (C, D), open_clip's prompt-ensemble classifier
            self.log(f"val/zero_shot/{task.name}", zero_shot_accuracy(img, classes, labels))
        self._val = {}

    # -- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():  # "clip." + the names open_clip_train's rule sees
            if p.requires_grad:
                (no_decay if no_weight_decay(name, p, self.decay_embeddings) else decay).append(p)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]  # the first: the optimizer's decay
        return configure(self, self.optimizer_fn.value, self.lr_scheduler_fn.value, groups)
