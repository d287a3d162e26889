"""Validation pieces shared by the diffusion systems (and the contrastive system's exact gather).

* :func:`validation_levels`: the fixed noise levels of a validation loss, named for the logs.
* :func:`log_fixed_noise_losses`: the denoising loss of a batch at those levels with noise fixed per
  (seed, batch, rank), logged per level and as their mean, so two validations of the same weights
  give the same number and curves of different runs compare.
* :func:`gather_rows`: every rank's rows of a validation tensor. The data module gives every rank
  the same number of rows (padding rows flagged ``valid=False``), so one ``all_gather`` is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as L
import torch
from torch import Tensor, nn

from ldm.diffusion import Cond
from ldm.diffusion.precond import Preconditioner, VPPrecond


def validation_levels(precond: Preconditioner, timesteps: Sequence[int] | None,
                      sigmas: Sequence[float] | None = None) -> tuple[list[str], list[float]]:
    """(names, sigmas): ``sigmas`` as given (``sigma<s>``), else the DDPM ``timesteps`` of a VP preconditioner (``t<T>``)."""
    if sigmas is not None:
        return [f"sigma{s:g}" for s in sigmas], [float(s) for s in sigmas]
    if not isinstance(precond, VPPrecond):
        raise ValueError(f"validation timesteps need a discrete VP preconditioner; give noise levels (val_sigmas) for "
                         f"{type(precond).__name__}")
    t = torch.tensor(list(timesteps), dtype=torch.float64)
    return [f"t{int(x)}" for x in timesteps], precond.schedule.t_to_sigma(t).float().tolist()


def log_fixed_noise_losses(system: L.LightningModule, net: nn.Module, x0: Tensor, cond: Cond, valid: Tensor,
                           batch_idx: int, levels: tuple[list[str], list[float]], seed: int) -> None:
    """Log ``val/loss_<level>`` and ``val/loss`` of ``system.loss`` for the valid rows of a batch (none: nothing)."""
    n = int(valid.sum())
    if n == 0:
        return
    gen = torch.Generator(x0.device).manual_seed(seed * 1_000_003 + batch_idx * 4099 + system.global_rank)
    noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    per_level = []
    for name, sigma in zip(*levels, strict=True):
        s = torch.full((len(x0),), sigma, device=x0.device, dtype=x0.dtype)
        value = system.loss(system.precond, net, x0, cond, sigma=s, noise=noise)[valid].mean()
        per_level.append(value)
        system.log(f"val/loss_{name}", value, batch_size=n, sync_dist=True)
    system.log("val/loss", torch.stack(per_level).mean(), batch_size=n, sync_dist=True, prog_bar=True)


def gather_rows(system: L.LightningModule, local: Tensor) -> Tensor:
    """All ranks' rows (world * N, ...) of a per-rank tensor (N, ...) of equal length on every rank."""
    every = system.all_gather(local)  # (W, N, ...) or (N, ...) on one process
    return every.flatten(0, 1) if system.trainer.world_size > 1 else every
