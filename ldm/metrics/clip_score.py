"""CLIP score (Hessel et al. 2021): 100 * max(cos(image, caption), 0), averaged.

A torchmetrics ``Metric`` over any model with ``encode_image`` / ``embed_texts`` (an
:class:`~ldm.contrastive.OpenCLIP`: one of our contrastive checkpoints or a pretrained
open_clip file). Sums and counts are synced across ranks by torchmetrics, so the value is
exact under DDP. The scorer is frozen and not part of the metric's state.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class CLIPScore(Metric):
    higher_is_better = True
    full_state_update = False

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.__dict__["scorer"] = model  # not a submodule: its weights are not metric state
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def scores(self, images: Tensor, captions: list[str]) -> Tensor:
        """Per-image scores (B,) of images (B, 3, H, W) in [-1, 1] and their captions (not accumulated)."""
        img = self.scorer.encode_image(images.to(self.scorer.logit_scale.device))
        txt = self.scorer.embed_texts(list(captions))
        return 100 * (img * txt).sum(dim=1).clamp(min=0)  # (B,)

    @torch.no_grad()
    def update(self, images: Tensor | None = None, captions: list[str] | None = None, *,
               scores: Tensor | None = None) -> None:
        """Images (B, 3, H, W) in [-1, 1] and their B captions, or per-image ``scores`` from :meth:`scores`."""
        if scores is None:
            scores = self.scores(images, captions)
        self.total += scores.double().sum().to(self.total.device)  # summed in float64
        self.count += len(scores)

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp(min=1)).float()
