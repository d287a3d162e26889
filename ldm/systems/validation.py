"""Validation pieces shared by the systems: figures exact over ranks, whatever the padding.

The data module gives every rank the same number of validation batches and rows; the rows past a
rank's share of the split (and corrupt samples) are padding, flagged ``valid=False``
(:class:`~ldm.data.streams.EvalStream`). A rank can therefore hold a batch, or a whole epoch, without
one valid row, so nothing here calls a collective per step, or only where rows are valid: a per-step
``self.log(..., sync_dist=True)`` behind ``if valid.any()`` leaves the ranks' collectives mismatched
(gloo aborts, NCCL hangs). Instead:

* :class:`RowMeans` sums per-row figures of the valid rows locally and reduces sums and counts across
  ranks once, at the epoch's end, on every rank (a torchmetrics ``Metric``): the mean over the whole
  split, equal to one process's for any world size and batch size; :func:`log_means` logs it.
* :class:`Histogram` does the same for counts per bin (e.g. the codebook usage of a VQ autoencoder).
* :func:`gather_rows`: every rank's rows of a tensor (one ``all_gather``, exact since the ranks hold
  equally many rows), for figures of the whole split such as retrieval recall.
* :func:`row_randn` / :func:`row_generators`: random numbers of a validation figure (noise, masks)
  drawn per row from a generator seeded by (seed, stream, the row's sample key), on the CPU, so a row
  gets the same numbers in any batch, on any rank, for any world size and on any device.
* :func:`fixed_noise_losses`: the denoising loss per row at fixed noise levels with that fixed noise,
  named for the logs (``loss_t<T>`` / ``loss_sigma<s>`` per level, ``loss`` their mean), so two
  validations of the same weights give the same number and curves of different runs compare.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import pytorch_lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from ldm.diffusion import Cond, DenoisingLoss
from ldm.diffusion.precond import Preconditioner, VPPrecond


class ValidationAsTest:
    """``ldm test``: a system's validation run on ``data.test``, its figures logged under ``test/``.

    Mixed in before ``LightningModule``: ``test_step`` and the test epoch hooks call the validation ones, and
    every ``val/...`` name the validation logs while the trainer tests becomes ``test/...``.
    """

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, *args, **kwargs):
        return self.validation_step(*args, **kwargs)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def log(self, name: str, *args, **kwargs) -> None:  # log_dict calls it too
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.testing and name.startswith("val/"):
            name = "test/" + name[len("val/"):]
        super().log(name, *args, **kwargs)


class RowMeans(Metric):
    """Means of named per-row figures over the valid rows of an epoch, reduced across ranks at :meth:`compute`.

    Every rank must call :meth:`compute` (it syncs); :meth:`update` may see no valid row. Sums are kept in
    float64 so the order in which rows arrive (the world size, the batch size) does not show in the mean.
    """

    full_state_update = False

    def __init__(self, names: Sequence[str]):
        super().__init__()
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate names: {list(names)}")
        self.names = list(names)
        self.add_state("sums", torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: dict[str, Tensor], valid: Tensor) -> None:
        """``values``: a (B,) tensor per name, for every row of the batch; ``valid`` (B,) bool picks the rows counted."""
        valid = valid.to(self.sums.device, torch.bool)
        rows = torch.stack([values[n].detach().to(self.sums.device, torch.float64) for n in self.names], dim=1)  # (B, K)
        self.sums += rows[valid].sum(dim=0)  # (K,)
        self.count += valid.sum()

    def compute(self) -> dict[str, Tensor]:
        """``{name: mean}`` (float32) over every rank's valid rows; empty when no rank saw a valid row."""
        if self.count == 0:
            return {}
        means = (self.sums / self.count).float()
        return {name: means[i] for i, name in enumerate(self.names)}


class Histogram(Metric):
    """Counts of integer values in ``[0, bins)`` over the valid rows of an epoch, reduced across ranks at :meth:`compute`."""

    full_state_update = False

    def __init__(self, bins: int):
        super().__init__()
        self.bins = bins
        self.add_state("counts", torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor, valid: Tensor) -> None:
        """``values`` (B, ...) integers; ``valid`` (B,) bool picks the rows counted."""
        picked = values[valid.to(values.device, torch.bool)].flatten().long()
        self.counts += torch.bincount(picked, minlength=self.bins).to(self.counts)

    def compute(self) -> Tensor:
        return self.counts.clone()


def log_means(system: L.LightningModule, means: RowMeans, prefix: str = "val/", prog_bar: Iterable[str] = ()) -> None:
    """Log ``prefix + name`` of every mean (reduced across ranks; nothing when no rank saw a valid row) and reset.

    The figures are the same on every rank after the reduction, so they are logged unsynced on all ranks.
    """
    bar = set(prog_bar)
    values = means.compute()
    means.reset()
    for name, value in values.items():
        system.log(prefix + name, value, prog_bar=name in bar, sync_dist=False, rank_zero_only=False)


def gather_rows(system: L.LightningModule, local: Tensor) -> Tensor:
    """All ranks' rows (world * N, ...) of a per-rank tensor (N, ...) of equal length on every rank."""
    every = system.all_gather(local)  # (W, N, ...) or (N, ...) on one process
    return every.flatten(0, 1) if system.trainer.world_size > 1 else every


# -- random numbers per row --------------------------------------------------------------------
def row_keys(batch: dict, batch_idx: int) -> list[str]:
    """The sample keys of a batch's rows (``batch["key"]``, set by the data module).

    Without keys (a hand-built batch) rows are named by their position, ``<batch_idx>:<row>``: still
    deterministic, but then a row's random numbers depend on the batch size and the rank's share.
    """
    if "key" in batch:
        return [str(k) for k in batch["key"]]
    n = len(next(v for v in batch.values() if isinstance(v, Tensor)))
    return [f"{batch_idx}:{i}" for i in range(n)]


def _row_seed(seed: int, stream: str, key: str) -> int:
    # a stable hash (Python's hash() of a str changes between processes), folded into torch's seed range
    digest = hashlib.blake2b(f"{seed}\0{stream}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def row_generators(keys: Sequence[str], seed: int, stream: str) -> list[torch.Generator]:
    """One CPU generator per row, seeded by (seed, stream, key); ``stream`` keeps independent uses apart."""
    return [torch.Generator().manual_seed(_row_seed(seed, stream, k)) for k in keys]


def row_randn(keys: Sequence[str], seed: int, stream: str, like: Tensor) -> Tensor:
    """Standard normal noise shaped, placed and typed like ``like`` (B, ...), row b drawn from key b's generator."""
    gens = row_generators(keys, seed, stream)
    if len(gens) != len(like):
        raise ValueError(f"{len(keys)} keys for {len(like)} rows")
    rows = [torch.randn(like.shape[1:], generator=g) for g in gens]
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)  # (B, ...)


# -- the fixed-noise denoising loss of the diffusion systems ------------------------------------
def validation_levels(precond: Preconditioner, timesteps: Sequence[int] | None,
                      sigmas: Sequence[float] | None = None) -> tuple[list[str], list[float]]:
    """(names, sigmas): ``sigmas`` as given (``sigma<s>``), else the DDPM ``timesteps`` of a VP preconditioner
    (``t<T>``), or the flow times T / 1000 of a flow-matching one."""
    if sigmas is not None:
        return [f"sigma{s:g}" for s in sigmas], [float(s) for s in sigmas]
    if hasattr(precond, "training_sigma"):  # flow matching: timestep T is the flow time T / num_timesteps
        t = torch.tensor(list(timesteps), dtype=torch.float64) / precond.num_timesteps
        return [f"t{int(x)}" for x in timesteps], precond.time_to_sigma(t).float().tolist()
    if not isinstance(precond, VPPrecond):
        raise ValueError(f"validation timesteps need a discrete VP preconditioner; give noise levels (val_sigmas) for "
                         f"{type(precond).__name__}")
    t = torch.tensor(list(timesteps), dtype=torch.float64)
    return [f"t{int(x)}" for x in timesteps], precond.schedule.t_to_sigma(t).float().tolist()


def fixed_noise_names(levels: tuple[list[str], list[float]]) -> list[str]:
    """The names :func:`fixed_noise_losses` returns: ``loss_<level>`` per level, then ``loss``."""
    return [f"loss_{name}" for name in levels[0]] + ["loss"]


def fixed_noise_losses(loss: DenoisingLoss, precond: Preconditioner, net: nn.Module, x0: Tensor, cond: Cond,
                       keys: Sequence[str], levels: tuple[list[str], list[float]], seed: int) -> dict[str, Tensor]:
    """Per-row (B,) denoising losses of ``x0`` (B, ...) at each fixed level with noise fixed per sample key.

    ``loss`` is the mean over the levels; padding rows get values too (the caller masks them).
    """
    noise = row_randn(keys, seed, "denoise", x0)  # (B, ...)
    out: dict[str, Tensor] = {}
    for name, sigma in zip(*levels, strict=True):
        s = torch.full((len(x0),), sigma, device=x0.device, dtype=x0.dtype)
        out[f"loss_{name}"] = loss(precond, net, x0, cond, sigma=s, noise=noise)  # (B,)
    out["loss"] = torch.stack(list(out.values())).mean(dim=0)  # (B,)
    return out
