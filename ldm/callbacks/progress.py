"""The progress bar of ``ldm fit``: Lightning's TQDM bar, moving every step, its metrics read at logging steps only.

Lightning's bar shows the ``prog_bar`` metrics (the loss) after every batch, and reading them converts each tensor
with ``.item()``: one host synchronisation per step, after which the host cannot queue the next step's kernels
while the GPU runs this one. This bar advances its counter every ``refresh_rate`` batches (host-side, free) and
reads the metrics when Lightning logs them anyway (every ``trainer.log_every_n_steps``) and at the end of an epoch,
so between logging steps the loss shown is the last logged one.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as L
from pytorch_lightning.callbacks import TQDMProgressBar


class LoggingStepProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` (same arguments) whose metrics are read on logging steps only."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        n = batch_idx + 1
        bar = self._train_progress_bar
        if bar is None or not self._should_update(n, bar.total):
            return
        if not bar.disable:
            bar.n = n
            bar.refresh()
        if trainer._logger_connector.should_update_logs or n == bar.total:
            bar.set_postfix(self.get_metrics(trainer, pl_module))
