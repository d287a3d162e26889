"""Checkpoints in ``ldm fit``: Lightning's checkpoint IO, written atomically and read with ``weights_only``.

The file-level functions (atomic writes, completeness checks, safe loading, finding a run's newest
checkpoint) are in :mod:`ldm.checkpoint_files`, which needs no Lightning; they are re-exported here.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pytorch_lightning as L
from lightning_fabric.plugins import TorchCheckpointIO
from lightning_fabric.utilities.types import _PATH

from ldm.checkpoint_files import (  # noqa: F401  (the public API of checkpoint files, re-exported)
    SAFE_GLOBALS,
    TEMP_INFIX,
    CheckpointError,
    _safe_load,
    atomic_save,
    checkpoint_problem,
    checkpoint_step,
    find_checkpoint,
    find_config,
    is_temp_file,
    load_checkpoint_file,
    newest_checkpoint,
    remove_stale_temp_files,
    temp_path,
)

log = logging.getLogger(__name__)


def _is_local(path: _PATH) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local writes and allow-listed (``weights_only``) reads.

    The default trainer plugin of ``ldm fit`` (``trainer.plugins``). Remote paths (``s3://`` ...) keep
    Lightning's fsspec upload, which is atomic on object stores.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"`Trainer.save_checkpoint(..., storage_options=...)` is not supported by "
                            f"{type(self).__name__}")
        atomic_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(self, path: _PATH, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Loads with ``weights_only=True`` and :data:`SAFE_GLOBALS`; an explicit ``weights_only=False``
        (``ldm fit --weights_only=false``) is honoured, with a warning, for files the user vouches for."""
        if weights_only is False:
            log.warning("loading %s with weights_only=False: unpickling it may run code from the file", path)
            return super().load_checkpoint(path, map_location=map_location, weights_only=False)
        if not _is_local(path):
            from lightning_fabric.utilities.cloud_io import get_filesystem

            with get_filesystem(path).open(path, "rb") as f:
                return _safe_load(f, path, map_location)
        local = str(path).removeprefix("file://")
        if not os.path.exists(local):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_checkpoint_file(local, map_location=map_location)


class AtomicCheckpointGuard(L.Callback):
    """Keeps :class:`AtomicCheckpointIO` when a config's ``trainer.plugins`` list replaces the default one.

    Why a callback: LightningCLI merges the default ``trainer.callbacks`` with a config's, but a config's
    ``trainer.plugins`` (a cluster environment, a layer sync) replaces the default plugins, silently bringing
    back Lightning's non-atomic ``TorchCheckpointIO``. ``setup`` runs before any checkpoint is read or written.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        if isinstance(io, AtomicCheckpointIO):
            return
        if type(io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
            log.info("trainer.plugins has no checkpoint IO: using ldm.checkpoints.AtomicCheckpointIO")
        else:
            log.warning("checkpoints are written by %s, not atomically by ldm.checkpoints.AtomicCheckpointIO "
                        "(trainer.plugins): a kill during a save may leave a partial checkpoint", type(io).__name__)
