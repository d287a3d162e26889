"""Logs how many bad samples the data module skipped, as metrics (``data/skipped_<split>``)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as L


class DataSkipMonitor(L.Callback):
    """Reads the data module's skip counters and logs them, summed over ranks.

    Works with any data module that exposes ``skips: dict[str, obj with .count]``
    (as :class:`ldm.data.ShardDataModule` does); does nothing otherwise.
    """

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str, **kw: Any) -> None:
        skips = getattr(trainer.datamodule, "skips", None) if trainer.datamodule is not None else None
        if not skips or split not in skips:
            return
        pl_module.log(f"data/skipped_{split}", float(skips[split].count), reduce_fx="sum", sync_dist=True,
                      batch_size=1, **kw)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0:
            self._log(trainer, pl_module, "train", on_step=True, on_epoch=False)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val", on_step=False, on_epoch=True)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module, "test", on_step=False, on_epoch=True)
