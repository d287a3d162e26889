"""``metrics.csv`` holds every step once, however often a run is resumed into its folder.

A run resumed from a checkpoint trains again the steps that followed it (a SLURM requeue after a
hard kill, ``--ckpt_path`` of an older checkpoint), and the CSV logger appends: without care the file
would hold those steps twice, or three times. Each checkpoint records how many rows ``metrics.csv``
held when it was written (the logger is flushed first); a run resumed from it into the same folder
drops the rows written after that belong to its step or later, before it logs anything. (A checkpoint
written at the end of a batch precedes the row of that batch's own step, which the resumed run does
not log again: rows written after it with an earlier step stay.)
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as L
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger

log = logging.getLogger(__name__)

KEY = "ldm_metrics_rows"


def _csv_logger(trainer: L.Trainer) -> CSVLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)


def _metrics_file(logger: CSVLogger) -> Path:
    return Path(logger.log_dir) / "metrics.csv"


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return (rows[0], rows[1:]) if rows else ([], [])


class MetricsFileLedger(Callback):
    """Records the row count of ``metrics.csv`` in every checkpoint; a resume drops the rows after it.

    On by default in ``ldm fit``.
    """

    def __init__(self) -> None:
        self._resumed: tuple[int, int] | None = None  # (rows, global step) of the checkpoint resumed from

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        logger = _csv_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        logger.save()  # the rows logged so far are in the file
        path = _metrics_file(logger)
        checkpoint[KEY] = len(_read(path)[1]) if path.is_file() else 0

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        rows, step = checkpoint.get(KEY), checkpoint.get("global_step")
        self._resumed = (rows, step) if isinstance(rows, int) and isinstance(step, int) else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        resumed, self._resumed = self._resumed, None
        logger = _csv_logger(trainer)
        if resumed is None or logger is None or not trainer.is_global_zero:
            return
        path = _metrics_file(logger)
        if not path.is_file():
            return
        rows, step = resumed
        header, body = _read(path)
        if len(body) <= rows or "step" not in header:  # another folder, or nothing was logged after it
            return
        column = header.index("step")
        later = [r for r in body[rows:] if len(r) > column and r[column].isdigit() and int(r[column]) < step]
        kept = body[:rows] + later
        if len(kept) == len(body):
            return
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(kept)
        os.replace(tmp, path)
        log.info("metrics.csv: dropped %d rows logged after the checkpoint this run resumes from (step %d): they "
                 "are trained and logged again", len(body) - len(kept), step)
