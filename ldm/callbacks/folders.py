"""Where the run's files and the image-logging callbacks' images go (``<run folder>``, ``<run folder>/images``),
found without a collective.

``trainer.log_dir`` broadcasts rank 0's answer to every rank, a collective: asked by rank 0 alone (the
callbacks draw and save images on rank 0 only) it waits forever for ranks that never ask, and a DDP run
hangs at its first image (the autoencoder's ReconstructionLogger after every validation, the SampleLogger at
its first interval and at the end of training; the config saved to W&B on rank 0 before the first step).
:func:`log_folder` applies the same rule locally; every rank computes the same path from its own loggers, so
nothing needs to be sent.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as L
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger


def log_folder(trainer: L.Trainer) -> Path:
    """``trainer.log_dir`` without its collective: the first logger's ``log_dir`` (CSV, TensorBoard) or
    ``save_dir``, else the trainer's root folder. Every rank computes the same path from its own loggers."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        folder = logger.log_dir
    else:
        folder = logger.save_dir if logger is not None else None
    return Path(folder or trainer.default_root_dir)


def images_folder(trainer: L.Trainer) -> Path:
    """``<log dir>/images`` (:func:`log_folder`)."""
    return log_folder(trainer) / "images"
