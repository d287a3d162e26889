"""Divergence guard: non-finite steps are skipped and counted; a run that keeps diverging stops loudly.

Before every optimizer step the guard reduces the losses seen since the last step and the gradient
norm to one flag, all-reduced (MAX) across ranks so that every rank takes the same decision with one
collective and one host sync per step (AMP's GradScaler pays the same). A flagged step is skipped:
the gradients are dropped (``p.grad = None``), so neither the weights nor the optimizer moments move.
After ``patience`` flagged training batches in a row the run raises :class:`DivergenceError` (``ldm fit``
exits with status 3), naming the step and the newest checkpoint written before it.

With a fused optimizer (``fused: true`` in its ``init_args``: torch's fused Adam / AdamW / SGD) and no GradScaler,
the guard takes no host sync at all (issue 19): the flag is handed to the optimizer as ``found_inf``, the mechanism
AMP's GradScaler uses, and the fused kernel skips the whole update on the device (weights, moments and step count
untouched, as ``p.grad = None`` does). The skipped and consecutive counts are kept on the device and read on
logging steps (``trainer.log_every_n_steps``), at checkpoints and at the end of training: the warning then names
the steps since the last reading, and a diverging run stops at the first reading after ``patience`` consecutive
skipped batches (its weights did not move in the meantime).

Checkpoints are guarded too: a checkpoint whose ``state_dict`` holds a non-finite value is refused on
every rank (the same weights everywhere under DDP), before Lightning writes it, so ``last.ckpt`` and
the best checkpoint only ever hold finite weights. Logs ``train/nonfinite_steps`` (skipped batches so
far) and ``train/grad_norm`` (the total 2-norm before clipping; ``train/grad_norm_<i>`` for the
``i``-th optimizer of a system with several).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pytorch_lightning as L
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """The run stopped because its loss or gradients stayed non-finite, or its weights became non-finite."""


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Total 2-norm of the gradients of ``params`` (0 when none has a gradient), without a host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([g.float() for g in torch._foreach_norm(grads)]))


def last_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest checkpoint file this run's ModelCheckpoints wrote, or None."""
    paths = []
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            paths += [cb.last_model_path, cb.best_model_path, getattr(cb, "_last_checkpoint_saved", "")]
    existing = [p for p in paths if p and os.path.isfile(p)]
    return max(existing, key=os.path.getmtime) if existing else None


def _resume_from(good: str | None) -> str:
    return f"the last good checkpoint is {good}" if good else "no checkpoint was written before it"


def first_nonfinite(state: dict[str, Any]) -> str | None:
    """The first key of a state dict whose tensor holds a NaN or an infinity, or None."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


class DivergenceGuard(Callback):
    """Skips optimizer steps with a non-finite loss or gradient; stops after ``patience`` in a row.

    Args:
        patience: consecutive training batches with a skipped step after which the run stops.
        check_weights: refuse to write a checkpoint whose weights are not finite.
    """

    def __init__(self, patience: int = 10, check_weights: bool = True):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.check_weights = check_weights
        self.skipped = 0  # training batches with at least one skipped step, over the whole run
        self.in_a_row = 0
        self._loss_bad: torch.Tensor | None = None  # any non-finite loss since the last optimizer step
        self._batch_bad = False
        # the fused optimizers' path: this batch's flag, and on the device the batches skipped since the last reading,
        # the current streak of skipped batches and the longest streak since the last reading
        self._batch_flag: torch.Tensor | None = None
        self._device_counts: torch.Tensor | None = None  # (3,): new skips, streak, worst streak
        self._flagged: list[torch.optim.Optimizer] = []
        self._since = 0  # the first step of the batches counted on the device since the last reading
        self._step = 0
        self._good: str | None = None  # the newest checkpoint written before the current streak

    # -- detection ------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step = trainer.global_step  # the step this batch trains (global_step moves on inside it)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = grad_norm(params)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # with a GradScaler, infinite gradients are part of its scale search: it skips those steps itself
        flag = torch.zeros((), device=norm.device) if scaler is not None else (~torch.isfinite(norm)).float()
        if self._loss_bad is not None:
            flag = torch.maximum(flag, self._loss_bad.to(flag.device).float())
        self._loss_bad = None
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer
                      or getattr(optimizer, "optimizer", None) is o), 0)
        pl_module.log("train/grad_norm" + (f"_{index}" if index else ""), norm.detach(), on_step=True,
                      on_epoch=False, batch_size=1)
        raw = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's torch optimizer
        if scaler is None and getattr(raw, "_step_supports_amp_scaling", False):
            device = params[0].device if params else norm.device
            raw.found_inf = flag.to(device)  # the fused kernel skips the update where it is 1: no host sync
            self._flagged.append(raw)
            self._batch_flag = flag if self._batch_flag is None else torch.maximum(self._batch_flag, flag)
            return
        if bool(flag.item()):  # the one host sync of the guard
            for p in params:
                p.grad = None  # optimizers skip parameters without a gradient: no update, no moment decay
            self._batch_bad = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._loss_bad = None
        for optimizer in self._flagged:
            del optimizer.found_inf  # set per step: a later step without the guard must not see it
        self._flagged = []
        if self._batch_flag is not None:
            self._count_on_device(trainer, pl_module)
            return
        if self._batch_bad:
            self._batch_bad = False
            if self.in_a_row == 0:  # checkpoints written from now on hold the weights of before the streak
                self._good = last_checkpoint(trainer)
            self.skipped += 1
            self.in_a_row += 1
            log.warning("step %d: non-finite loss or gradient, the optimizer step was skipped (%d in a row, %d in "
                        "this run)", self._step, self.in_a_row, self.skipped)
            if self.in_a_row >= self.patience:
                raise DivergenceError(self._stop_message(trainer))
        else:
            self.in_a_row = 0
        pl_module.log("train/nonfinite_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)

    # -- the fused optimizers' path: counted on the device, read on logging steps ---------------------
    def _count_on_device(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flag = self._batch_flag
        if self._batch_bad:  # another optimizer of the batch took the host path and skipped
            flag = torch.ones_like(flag)
        self._batch_flag, self._batch_bad = None, False
        if self._device_counts is None:
            self._device_counts = torch.tensor([0.0, self.in_a_row, self.in_a_row], device=flag.device)
            self._since = self._step
        counts = self._device_counts
        streak = (counts[1] + 1) * flag  # 0 after a good batch
        counts.copy_(torch.stack([counts[0] + flag, streak, torch.maximum(counts[2], streak)]))
        pl_module.log("train/nonfinite_steps", counts[0] + self.skipped, on_step=True, on_epoch=False, batch_size=1)
        if trainer._logger_connector.should_update_logs:
            self._settle(trainer)

    def _read_device_counts(self) -> int:
        """Fold the device-side counts into the host's (one host sync); returns the longest streak since the last
        reading."""
        if self._device_counts is None:
            return self.in_a_row
        new, streak, worst = (int(v) for v in self._device_counts.tolist())
        if new:
            self._good = None  # skipped steps leave the weights as they were: the newest checkpoint holds good ones
            log.warning("steps %d-%d: %d training steps had a non-finite loss or gradient; their optimizer steps were "
                        "skipped on the device (%d in a row at most, %d in this run)", self._since, self._step, new,
                        worst, self.skipped + new)
        self.skipped += new
        self.in_a_row = streak
        self._device_counts.copy_(torch.tensor([0.0, streak, streak]))
        self._since = self._step + 1
        return worst

    def _settle(self, trainer: L.Trainer) -> None:
        worst = self._read_device_counts()
        if worst >= self.patience:
            self.in_a_row = worst
            raise DivergenceError(self._stop_message(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._device_counts is not None:
            self._settle(trainer)

    def _stop_message(self, trainer: L.Trainer) -> str:
        good = self._good if self._good and os.path.isfile(self._good) else last_checkpoint(trainer)
        where = _resume_from(good)
        return (f"the run diverged: {self.in_a_row} training steps in a row had a non-finite loss or gradient "
                f"(steps {self._step - self.in_a_row + 1}-{self._step}, {self.skipped} skipped in all); {where}. Lower the learning "
                "rate, raise the warmup, or clip gradients (trainer.gradient_clip_val), and resume from it with "
                "--ckpt_path")

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not self.check_weights:
            return
        key = first_nonfinite(checkpoint.get("state_dict", {}))
        if key is not None:
            raise DivergenceError(f"refusing to write a checkpoint at step {trainer.global_step}: weight {key!r} is not "
                                  f"finite; {_resume_from(last_checkpoint(trainer))}")

    def state_dict(self) -> dict[str, Any]:
        self._read_device_counts()  # a checkpoint holds the counts so far
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.in_a_row = int(state_dict.get("in_a_row", 0))
        self._device_counts = None  # started again from these
