"""The optimizer convention of every system: an optimizer callable, an LR-scheduler callable, stepped per step.

Every system takes ``optimizer: OptimizerCallable`` and ``lr_scheduler: LRSchedulerCallable``
(Lightning's types, ``pytorch_lightning.cli``): functions of the parameters (or parameter groups) and of
the optimizer that jsonargparse builds from a ``class_path`` + ``init_args`` in the config, any
``torch.optim`` optimizer and any ``torch.optim.lr_scheduler`` scheduler::

    optimizer:
      class_path: torch.optim.AdamW
      init_args: {lr: 1.0e-4, weight_decay: 0.01}
    lr_scheduler:
      class_path: ldm.systems.optim.WarmupCosine        # or torch.optim.lr_scheduler.CosineAnnealingLR, ...
      init_args: {warmup_steps: 1000}

The scheduler is stepped after every optimizer step (Lightning's ``"interval": "step"``; the manually
optimised autoencoder steps each optimizer's own scheduler with it). The two schedules the systems use are
torch's own schedulers, composed: :class:`LinearWarmup` (``LinearLR``: a linear ramp, then constant) and
:class:`WarmupCosine` (``SequentialLR`` of that ramp and ``CosineAnnealingLR``), whose ``total_steps``
defaults to the run's length, which the system fills in from the trainer (:func:`build_scheduler`). A
scheduler's state is in every checkpoint (Lightning saves ``state_dict()``), so a resumed run continues
the same curve.

Fused optimizers: ``fused: true`` in an Adam / AdamW / SGD ``init_args`` updates all parameters with one fused
kernel per step (on CUDA and, in torch 2.14, on the CPU too) instead of a dozen ``foreach`` launches; with it the
divergence guard skips non-finite steps on the device, without a host sync (:mod:`ldm.callbacks.divergence`).
Where the fused kernel cannot update a parameter (a device without one, a complex parameter), torch would fail at
the first step; :func:`build_optimizer` falls back to the unfused implementation at once and says so in the log.

Defaults are the systems' published numbers, written where jsonargparse can read them back as a
``class_path`` + ``init_args`` (``--print_config`` shows them, ``--model.init_args.optimizer.init_args.lr``
overrides them): a ``lambda`` that calls the class with scalar keywords. jsonargparse reads only scalar
keywords from a lambda, so a default with a tuple (Adam's ``betas``) is a named function instead, shown by
its import path. (A lambda does not pickle: a system built in Python on a lambda default cannot go through
``ddp_spawn``; ``ldm fit`` builds its callables from the config, and those pickle.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import pytorch_lightning as L
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable, ReduceLROnPlateau
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

log = logging.getLogger(__name__)


class Shared:
    """A value that deep copies of a module share. The EMA callback deep-copies the whole system, and the
    optimizer and scheduler callables jsonargparse builds hold references (to the data module's counters) that
    cannot be copied."""

    def __init__(self, value):
        self.value = value

    def __deepcopy__(self, memo):
        return self


class LinearWarmup(LinearLR):
    """``lr x min(1, (step + 1) / warmup_steps)``: a linear ramp over ``warmup_steps`` optimizer steps, then
    constant (``warmup_steps=0``: constant). torch's ``LinearLR`` from ``1 / warmup_steps`` to 1 over
    ``warmup_steps - 1`` steps, so the first step already trains at ``lr / warmup_steps``."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, start_factor=1.0 / max(1, warmup_steps), end_factor=1.0,
                         total_iters=max(0, warmup_steps - 1))


class WarmupCosine(SequentialLR):
    """:class:`LinearWarmup` over ``warmup_steps``, then cosine annealing (torch's ``CosineAnnealingLR``) from
    ``lr`` to ``eta_min`` at ``total_steps``, then ``eta_min`` (where torch's cosine would rise again):
    ``eta_min + (lr - eta_min) (1 + cos(pi min(1, (step - warmup_steps) / max(1, total_steps - warmup_steps)))) / 2``,
    open_clip_train's ``cosine_lr`` schedule.

    Args:
        warmup_steps: optimizer steps of the linear warmup.
        total_steps: optimizer steps of the whole run; ``None``: the trainer's ``estimated_stepping_batches``,
            which the system fills in (:func:`build_scheduler`) before the first step.
        eta_min: the final learning rate (of every parameter group), as ``CosineAnnealingLR``'s.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, total_steps: int | None = None,
                 eta_min: float = 0.0):
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 (or None: the trainer's), got {total_steps}")
        self.warmup_steps, self.total_steps, self.eta_min = warmup_steps, total_steps, eta_min
        cosine = CosineAnnealingLR(optimizer, T_max=self._cosine_steps(), eta_min=eta_min)
        if warmup_steps:
            super().__init__(optimizer, [LinearWarmup(optimizer, warmup_steps), cosine], milestones=[warmup_steps])
        else:
            super().__init__(optimizer, [cosine], milestones=[])

    def _cosine_steps(self) -> int:
        return max(1, (self.total_steps or 1) - self.warmup_steps)

    def set_total_steps(self, total_steps: int) -> None:
        """The run's length, known once the trainer is: before the first step only."""
        if self.last_epoch != 0:
            raise RuntimeError("WarmupCosine.set_total_steps is for a new schedule, before its first step")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        self._schedulers[-1].T_max = self._cosine_steps()

    def step(self) -> None:  # type: ignore[override]
        if self.total_steps is None:
            raise RuntimeError("WarmupCosine has no total_steps: give it one, or build it with "
                               "ldm.systems.optim.build_scheduler, which takes the trainer's")
        if self.last_epoch >= self.warmup_steps + self._cosine_steps():  # at eta_min: stay there
            self.last_epoch += 1
            return
        super().step()


def fused_unsupported(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters of ``optimizer``'s ``fused`` groups that torch's fused kernels cannot update (floating-point
    tensors on a device with fused kernels only); empty when nothing is fused or all is supported."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    return [p for group in optimizer.param_groups if group.get("fused") for p in group["params"]
            if not (p.device.type in devices and torch.is_floating_point(p))]


def build_optimizer(make_optimizer: OptimizerCallable, params: Iterable) -> torch.optim.Optimizer:
    """``make_optimizer(params)``; asked for a ``fused`` optimizer that cannot be fused here (:func:`fused_unsupported`),
    the same optimizer built again with ``fused=False``, with a warning in the log."""
    params = list(params)
    optimizer = make_optimizer(params)
    unsupported = fused_unsupported(optimizer)
    if not unsupported:
        return optimizer
    p = unsupported[0]
    log.warning("fused %s cannot update %d parameters here (the first: %s on %s); using its unfused implementation",
                type(optimizer).__name__, len(unsupported), p.dtype, p.device.type)
    try:
        return make_optimizer(params, fused=False)
    except TypeError:
        raise ValueError(f"fused {type(optimizer).__name__} cannot update {p.dtype} parameters on {p.device.type}, "
                         "and this optimizer callable takes no fused=False: set fused: false in its init_args") from None


def run_length(module: L.LightningModule) -> int:
    """The optimizer steps of the module's run: the trainer's ``estimated_stepping_batches``."""
    total = module.trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError("the learning-rate schedule needs the run's length, and this run has none: set "
                         "trainer.max_steps (or trainer.max_epochs with a sized data set), or the scheduler's "
                         "total_steps (model.init_args.lr_scheduler.init_args.total_steps)")
    return max(1, int(total))


def build_scheduler(make_scheduler: LRSchedulerCallable, optimizer: torch.optim.Optimizer,
                    total_steps: Callable[[], int] | None = None):
    """``make_scheduler(optimizer)``; a schedule that asks for the run's length (``total_steps=None``, as
    :class:`WarmupCosine`'s default) gets ``total_steps()``, or a ``ValueError`` saying what to set without it."""
    scheduler = make_scheduler(optimizer)
    if getattr(scheduler, "total_steps", 0) is None and hasattr(scheduler, "set_total_steps"):
        if total_steps is None:
            raise ValueError(f"{type(scheduler).__name__} needs total_steps here: set "
                             "model.init_args.lr_scheduler.init_args.total_steps")
        scheduler.set_total_steps(total_steps())
    return scheduler


def scheduler_config(make_scheduler: LRSchedulerCallable, optimizer: torch.optim.Optimizer,
                     module: L.LightningModule) -> dict:
    """Lightning's lr-scheduler config: the scheduler stepped after every optimizer step (a
    ``ReduceLROnPlateau``, which needs its metric, after every epoch, on its ``monitor``)."""
    scheduler = build_scheduler(make_scheduler, optimizer, lambda: run_length(module))
    if isinstance(scheduler, ReduceLROnPlateau):
        return {"scheduler": scheduler, "interval": "epoch", "monitor": scheduler.monitor}
    return {"scheduler": scheduler, "interval": "step"}


def configure(module: L.LightningModule, make_optimizer: OptimizerCallable, make_scheduler: LRSchedulerCallable,
              params: Iterable | None = None) -> dict:
    """``configure_optimizers``' answer: one optimizer over ``params`` (default: the module's trainable
    parameters) and its scheduler, stepped per optimizer step."""
    if params is None:
        params = [p for p in module.parameters() if p.requires_grad]
    opt = build_optimizer(make_optimizer, params)
    return {"optimizer": opt, "lr_scheduler": scheduler_config(make_scheduler, opt, module)}


