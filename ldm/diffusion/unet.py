"""The conditional U-Net of latent diffusion (Rombach et al. 2022, appendix E; Stable Diffusion).

The network of DDPM (Ho et al. 2020) with the LDM additions, read top to bottom:

* input conv -> per level ``num_res_blocks`` x (ResBlock [+ SpatialTransformer]) -> Downsample
* middle: ResBlock, SpatialTransformer, ResBlock
* per level, reversed, ``num_res_blocks + 1`` x (ResBlock on [h, skip] [+ SpatialTransformer]) -> Upsample
* GroupNorm -> SiLU -> output conv (zero-initialised, as every residual branch's last layer,
  so a fresh U-Net outputs exactly zero: eps = 0, the prior mean)

Every ResBlock receives the embedding of the noise-conditioning value ``t`` (what the
preconditioner passes: the fractional DDPM timestep for VP models). Three conditioning
routes, combinable:

* ``context`` (B, T, context_dim) + ``context_mask`` (B, T): cross-attention in every
  spatial transformer (text tokens);
* ``y``: a vector (B, y_dim) or a class label (B,) embedded and added to the timestep
  embedding (class-conditional models; the unCLIP decoder's CLIP image embedding, Ramesh
  et al. 2022, sec. 2.1);
* ``concat`` (B, concat_channels, H, W): channels stacked onto the noisy input (inpainting
  masks and masked images, low-resolution images for super-resolution).

The Stable-Diffusion-1.5 shape (channels 320, mult 1-2-4-4, 2 blocks, attention on the
first three levels, 8 heads, context 768) has 859.5M parameters, the same count as
diffusers' ``UNet2DConditionModel`` for that checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.nn import (
    Downsample,
    ResBlock,
    SpatialTransformer,
    TimestepEmbedding,
    Upsample,
    group_norm,
)


class UNetBlock(nn.ModuleList):
    """A sequence of layers that each take what they need: ResBlocks the embedding, transformers the context."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, mask)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """Args:
        in_channels: channels of the noisy input (latent channels, or 3 in pixel space).
        out_channels: channels of the prediction (default: in_channels).
        channels: width of the first level; level i has ``channels * channel_mult[i]``.
        channel_mult: width multipliers, one per resolution level.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attention_levels: indices of the levels that get a spatial transformer after each ResBlock.
        heads: attention heads per transformer; or give ``head_dim`` instead (heads = width / head_dim).
        head_dim: channels per head (SD 2.x uses 64); None = width / heads.
        transformer_depth: transformer blocks per spatial transformer.
        context_dim: width of the cross-attention context (text features); None = no cross-attention.
        y_dim: width of a conditioning vector added to the timestep embedding; None = off.
        num_classes: number of class labels embedded into the timestep embedding; None = off.
        concat_channels: extra channels concatenated to the input; 0 = off.
        mid_attention: a spatial transformer in the middle block.
        dropout: dropout in ResBlocks and transformers.
        groups: GroupNorm groups (fewer are used where a width is not divisible).
        norm_eps: eps of the ResBlocks' and the output GroupNorms (1e-5 in Stable Diffusion, diffusers'
            ``norm_eps``; the spatial transformers' GroupNorm keeps 1e-6, as in both).
        gradient_checkpointing: recompute each block's activations in the backward pass (saves memory).
    """

    def __init__(self, in_channels: int = 4, out_channels: int | None = None, channels: int = 320,
                 channel_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attention_levels: Sequence[int] = (0, 1, 2), heads: int | None = 8, head_dim: int | None = None,
                 transformer_depth: int = 1, context_dim: int | None = 768, y_dim: int | None = None,
                 num_classes: int | None = None, concat_channels: int = 0, mid_attention: bool = True,
                 dropout: float = 0.0, groups: int = 32, norm_eps: float = 1e-6, gradient_checkpointing: bool = False):
        super().__init__()
        if (heads is None) == (head_dim is None):
            raise ValueError("give exactly one of heads and head_dim")
        if y_dim is not None and num_classes is not None:
            raise ValueError("give at most one of y_dim (a vector) and num_classes (a label) for the y route")
        bad = [i for i in attention_levels if not 0 <= i < len(channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} out of range for {len(channel_mult)} levels")
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.context_dim, self.y_dim, self.num_classes = context_dim, y_dim, num_classes
        self.concat_channels = concat_channels
        self.num_levels = len(channel_mult)
        # the architecture, read back by weight converters (ldm.interop)
        self.channels, self.channel_mult, self.num_res_blocks = channels, tuple(channel_mult), num_res_blocks
        self.attention_levels = tuple(sorted(attention_levels))
        self.heads, self.head_dim, self.transformer_depth = heads, head_dim, transformer_depth
        self.mid_attention, self.groups, self.norm_eps, self.dropout = mid_attention, groups, norm_eps, dropout
        self.gradient_checkpointing = gradient_checkpointing
        emb_dim = 4 * channels
        self.time_embed = TimestepEmbedding(channels, emb_dim)
        if y_dim is not None:
            self.y_embed: nn.Module | None = nn.Sequential(nn.Linear(y_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        elif num_classes is not None:
            self.y_embed = nn.Embedding(num_classes, emb_dim)
        else:
            self.y_embed = None

        def transformer(ch: int) -> SpatialTransformer:
            h = heads if heads is not None else ch // head_dim
            d = ch // h if head_dim is None else head_dim
            return SpatialTransformer(ch, h, d, transformer_depth, context_dim, dropout, groups)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, groups, norm_eps)

        self.input_blocks = nn.ModuleList([UNetBlock([nn.Conv2d(in_channels + concat_channels, channels, 3, padding=1)])])
        skips, ch = [channels], channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, channels * mult)]
                ch = channels * mult
                if level in attention_levels:
                    layers.append(transformer(ch))
                self.input_blocks.append(UNetBlock(layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(UNetBlock([Downsample(ch, symmetric=True)]))
                skips.append(ch)
        self.middle_block = UNetBlock([res(ch, ch), *([transformer(ch)] if mid_attention else []), res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), channels * mult)]
                ch = channels * mult
                if level in attention_levels:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(UNetBlock(layers))
        self.out = nn.Sequential(group_norm(ch, groups, norm_eps), nn.SiLU(), nn.Conv2d(ch, self.out_channels, 3, padding=1))
        self._zero_init()

    def _zero_init(self) -> None:
        """Zero the last layer of every residual branch and the output conv (LDM's ``zero_module``)."""
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
                nn.init.zeros_(m.conv2.bias)
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def _check(self, x: Tensor, context: Tensor | None, y: Tensor | None, concat: Tensor | None) -> None:
        f = 2 ** (self.num_levels - 1)
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"input of size {tuple(x.shape[-2:])}: height and width must be divisible by {f}")
        if self.context_dim is not None and context is None:
            raise ValueError(f"this U-Net cross-attends to a context: pass context (B, T, {self.context_dim})")
        if self.y_embed is not None and y is None:
            raise ValueError("this U-Net is conditioned on y (a vector or class label): pass y")
        if self.concat_channels and (concat is None or concat.shape[1] != self.concat_channels):
            got = None if concat is None else tuple(concat.shape)
            raise ValueError(f"this U-Net concatenates {self.concat_channels} channels to its input: pass concat, got {got}")

    def _run(self, block: UNetBlock, *args) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None,
                y: Tensor | None = None, concat: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), t (B,) noise conditioning -> prediction (B, out_channels, H, W)."""
        self._check(x, context, y, concat)
        emb = self.time_embed(t)  # (B, 4 channels)
        if self.y_embed is not None:
            emb = emb + self.y_embed(y if self.num_classes is not None else y.to(emb.dtype))  # (B, 4 channels)
        if context is not None:
            context = context.to(emb.dtype)
        h = torch.cat([x, concat.to(x.dtype)], dim=1) if self.concat_channels else x  # (B, C + C_cat, H, W)
        hs = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context, context_mask)
            hs.append(h)
        h = self._run(self.middle_block, h, emb, context, context_mask)  # (B, C_mid, H/f, W/f)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, hs.pop()], dim=1), emb, context, context_mask)
        return self.out(h)  # (B, out_channels, H, W)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
