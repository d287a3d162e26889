"""Preemption that loses nothing: a checkpoint at the current step, taken at a step boundary, then requeue.

SLURM warns a job before it ends it: ``--signal=USR1@90`` (what ``ldm submit`` and
``slurm/fit.sbatch`` ask for) sends USR1 to every task 90 s before the time limit, and
``scancel -s USR1`` does the same by hand; ``scontrol requeue``, ``scancel`` and the time limit
itself send SIGTERM, then SIGKILL ``KillWait`` seconds later.

Lightning's own USR1 handler saves the checkpoint *inside the signal handler*: at whatever bytecode
the main thread was running (in the middle of an optimizer step, or of a collective on another
rank, where the save's own barrier and our loader-state gather then mismatch). Here the handlers
only set a flag. At the end of the current training batch the ranks agree on it (one all-reduce
of one number, MAX) and then, together:

- every rank takes part in saving ``hpc_ckpt_<n>.ckpt`` in the run folder (Lightning's name, written
  atomically by :class:`ldm.checkpoints.AtomicCheckpointIO`; older ``hpc_ckpt`` files are removed);
- the loggers are flushed (``metrics.csv`` holds every step up to the checkpoint) and the W&B run is
  marked as preempting;
- on USR1 under SLURM, rank 0 runs ``scontrol requeue <job>``; SLURM then ends the job and starts it
  again in the same run folder, where ``ldm fit`` resumes from the newest complete checkpoint
  (:func:`ldm.checkpoints.newest_checkpoint`);
- training stops before anything else runs (:class:`Preempted`, a ``SystemExit``: status 0 after a
  requeue, 143 after SIGTERM), once the batch's own metrics are logged. A validation that was due
  after this batch is skipped, and a run resumed from the checkpoint skips it too (Lightning does not
  repeat a validation that followed a checkpoint taken at a batch end): a preemption costs at most
  that one validation, never a training step.

On SIGTERM the checkpoint is taken the same way but nothing is requeued (SLURM, or whoever sent it,
decides what happens to the job). SLURM signals every process of the step: the DataLoader workers
ignore both signals (:class:`ldm.data.datamodule.PreemptionSafeLoader`), so they keep serving until
the checkpoint is written. A job killed without a signal (node failure) loses the steps since the
newest checkpoint: ``run.checkpoint_minutes`` bounds them.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as L
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback

from ldm.runs import slurm_job_id

log = logging.getLogger(__name__)

#: flag values, reduced with MAX across ranks: requeue wins over a plain stop
_NONE, _STOP, _REQUEUE = 0, 1, 2


class Preempted(SystemExit):
    """Training stopped after a preemption checkpoint; the process exits with ``code`` (0 requeued, 143 SIGTERM)."""


class Preemption(Callback):
    """Checkpoint at the current step and requeue on SLURM's warning signal; checkpoint on SIGTERM.

    On by default in ``ldm fit`` (it replaces Lightning's SLURM handler while training runs).

    Args:
        requeue_signal: the signal SLURM sends before the end (``--signal=<name>@<seconds>``).
        requeue: run ``scontrol requeue`` after the checkpoint when the job runs under SLURM.
        checkpoint_on_sigterm: also checkpoint (without requeue) on SIGTERM.
    """

    def __init__(self, requeue_signal: str = "SIGUSR1", requeue: bool = True, checkpoint_on_sigterm: bool = True):
        self.signum = signal.Signals[requeue_signal if requeue_signal.startswith("SIG") else f"SIG{requeue_signal}"]
        self.requeue = requeue
        self.checkpoint_on_sigterm = checkpoint_on_sigterm
        self.requested = _NONE
        self.received: str | None = None
        self._stop: Preempted | None = None  # raised at the next hook once the batch's metrics are logged
        self._previous: dict[int, Any] = {}

    # -- signals ------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        """Signal handler: only sets the flag (the checkpoint is taken at the end of the current step)."""
        requeue = signum == self.signum and self.requeue and slurm_job_id() is not None
        self.requested = max(self.requested, _REQUEUE if requeue else _STOP)
        self.received = signal.Signals(signum).name

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its handlers just before training starts; ours replace its USR1 handler and its
        # SIGTERM notifier (which broadcasts from inside the handler); the loop stops through should_stop
        if threading.current_thread() is not threading.main_thread():
            log.warning("training runs outside the main thread: no preemption handling")
            return
        signals = [self.signum] + ([signal.SIGTERM] if self.checkpoint_on_sigterm else [])
        for signum in signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                if signal.getsignal(signum) == self._on_signal:
                    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    # -- at the step boundary ---------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        flag = self.requested
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            reduced = torch.tensor([flag], device=device)
            dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
            flag = int(reduced.item())
        if flag != _NONE:
            self._preempt(trainer, requeue=flag == _REQUEUE)

    def _preempt(self, trainer: L.Trainer, requeue: bool) -> None:
        self.requested = _NONE
        folder = Path(trainer.default_root_dir)
        path = trainer._checkpoint_connector.hpc_save_path(str(folder))
        log.warning("%s received: saving %s at step %d%s", self.received or "a preemption signal", path,
                    trainer.global_step, " and requeueing the job" if requeue else "")
        trainer.save_checkpoint(path, weights_only=False)  # every rank takes part; rank 0 writes
        for logger in trainer.loggers:
            logger.save()
        if trainer.is_global_zero:
            _remove_older_hpc_checkpoints(folder, keep=Path(path))
            _mark_wandb_preempting(trainer)
            if requeue:
                _requeue(slurm_job_id())
        if requeue:
            self._stop = Preempted(0)
        else:
            log.warning("stopped by %s at step %d; checkpoint %s (a SLURM job resumes from it when requeued; "
                        "otherwise resume with --ckpt_path newest)", self.received or "a signal",
                        trainer.global_step, path)
            self._stop = Preempted(143)

    # the first hook after the batch's metrics are logged: stop there (not via should_stop, which makes
    # Lightning run a validation first)
    def _stop_now(self) -> None:
        if self._stop is not None:
            stop, self._stop = self._stop, None
            raise stop

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._stop_now()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training or trainer.state.fn == "fit":
            self._stop_now()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_now()  # before the epoch-end checkpoints (Lightning runs ModelCheckpoint last)


def _remove_older_hpc_checkpoints(folder: Path, keep: Path) -> None:
    for old in folder.glob("hpc_ckpt_*.ckpt"):
        if old.resolve() != keep.resolve() and re.fullmatch(r"hpc_ckpt_\d+\.ckpt", old.name):
            old.unlink(missing_ok=True)


def _mark_wandb_preempting(trainer: L.Trainer) -> None:
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            mark = getattr(logger._experiment, "mark_preempting", None)
            if callable(mark):
                try:
                    mark()
                except Exception as e:  # never lose the requeue over a dashboard flag
                    log.warning("could not mark the W&B run as preempting: %s", e)


def _requeue(job: str | None) -> None:
    if not job or not re.fullmatch(r"[0-9_]+", job):
        log.warning("not requeueing: no SLURM job id in the environment")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("could not requeue SLURM job %s (%s): resume it by resubmitting the same command", job, e)
        return
    if result.returncode == 0:
        log.warning("requeued SLURM job %s: it resumes from the checkpoint just written", job)
    else:
        log.error("scontrol requeue %s failed (exit %d): %s", job, result.returncode, result.stderr.strip())
