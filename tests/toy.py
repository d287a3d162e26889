"""A small LightningModule that lives in the tests: it exercises the CLI, the data module and DDP.

It regresses each image's mean colour with a tiny conv net (a loss that goes down),
provides a character tokenizer to the data module (linked by the CLI), and, when
``record`` is set, writes per rank and epoch which batches and sample keys it saw.
"""

from __future__ import annotations

import time

import json
import os
from pathlib import Path

import pytorch_lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from tests.toy_tokenizer import CharTokenizer


class ToySystem(L.LightningModule):
    def __init__(self, channels: int = 8, lr: float = 0.01, token_length: int = 32, record: str | None = None,
                 nan_loss_steps: list[int] | None = None, nan_loss_from: int | None = None,
                 nan_weights_at: int | None = None, step_seconds: float = 0.0):
        """``nan_loss_steps`` / ``nan_loss_from``: steps whose loss is NaN (divergence tests);
        ``nan_weights_at``: the step after which a weight is set to NaN behind the optimizer's back;
        ``step_seconds``: a pause in every training step (to signal a run in the middle of its training)."""
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3)
        )
        self.tokenizer = CharTokenizer(token_length)
        self.lr = lr
        self.record = record
        self._seen: dict[str, list] = {"train": [], "val": []}
        self.nan_loss_steps, self.nan_loss_from = set(nan_loss_steps or []), nan_loss_from
        self.nan_weights_at = nan_weights_at
        self.step_seconds = step_seconds

    def _loss(self, batch) -> torch.Tensor:
        target = batch["image"].mean(dim=(2, 3))  # (B, 3)
        return F.mse_loss(self.net(batch["image"]), target, reduction="none").mean(dim=1)  # (B,)

    def training_step(self, batch, batch_idx):
        assert batch["tokens"].shape == (len(batch["text"]), self.tokenizer.length)
        loss = self._loss(batch).mean()
        step = self.global_step
        if step in self.nan_loss_steps or (self.nan_loss_from is not None and step >= self.nan_loss_from):
            loss = loss * float("nan")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["text"]))
        self._seen["train"].append(list(batch["key"]))
        if self.step_seconds:
            time.sleep(self.step_seconds)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.nan_weights_at is not None and self.global_step == self.nan_weights_at:
            with torch.no_grad():
                self.net[-1].bias.fill_(float("nan"))

    def validation_step(self, batch, batch_idx):
        valid = batch.get("valid", torch.ones(len(batch["key"]), dtype=torch.bool))
        losses = self._loss(batch)[valid]
        if len(losses):
            self.log("val/loss", losses.mean(), batch_size=len(losses), sync_dist=True)
        self._seen["val"].append([k for k, v in zip(batch["key"], valid.tolist()) if v])

    def _dump(self, split: str) -> None:
        if self.record and not self.trainer.sanity_checking:
            path = Path(self.record) / f"{split}-rank{self.global_rank}-epoch{self.current_epoch}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"rank": self.global_rank, "world_size": self.trainer.world_size,
                                        "pid": os.getpid(), "batches": self._seen[split]}))
        self._seen[split] = []

    def on_train_epoch_end(self) -> None:
        self._dump("train")

    def on_validation_epoch_end(self) -> None:
        self._dump("val")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)
