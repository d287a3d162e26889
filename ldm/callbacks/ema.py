"""EMA of the weights with warmup: Lightning's ``EMAWeightAveraging``, its decay ramped up over training.

With a fixed decay the average remembers the first weights for a long time: after n updates at
0.999 their share is 0.999^n, 55 % after 600 steps, so a short run's EMA is mostly its initial
random weights. diffusers' ``EMAModel(use_ema_warmup=True)`` and the DiT / EDM recipes ramp the
decay up instead: at the n-th update (n = 1, 2, ...; the first update copies the weights)

    decay_n = min(decay, 1 - (1 + n / inv_gamma) ** -power)

(power 2/3 reaches 0.999 at about 31,000 steps, 3/4 at about 10,000). This extends Lightning's
callback (same checkpoint state, same use in validation and checkpoints) with that schedule, as one
fused ``torch._foreach_lerp_`` over all parameters per update.
"""

from __future__ import annotations

from typing import Any

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


class EMAWarmup(EMAWeightAveraging):
    """``EMAWeightAveraging`` with the decay warmup of diffusers' ``EMAModel(use_ema_warmup=True)``.

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
