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

No host sync between logging steps (issue 19). Lightning's monitor calls ``torch.cuda.synchronize()`` after every
batch so that its clock reads when the GPU finished; the host then waits for the GPU at every step and cannot queue
the next step while it runs. This one counts batches and samples on the host at every batch, and synchronises and
reads the clock only on the steps that log (``trainer.log_every_n_steps``; and once before validation, so the time
validation takes is not charged to training): the rate is the same average, over ``window_size`` logging steps
instead of ``window_size`` batches.
"""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as L
import torch
from pytorch_lightning.callbacks import ThroughputMonitor
from pytorch_lightning.trainer.states import RunningStage


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
    """``ThroughputMonitor`` counting the samples of our dict batches (:func:`batch_size`), timing on logging steps.

    Args:
        window_size: logging steps the rates are averaged over (2: over the last ``log_every_n_steps`` batches; the
            first rates are logged at the second logging step).
        **kwargs: the other arguments of ``lightning.fabric.utilities.throughput.Throughput``.
    """

    def __init__(self, window_size: int = 2, **kwargs: Any):
        super().__init__(batch_size_fn=batch_size, window_size=window_size, **kwargs)
        self._pending: dict[RunningStage, tuple[int, int]] = {}  # (batches, samples) since the last clock reading

    def _start(self, trainer: L.Trainer) -> None:
        super()._start(trainer)
        self._pending[trainer.state.stage] = (0, 0)

    @torch.inference_mode()
    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, iter_num: int) -> None:
        """Count the batch on the host; on a logging step, synchronise once and record the clock."""
        stage = trainer.state.stage
        batches, samples = self._pending.get(stage, (0, 0))
        self._pending[stage] = (batches + 1, samples + self.batch_size_fn(batch))
        if trainer._logger_connector.should_update_logs:
            self._record(trainer, pl_module, stage)

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: RunningStage) -> None:
        batches, samples = self._pending.get(stage, (0, 0))
        if not batches:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the clock reads when the GPU has finished the batches counted
        elapsed = time.perf_counter() - self._t0s[stage]
        if self._module_has_flops is None:
            self._module_has_flops = hasattr(pl_module, "flops_per_batch")
        flops = pl_module.flops_per_batch * batches if self._module_has_flops else None  # since the last update
        self._batches[stage] += batches
        self._samples[stage] += samples
        self._pending[stage] = (0, 0)
        self._throughputs[stage].update(time=elapsed, batches=self._batches[stage], samples=self._samples[stage],
                                        flops=flops)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit" and RunningStage.TRAINING in self._t0s:
            # the training clock stops here: Lightning's monitor shifts it by the validation time from its last reading
            self._record(trainer, pl_module, RunningStage.TRAINING)
        super().on_validation_start(trainer, pl_module)

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
