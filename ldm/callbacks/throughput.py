"""Samples per second (and MFU where known) of every run: Lightning's ``ThroughputMonitor`` for our dict batches.

Logged every ``log_every_n_steps`` once ``window_size`` batches have been seen: ``train/device/samples_per_sec``
and ``train/device/batches_per_sec`` per device (and ``train/samples_per_sec``, ``train/batches_per_sec`` over all
devices when there are several), the same under ``validate/`` during fitting.
FLOPs and MFU (``train/device/flops_per_sec``, ``train/device/mfu``): Lightning's monitor reads a
``flops_per_batch`` attribute of the system and the device's peak FLOP/s (known for CUDA GPUs and TPUs, not for
CPUs). Where the peak is known and the system can count its training FLOPs per sample (``flops_per_sample(batch)``:
:class:`~ldm.systems.LatentDiffusion` counts its network's forward once with torch's ``FlopCounterMode`` and takes 3x
for forward + backward, the usual MFU convention), this callback sets ``flops_per_batch`` at the first training
batch; elsewhere it logs throughput only and is quiet about the missing FLOPs.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as L
import torch
from pytorch_lightning.callbacks import ThroughputMonitor


def batch_size(batch: Any) -> int:
    """The number of samples of a batch: the length of its first tensor (or list) value; dict batches first."""
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    for value in values:
        if isinstance(value, (list, tuple)):
            return len(value)
    raise ValueError("cannot tell the batch size of a batch without tensors or lists")


class SampleThroughput(ThroughputMonitor):
    """``ThroughputMonitor`` counting the samples of our dict batches (:func:`batch_size`).

    Args:
        window_size: batches averaged over (Lightning's default is 100; a short debug run would log nothing).
        **kwargs: the other arguments of ``lightning.fabric.utilities.throughput.Throughput``.
    """

    def __init__(self, window_size: int = 10, **kwargs: Any):
        super().__init__(batch_size_fn=batch_size, window_size=window_size, **kwargs)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # FLOPs only where the system declares them: no warning at every run of a system that does not
        self._module_has_flops = hasattr(pl_module, "flops_per_batch")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Count the system's FLOPs per batch once, where MFU can be computed (a known peak) and the system can."""
        if self._module_has_flops or not self.available_flops or not hasattr(pl_module, "flops_per_sample"):
            return
        pl_module.flops_per_batch = pl_module.flops_per_sample(batch) * batch_size(batch)
        self._module_has_flops = True
