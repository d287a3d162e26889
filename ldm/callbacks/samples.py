"""Logs samples for a fixed prompt list during training: a captioned grid to W&B and as PNG.

Every ``every_n_steps`` optimizer steps and at the end of training, rank 0 samples one image
per (prompt, repeat) with a fixed seed and fixed sampler settings, so successive grids
differ only by the weights. When ldm's EMA callback (``ldm.callbacks.EMA`` / ``EMAWarmup``)
is present the EMA weights are used (:func:`~ldm.callbacks.ema.averaged_module`); otherwise
the live weights. Grids go to ``<run folder>/images/samples-step<N>.png`` and to W&B
under ``images/samples`` (the image keys: docs/runs.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as L
import torch
from pytorch_lightning.loggers import WandbLogger

from ldm.callbacks.ema import averaged_module
from ldm.callbacks.folders import images_folder
from ldm.data.preview import caption_grid
from ldm.data.transforms import to_pil
from ldm.pipelines.text_to_image import SamplerSettings, TextToImage


@contextmanager
def averaged_for_inference(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[L.LightningModule]:
    """:func:`averaged_module` in eval mode for the block, then back to the mode it was in."""
    module = averaged_module(trainer, pl_module)
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class SampleLogger(L.Callback):
    """Args:
        prompts: the fixed prompt list.
        every_n_steps: sampling interval in optimizer steps (0 = only at the end).
        n_per_prompt: images per prompt (seeds seed, seed+1, ...).
        sampler, steps, cfg, seed: sampler settings (see :class:`~ldm.pipelines.SamplerSettings`).
        image_size: output size in pixels (default: the size of the training images).
        cell: pixel size of one image in the grid.
    """

    def __init__(self, prompts: list[str], every_n_steps: int = 1000, n_per_prompt: int = 1,
                 sampler: str = "dpmpp_2m", steps: int = 20, cfg: float = 5.0, seed: int = 0,
                 image_size: int | None = None, cell: int = 96):
        if not prompts:
            raise ValueError("SampleLogger needs at least one prompt")
        self.prompts = [p for p in prompts for _ in range(n_per_prompt)]
        self.settings = SamplerSettings(sampler=sampler, steps=steps, cfg=cfg, seed=seed)
        self.every_n_steps, self.image_size, self.cell = every_n_steps, image_size, cell
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.image_size is None:
            if "image" in batch:
                self.image_size = batch["image"].shape[-1]
            elif "latent" in batch:
                self.image_size = batch["latent"].shape[-1] * pl_module.first_stage.downsample_factor
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.log_samples(trainer, pl_module)

    @torch.no_grad()
    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        if not trainer.is_global_zero or trainer.global_step == self._last_step or self.image_size is None:
            return None
        self._last_step = trainer.global_step
        with averaged_for_inference(trainer, pl_module) as module:
            images = TextToImage(module)(self.prompts, self.settings, image_size=self.image_size, progress=False)
        grid = caption_grid(list(zip(to_pil(images), self.prompts)), cell=self.cell)
        folder = images_folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"samples-step{trainer.global_step:07d}.png"
        grid.save(path)
        s = self.settings
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="images/samples", images=[grid], step=trainer.global_step,
                                 caption=[f"{s.sampler}, {s.steps} steps, cfg {s.cfg}, seed {s.seed}"])
        return path
