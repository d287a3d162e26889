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
"""

from __future__ import annotations

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


def averaged_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The EMA copy of the model kept by ldm's weight-averaging callback (:meth:`KeepRawWeights.averaged_module`:
    :class:`EMA`, :class:`EMAWarmup`), or the model itself. Configs name ``ldm.callbacks.EMA`` rather than
    Lightning's ``EMAWeightAveraging``, which offers no public accessor to its copy."""
    for cb in trainer.callbacks:
        if isinstance(cb, KeepRawWeights) and (module := cb.averaged_module()) is not None:
            return module
    return pl_module


class KeepRawWeights(WeightAveraging):
    """A ``WeightAveraging`` whose checkpoints written after training ended still hold the raw weights.

    ``WeightAveraging.on_train_end`` overwrites the model with the average; this copies the model's state (on the
    CPU, one copy of the weights) just before, and :meth:`on_save_checkpoint` writes it as
    ``current_model_state``. Checkpoints written during training are Lightning's, unchanged.
    """

    _raw_state: dict[str, torch.Tensor] | None = None

    def averaged_module(self) -> L.LightningModule | None:
        """The averaged copy of the model (EMA weights, for sampling and evaluation during training), or None before
        training has set it up. At the end of training the model itself takes the average."""
        average = self._average_model
        return average.module if average is not None else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._raw_state = None  # a new fit: the model is raw again

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.averaged_module() is not None:
            self._raw_state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._raw_state is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = dict(self._raw_state)  # the model holds the average since on_train_end


class EMA(KeepRawWeights, EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` (same arguments, same checkpoint format) keeping the raw weights in the
    checkpoints written after training ends (:class:`KeepRawWeights`)."""


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
        self.decay, self.power, self.inv_gamma = decay, power, inv_gamma
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = None
