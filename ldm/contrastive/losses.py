"""Contrastive losses: open_clip's ClipLoss and SigLipLoss, distributed-aware.

* :class:`ClipLoss`: symmetric InfoNCE with a learned temperature (Radford et al. 2021). Under
  DDP the features of all ranks are gathered *with* gradients and each rank scores its own
  rows against all columns (open_clip's ``local_loss=True, gather_with_grad=True``): the
  gradient DDP averages equals that of one process on the concatenated batch.
* :class:`SigLipLoss`: pairwise sigmoid loss with temperature t and bias b, no N x N softmax
  normalisation (Zhai et al. 2023); under DDP text features travel between neighbouring ranks
  with gradients, and the DDP average again equals the single-process loss.

The rank and world size are read from ``torch.distributed`` at the first call, so the same
config works on one CPU and on many nodes. ``gather=False`` scores the given rows alone, as one
process would, with no collective: for features already gathered from every rank (validation).
"""

from __future__ import annotations

import open_clip.loss as ocl
import torch.distributed as dist
from torch import Tensor, nn


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ContrastiveLoss(nn.Module):
    uses_bias = False

    def __init__(self):
        super().__init__()
        self._impls: dict[tuple[int, int], nn.Module] = {}

    def build(self, rank: int, world_size: int) -> nn.Module:
        raise NotImplementedError

    def impl(self, gather: bool = True) -> nn.Module:
        """open_clip's loss for this process's rank and world size (``gather=False``: as a single process)."""
        key = _rank_world() if gather else (0, 1)
        if key not in self._impls:
            self._impls[key] = self.build(*key)
        return self._impls[key]


class ClipLoss(ContrastiveLoss):
    def build(self, rank, world_size):
        return ocl.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Tensor | None = None, *, gather: bool = True) -> Tensor:
        return self.impl(gather)(image_features, text_features, logit_scale)


class SigLipLoss(ContrastiveLoss):
    uses_bias = True

    def build(self, rank, world_size):
        return ocl.SigLipLoss(rank=rank, world_size=world_size)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Tensor | None = None, *, gather: bool = True) -> Tensor:
        if logit_bias is None:
            raise ValueError("SigLipLoss needs a model with a logit bias: build it with siglip: true")
        return self.impl(gather)(image_features, text_features, logit_scale, logit_bias)
