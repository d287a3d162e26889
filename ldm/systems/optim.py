"""Small optimisation helpers shared by the systems."""

from __future__ import annotations

import torch


class Shared:
    """A value that deep copies of a module share. The EMA callback deep-copies the whole system, and the
    optimizer callable jsonargparse builds holds references (to the data module's counters) that cannot be copied."""

    def __init__(self, value):
        self.value = value

    def __deepcopy__(self, memo):
        return self


def warmup_scheduler(opt: torch.optim.Optimizer, warmup_steps: int) -> dict:
    """Lightning's lr-scheduler config for a linear warmup over ``warmup_steps`` optimizer steps (then constant)."""

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor), "interval": "step"}


def trainable_with_warmup(make_optimizer, module: torch.nn.Module, warmup_steps: int) -> dict:
    """``configure_optimizers``' answer: one optimizer over the module's trainable parameters, linear warmup."""
    opt = make_optimizer([p for p in module.parameters() if p.requires_grad])
    return {"optimizer": opt, "lr_scheduler": warmup_scheduler(opt, warmup_steps)}
