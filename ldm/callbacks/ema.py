"""EMA of the weights: Lightning's ``EMAWeightAveraging`` keeping the raw weights in every checkpoint, and with warmup.

Raw weights. Lightning's callback writes the average into a checkpoint's ``state_dict`` and the raw (current)
weights into ``current_model_state``; at the end of training (``on_train_end``) it copies the average into the
model. A checkpoint written after that (``ModelCheckpoint``'s ``save_last`` in its own ``on_train_end``, and the
final ``checkpoints/last.ckpt`` that ``ldm fit`` writes after fitting) then holds the average twice: the raw
weights of the last step are lost, so neither ``ldm sample --weights raw`` nor a resumed run (which starts from
``current_model_state``) can get them back. :class:`KeepRawWeights` keeps a copy of the raw weights when
training ends and writes it as ``current_model_state`` of every later checkpoint; :class:`EMA` is Lightning's
callback with it (use ``ldm.callbacks.ema.EMA`` where a config names ``EMAWeightAveraging``).

Warmup. With a fixed decay the average remembers the first weights for a long time: after n updates at
0.999 their share is 0.999^n, 55 % after 600 steps, so a short run's EMA is mostly its initial
random weights. diffusers' ``EMAModel(use_ema_warmup=True)`` and the DiT / EDM recipes ramp the
decay up instead: at the n-th update (n = 1, 2, ...; the first update copies the weights)

    decay_n = min(decay, 1 - (1 + n / inv_gamma) ** -power)

(power 2/3 reaches 0.999 at about 31,000 steps, 3/4 at about 10,000). :class:`EMAWarmup` extends Lightning's
callback (same checkpoint state, same use in validation and checkpoints, raw weights kept) with that schedule,
as one fused ``torch._foreach_lerp_`` over all parameters per update.

One fused update, no host sync (issue 19). torch's ``AveragedModel.update_parameters`` reads its device-side count
``n_averaged`` with ``bool()`` twice per update (the GPU must catch up with the host at every step) and Lightning's
``EMAWeightAveraging`` averages with a per-parameter ``avg_fn`` (about 700 small kernels per step for the SD U-Net).
Both callbacks here update with ``_foreach`` ops over all tensors at once (:meth:`KeepRawWeights.update_average`),
counting the updates on the host (the device count is read once per fit, and still advanced and checkpointed).
:class:`EMA` computes Lightning's ``decay * average + (1 - decay) * current`` exactly (the same bits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as L
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging
from pytorch_lightning.callbacks.weight_averaging import WeightAveraging


def warmup_decay(n: int, decay: float, power: float, inv_gamma: float = 1.0) -> float:
    """The decay of the ``n``-th averaging step (``n`` = updates already averaged, >= 1)."""
    return min(decay, 1.0 - (1.0 + n / inv_gamma) ** -power)


def ema_warmup_multi_avg_fn(decay: float = 0.9999, power: float = 2 / 3, inv_gamma: float = 1.0):
    """``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel``: the warmup EMA over all tensors at once."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        d = warmup_decay(int(num_averaged), decay, power, inv_gamma)
        torch._foreach_lerp_(averaged, current, 1.0 - d)  # avg + (1 - d)(cur - avg) = d avg + (1 - d) cur

    return update


def ema_multi_avg_fn(decay: float):
    """``decay * average + (1 - decay) * current`` over all tensors at once, rounded as torch's per-tensor
    ``get_ema_avg_fn`` (Lightning's ``EMAWeightAveraging``) rounds it: the same average bit for bit."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        scaled = torch._foreach_mul(current, 1 - decay)
        torch._foreach_mul_(averaged, decay)
        torch._foreach_add_(averaged, scaled)

    return update


def averaged_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The EMA copy of the model kept by ldm's weight-averaging callback (:meth:`KeepRawWeights.averaged_module`:
    :class:`EMA`, :class:`EMAWarmup`), or the model itself. Configs name ``ldm.callbacks.EMA`` rather than
    Lightning's ``EMAWeightAveraging``, which offers no public accessor to its copy."""
    for cb in trainer.callbacks:
        if isinstance(cb, KeepRawWeights) and (module := cb.averaged_module()) is not None:
            return module
    return pl_module


class KeepRawWeights(WeightAveraging):
    """A ``WeightAveraging`` whose checkpoints written after training ended still hold the raw weights, updated by
    fused ``_foreach`` ops without a host sync.

    ``WeightAveraging.on_train_end`` overwrites the model with the average; this copies the model's state (on the
    CPU, one copy of the weights) just before, and :meth:`on_save_checkpoint` writes it as
    ``current_model_state``. Checkpoints written during training are Lightning's, unchanged.

    A subclass sets ``_average_`` (``(averages, currents, n) -> None``: average the floating-point tensors in
    place, ``n`` >= 1 the updates already averaged, a host int) to get :meth:`update_average`; without it the
    update is torch's ``AveragedModel.update_parameters``.
    """

    _raw_state: dict[str, torch.Tensor] | None = None
    _average_: Callable[[list[torch.Tensor], list[torch.Tensor], int], None] | None = None
    _updates: int | None = None  # updates averaged so far, on the host (None: read the device count once)

    @torch.no_grad()
    def update_average(self, pl_module: L.LightningModule) -> None:
        """One update of the average towards ``pl_module``: a copy at the first update, then ``_average_``; integer
        tensors (counters) are copied; buffers too when they are not averaged (``use_buffers=False``)."""
        average = self._average_model
        if self._average_ is None:
            average.update_parameters(pl_module)
            return
        if self._updates is None:
            self._updates = int(average.n_averaged)  # once per fit: the count a resumed run restored
        def tensors(module):
            return list(module.parameters()) + (list(module.buffers()) if average.use_buffers else [])

        ours, theirs = tensors(average.module), [t.detach() for t in tensors(pl_module)]
        floats = [i for i, t in enumerate(ours) if t.is_floating_point() or t.is_complex()]
        if self._updates == 0:
            torch._foreach_copy_(ours, [t.to(o.device) for o, t in zip(ours, theirs)])
        else:
            self._average_([ours[i] for i in floats], [theirs[i].to(ours[i].device) for i in floats], self._updates)
            others = [i for i in range(len(ours)) if i not in set(floats)]
            if others:
                torch._foreach_copy_([ours[i] for i in others], [theirs[i].to(ours[i].device) for i in others])
        if not average.use_buffers:
            for b_avg, b_model in zip(average.module.buffers(), pl_module.buffers()):
                b_avg.copy_(b_model.detach().to(b_avg.device))
        average.n_averaged += 1  # on its device, queued: no sync
        self._updates += 1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step_idx = trainer.global_step - 1  # as WeightAveraging.on_train_batch_end
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self.update_average(pl_module)
            self._latest_update_step = trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > self._latest_update_epoch and self.should_update(epoch_idx=trainer.current_epoch):
            self.update_average(pl_module)
            self._latest_update_epoch = trainer.current_epoch

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        self._updates = None  # the restored device count is read at the next update

    def averaged_module(self) -> L.LightningModule | None:
        """The averaged copy of the model (EMA weights, for sampling and evaluation during training), or None before
        training has set it up. At the end of training the model itself takes the average."""
        average = self._average_model
        return average.module if average is not None else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._raw_state = None  # a new fit: the model is raw again
            self._updates = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.averaged_module() is not None:
            self._raw_state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._raw_state is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = dict(self._raw_state)  # the model holds the average since on_train_end


class EMA(KeepRawWeights, EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` (same arguments, same checkpoint format, the same average bit for bit)
    keeping the raw weights in the checkpoints written after training ends and updating with fused ``_foreach``
    ops without a host sync (:class:`KeepRawWeights`). A ``multi_avg_fn`` of one's own is torch's update."""

    def __init__(self, device: torch.device | str | int | None = None, use_buffers: bool = True, decay: float = 0.999,
                 update_every_n_steps: int = 1, update_starting_at_step: int | None = None,
                 update_starting_at_epoch: int | None = None, **kwargs: Any):
        super().__init__(device=device, use_buffers=use_buffers, decay=decay,
                         update_every_n_steps=update_every_n_steps, update_starting_at_step=update_starting_at_step,
                         update_starting_at_epoch=update_starting_at_epoch, **kwargs)
        self.decay = decay
        if kwargs.get("multi_avg_fn") is None:
            self._average_ = ema_multi_avg_fn(decay)


class EMAWarmup(KeepRawWeights, EMAWeightAveraging):
    """``EMAWeightAveraging`` with the decay warmup of diffusers' ``EMAModel(use_ema_warmup=True)``, keeping the raw
    weights in every checkpoint (:class:`KeepRawWeights`).

    Args:
        decay: the decay the warmup rises to (and stays at).
        power, inv_gamma: the warmup ``1 - (1 + n / inv_gamma) ** -power``.
        update_every_n_steps, update_starting_at_step, device, use_buffers: as Lightning's callback.
    """

    def __init__(self, decay: float = 0.9999, power: float = 2 / 3, inv_gamma: float = 1.0,
                 update_every_n_steps: int = 1, update_starting_at_step: int | None = None,
                 device: str | None = None, use_buffers: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        WeightAveraging.__init__(self, device=device, use_buffers=use_buffers,
                                 multi_avg_fn=ema_warmup_multi_avg_fn(decay, power, inv_gamma))
        self._average_ = ema_warmup_multi_avg_fn(decay, power, inv_gamma)
        self.decay, self.power, self.inv_gamma = decay, power, inv_gamma
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = None
