"""Logs input-vs-reconstruction grids of an autoencoder: to W&B (``log_image``) and as PNG files.

Every ``every_n_steps`` training batches (and after each validation) it reconstructs a fixed
set of validation images (the first ``n`` of the first validation batch) and writes a
two-row grid (inputs on top, reconstructions below) to
``<run folder>/images/reconstructions-step<N>.png`` and to W&B under ``images/reconstructions`` (the image keys:
docs/runs.md).
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as L
import torch
from pytorch_lightning.loggers import WandbLogger
from torchvision.utils import make_grid, save_image

from ldm.callbacks.folders import images_folder


class ReconstructionLogger(L.Callback):
    def __init__(self, every_n_steps: int = 500, n: int = 8):
        self.every_n_steps, self.n = every_n_steps, n
        self._images: torch.Tensor | None = None
        self._last_step = -1

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._images is None and batch_idx == 0:
            self._images = batch["image"][: self.n].detach().cpu()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.log_grid(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.log_grid(trainer, pl_module, fallback=batch["image"][: self.n])

    @torch.no_grad()
    def log_grid(self, trainer, pl_module, fallback: torch.Tensor | None = None) -> Path | None:
        images = self._images if self._images is not None else fallback
        if images is None or not trainer.is_global_zero or trainer.global_step == self._last_step:
            return None
        self._last_step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        x = images.to(pl_module.device)
        recon = pl_module.autoencoder(x)[0].clamp(-1, 1)
        pl_module.train(was_training)
        grid = make_grid(torch.cat([x, recon]).add(1).div(2).cpu(), nrow=len(x), padding=2)  # (3, H', W')
        folder = images_folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"reconstructions-step{trainer.global_step:07d}.png"
        save_image(grid, path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="images/reconstructions", images=[grid], step=trainer.global_step,
                                 caption=["top: input, bottom: reconstruction"])
        return path
