"""Patch masking for transformer backbones (MaskDiT, Zheng et al. 2024; MicroDiT, Sehwag et al. 2025).

In training, a random round(r * N) of the N image tokens of every sample are dropped after patchify + positions (the
same number per sample, so the batch stays rectangular); the blocks run on the kept tokens only (the saving), and the
dropped positions are filled with a learned mask token (+ their positions) before the final layer. The denoising loss
counts only the output elements the kept tokens predict (:meth:`PatchMasking.output_mask`, read by
:class:`~ldm.diffusion.DenoisingLoss`). In eval mode (validation, sampling) nothing is masked; setting ``mask_ratio``
to 0 during training (``LatentDiffusion(unmask_after_steps=)``) is MaskDiT's unmasked fine-tuning.

:class:`PatchMasking` is the mixin both :class:`~ldm.diffusion.DiT` and :class:`~ldm.diffusion.MMDiT` use: it owns
``mask_ratio``, the mask token, and what the last forward kept (``last_kept``) on which grid (``last_grid``), which
REPA (:class:`~ldm.diffusion.repa.RepresentationAlignment`) also reads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def keep_count(n: int, ratio: float) -> int:
    """Tokens kept of ``n`` when a share ``ratio`` is dropped: n - round(ratio * n)."""
    return n - round(ratio * n)


def drop_tokens(tokens: Tensor, ratio: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Drop a random ``round(ratio * N)`` of the tokens (B, N, D) of every sample (MaskDiT's random masking, as
    MAE's): the kept tokens (B, N_keep, D) in their original order, and their indices (B, N_keep)."""
    b, n, d = tokens.shape
    noise = torch.rand(b, n, generator=generator, device=tokens.device)  # (B, N)
    kept = noise.argsort(dim=1)[:, :keep_count(n, ratio)].sort(dim=1).values  # (B, N_keep)
    return tokens.gather(1, kept[..., None].expand(-1, -1, d)), kept


def restore_tokens(tokens: Tensor, kept: Tensor, fill: Tensor) -> Tensor:
    """The kept tokens (B, N_keep, D) back at their indices ``kept`` (B, N_keep) of a full sequence whose other
    positions are ``fill`` (N, D) or (B, N, D): (B, N, D)."""
    b, _, d = tokens.shape
    full = fill.expand(b, -1, d) if fill.ndim == 3 else fill[None].expand(b, -1, d)  # (B, N, D)
    return full.scatter(1, kept[..., None].expand(-1, -1, d), tokens)


class PatchMasking:
    """Mixin of a patchifying transformer (an ``nn.Module`` with ``patch_size``): call :meth:`init_masking` in
    ``__init__``, :meth:`drop` on the (B, N, D) tokens after positions, :meth:`restore` before the final layer."""

    mask_ratio: float
    mask_token: nn.Parameter | None
    last_kept: Tensor | None
    last_grid: tuple[int, int] | None
    patch_size: int

    def init_masking(self, mask_ratio: float, width: int) -> None:
        """``mask_ratio`` in [0, 1): a model built with it > 0 has a learned mask token of ``width``; without, it has
        none, so unmasked models keep their reference parameter counts. The model's weight initialisation calls
        :meth:`init_mask_token`."""
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width)) if mask_ratio > 0 else None
        self.last_kept = None  # (B, N_keep) indices of the tokens the blocks saw in the last forward
        self.last_grid = None  # (rows, cols) of the token grid of the last forward

    def init_mask_token(self) -> None:
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)  # MAE's mask token

    def drop(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """The tokens (B, N, D) of a ``grid`` (rows, cols) the blocks see: all of them in eval mode or at ratio 0,
        else the kept ones (B, N_keep, D), their indices in ``last_kept``."""
        self.last_kept, self.last_grid = None, grid
        if not (self.training and self.mask_ratio > 0):
            return tokens
        if self.mask_token is None:
            raise ValueError(f"this {type(self).__name__} was built without patch masking (mask_ratio 0), so it has "
                             "no mask token: build it with the mask_ratio to train with")
        tokens, self.last_kept = drop_tokens(tokens, self.mask_ratio)  # (B, N_keep, D), (B, N_keep)
        return tokens

    def restore(self, tokens: Tensor, pos: Tensor) -> Tensor:
        """After the blocks: the full (B, N, D) sequence, the dropped positions the mask token + their ``pos``
        (N, D)."""
        if self.last_kept is None:
            return tokens
        return restore_tokens(tokens, self.last_kept, self.mask_token.to(tokens.dtype) + pos)  # (B, N, D)

    def output_mask(self) -> Tensor | None:
        """(B, 1, H, W) ones on the patches the blocks saw in the last forward and zeros on the dropped ones, or
        None when it masked nothing (eval, ``mask_ratio`` 0): the elements a denoising loss counts."""
        if self.last_kept is None:
            return None
        b, (h, w) = len(self.last_kept), self.last_grid
        keep = torch.zeros(b, h * w, device=self.last_kept.device)
        keep.scatter_(1, self.last_kept, 1.0)  # (B, N)
        p = self.patch_size
        return keep.reshape(b, 1, h, 1, w, 1).expand(-1, -1, -1, p, -1, p).reshape(b, 1, h * p, w * p)


__all__ = ["PatchMasking", "drop_tokens", "keep_count", "restore_tokens"]
