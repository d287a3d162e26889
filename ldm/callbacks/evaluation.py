"""Periodic generation evaluation during training: FID / KID / IS, CLIP score, FD-CLIP, compositional.

Every ``every_n_steps`` optimizer steps and at the end of training, every rank generates its
block of ``n`` validation captions (the first ``n`` samples of the data module's validation
pattern) with fixed sampler settings and seed, from the EMA weights when an
``EMAWeightAveraging`` callback is present; the metrics are gathered exactly over the ranks
(:class:`~ldm.pipelines.evaluate.GenerationEvaluator`) and rank 0 logs them as ``eval/<name>``
to every logger (CSV and W&B), with a captioned grid of its first images (``eval/samples``,
also ``<run>/images/eval-step<N>.png``) and a W&B table of (prompt, image, CLIP score,
compositional verdict).
"""

from __future__ import annotations

import pytorch_lightning as L
import torch
from pytorch_lightning.loggers import WandbLogger

from ldm.callbacks.folders import images_folder
from ldm.callbacks.samples import averaged_for_inference
from ldm.data.preview import caption_grid
from ldm.data.transforms import to_pil
from ldm.pipelines.evaluate import EvalSet, GenerationEvaluator, load_eval_set
from ldm.pipelines.text_to_image import SamplerSettings, TextToImage


class GenerationEvalCallback(L.Callback):
    """Args:
        every_n_steps: evaluation interval in optimizer steps (0 = only at the end of training).
        n: validation captions (= generated images) per evaluation.
        sampler, steps, cfg, seed: sampler settings.
        inception_weights: torch-fidelity Inception weights file or ``download``; None = no FID / KID / IS.
        clip_checkpoint: a contrastive run scoring CLIP score / FD-CLIP (default: the model's own text
            encoder CLIP; ``none`` = off).
        data: validation shard pattern (default: the data module's ``val``).
        image_size: default: the data module's ``image_size``.
        batch_size: images per generation batch.
        grid: images in the logged grid / table.
    """

    def __init__(self, every_n_steps: int = 5000, n: int = 1000, sampler: str = "dpmpp_2m", steps: int = 20,
                 cfg: float = 3.0, seed: int = 0, inception_weights: str | None = None,
                 clip_checkpoint: str | None = None, data: str | None = None, image_size: int | None = None,
                 batch_size: int = 32, grid: int = 16):
        self.every_n_steps, self.n, self.data, self.image_size = every_n_steps, n, data, image_size
        self.settings = SamplerSettings(sampler=sampler, steps=steps, cfg=cfg, seed=seed)
        self.inception_weights, self.clip_checkpoint = inception_weights, clip_checkpoint
        self.batch_size, self.grid = batch_size, grid
        self._evaluator: GenerationEvaluator | None = None
        self._evalset: EvalSet | None = None
        self._last_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        dm = trainer.datamodule
        if self.data is None and dm is not None and not getattr(dm, "decode_images", True):
            raise ValueError("the data module reads precomputed latents; give GenerationEvalCallback the image "
                             "shards to compare with (its data argument)")
        val = getattr(dm, "val_pattern", None) if dm is not None else None
        data = self.data or (str(val) if val else None)
        size = self.image_size or getattr(dm, "image_size", None)
        if not data or not size:
            raise ValueError("GenerationEvalCallback needs validation shards and an image size: set its data and "
                             "image_size, or the data module's val and image_size")
        self._evalset = load_eval_set(data, self.n, size)
        clip, clip_id = None, None
        if self.clip_checkpoint and self.clip_checkpoint.lower() != "none":
            from ldm.systems import load_system

            clip, clip_id = load_system(self.clip_checkpoint).model, self.clip_checkpoint
        elif self.clip_checkpoint is None and getattr(pl_module.conditioner.text_encoder, "has_image_tower", False):
            clip = pl_module.conditioner.text_encoder.model  # (a text tower alone cannot score images)
        self._evaluator = GenerationEvaluator(self.inception_weights, clip, clip_id, batch_size=self.batch_size,
                                              device=pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float] | None:
        if self._evaluator is None or trainer.global_step == self._last_step:
            return None
        self._last_step = trainer.global_step
        with averaged_for_inference(trainer, pl_module) as module:
            result = self._evaluator.evaluate(TextToImage(module, batch_size=self.batch_size), self._evalset,
                                              self.settings, rank=trainer.global_rank, world=trainer.world_size,
                                              progress=False)
        metrics = {f"eval/{k}": v for k, v in result.metrics.items()}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            self._log_images(trainer, result)
        return metrics

    def _log_images(self, trainer, result) -> None:
        k = min(self.grid, len(result.images))
        if k == 0:
            return
        evalset = self._evalset
        pil = to_pil(result.images[:k])
        grid = caption_grid(list(zip(pil, result.labels(evalset, k), strict=True)), cell=96, caption_lines=5)
        folder = images_folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"eval-step{trainer.global_step:07d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.log_image(key="eval/samples", images=[grid], step=trainer.global_step)
                rows = [[evalset.captions[result.indices[i]], wandb.Image(pil[i]),
                         result.clip_scores[i] if result.clip_scores else None,
                         result.verdicts[i].summary() if result.verdicts else None] for i in range(k)]
                logger.log_table(key="eval/table", columns=["prompt", "image", "clip_score", "compositional"],
                                 data=rows, step=trainer.global_step)
