"""The diffusion transformer (DiT, Peebles & Xie 2023) as a backbone beside the U-Net.

Read top to bottom:

* patchify: a p x p convolution with stride p turns the latent (B, C, H, W) into (H/p)(W/p) tokens of width D,
  plus fixed 2-d sin-cos positions (MAE's, computed for the input's grid, so other sizes work);
* the condition vector c = timestep embedding (+ class embedding | + MLP of a vector ``y``), as DiT's;
* ``depth`` adaLN-Zero blocks (sec. 3.2): LayerNorm without affine, modulated by shift / scale from c, a gate on
  each residual branch initialised to zero, so a fresh block is the identity. With ``context_dim`` every block
  also cross-attends to a token sequence (text), between self-attention and MLP, as PixArt-alpha does;
* final layer: adaLN-modulated LayerNorm, a zero-initialised linear to p * p * out_channels, unpatchify.

It takes what :class:`~ldm.diffusion.UNet` takes, ``forward(x, t, context=, context_mask=, y=, concat=)``, and has the
same attributes the :class:`~ldm.diffusion.Conditioner` checks (``context_dim``, ``y_dim``, ``num_classes``,
``concat_channels``), so a config swaps one for the other. ``preset`` names the paper's sizes (table 1): S (12 blocks,
width 384, 6 heads), B (12, 768, 12), L (24, 1024, 16), XL (28, 1152, 16), with patch 2, 4 or 8, e.g. ``XL/2``
(class-conditional on 1000 ImageNet classes with learned sigma: 674,834,720 parameters; the official code's
675,129,632, the paper's "675M", also counts its frozen 256 x 1152 position table as a parameter; diffusers'
``DiTTransformer2DModel`` has the same weights plus one copy of the timestep and class embedders per block:
tests/diffusion/test_dit.py).

Patch masking (MaskDiT, Zheng et al. 2024; MicroDiT, Sehwag et al. 2025; :mod:`ldm.diffusion.patch_masking`): with
``mask_ratio`` r > 0, in training the blocks see a random N - round(r * N) of the N tokens of every sample, the
dropped positions get a learned mask token before the final layer, and :meth:`DiT.output_mask` says which output
elements the kept tokens predict (:class:`~ldm.diffusion.DenoisingLoss` counts those alone). Eval never masks;
``LatentDiffusion(unmask_after_steps=)`` sets the ratio to 0 for MaskDiT's unmasked fine-tuning.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.diffusion.patch_masking import PatchMasking
from ldm.nn import Attention, TimestepEmbedding

#: DiT's model sizes (Peebles & Xie 2023, table 1): depth, width, heads
PRESETS = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def sincos_2d(width: int, height: int, dim: int, device=None) -> Tensor:
    """Fixed 2-d sin-cos positions (height * width, dim) of a grid, row-major (MAE's ``get_2d_sincos_pos_embed``):
    half the channels encode the column, half the row, each as [sin, cos] of 1 / 10000^(2i / (dim / 2))."""
    if dim % 4:
        raise ValueError(f"the width {dim} must be divisible by 4 for 2-d sin-cos positions")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4))  # (dim/4,)

    def encode(pos: Tensor) -> Tensor:
        args = pos.reshape(-1, 1) * omega[None]  # (N, dim/4)
        return torch.cat([args.sin(), args.cos()], dim=1)  # (N, dim/2)

    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64, device=device),
                                torch.arange(width, dtype=torch.float64, device=device), indexing="ij")
    return torch.cat([encode(cols), encode(rows)], dim=1).float()  # (H*W, dim)


def label_or_vector_embedder(num_classes: int | None, y_dim: int | None, width: int) -> nn.Module | None:
    """The ``y`` route of a transformer backbone into its condition vector: class labels with one extra null class
    (DiT's label embedder), or an MLP of a vector (pooled text / CLIP embedding); None without either."""
    if num_classes is not None:
        return nn.Embedding(num_classes + 1, width)  # + the null class
    if y_dim is not None:
        return nn.Sequential(nn.Linear(y_dim, width), nn.SiLU(), nn.Linear(width, width))
    return None


def init_dit_weights(model: nn.Module, zero: list[nn.Linear]) -> None:
    """DiT's initialisation of a transformer backbone with ``patchify``, ``time_embed`` and ``y_embed``: xavier-uniform
    linears, the patch conv as a linear, N(0, 0.02) timestep and label embeddings, and the ``zero`` layers (the adaLN
    modulations and the final projection) at zero, so a fresh model predicts 0."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.xavier_uniform_(model.patchify.weight.view(model.patchify.weight.shape[0], -1))
    nn.init.zeros_(model.patchify.bias)
    nn.init.normal_(model.time_embed.linear_1.weight, std=0.02)
    nn.init.normal_(model.time_embed.linear_2.weight, std=0.02)
    if isinstance(model.y_embed, nn.Embedding):
        nn.init.normal_(model.y_embed.weight, std=0.02)
    for layer in zero:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-Zero block: x + g1 * SelfAttn(mod(LN x)) [+ CrossAttn(LN x, context)] + g2 * MLP(mod(LN x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, dim // heads, qkv_bias=True)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6) if context_dim else None
        self.cross = Attention(dim, heads, dim // heads, context_dim, qkv_bias=True) if context_dim else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.modulation[-1].weight)  # adaLN-Zero: gates start at 0, the block is the identity
        nn.init.zeros_(self.modulation[-1].bias)

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=1)  # (B, D) each
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))  # (B, N, D)
        if self.cross is not None:
            if context is None:
                raise ValueError("this DiT cross-attends to a context: pass context (B, T, context_dim)")
            x = x + self.cross(self.norm_cross(x), context, mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(PatchMasking, nn.Module):
    """Args:
        in_channels: channels of the noisy input (latent channels).
        out_channels: channels of the prediction (default: in_channels; 2 x for DiT's learned sigma).
        patch_size: p, the side of a patch (2, 4, 8).
        hidden_size, depth, num_heads: width, blocks and heads (or ``preset``).
        preset: one of the paper's sizes, ``S/2`` ... ``XL/8`` (sets patch_size, depth, hidden_size, num_heads).
        mlp_ratio: MLP width / model width.
        num_classes: class-conditional: labels (B,) embedded into c, with one extra null class (``num_classes``) for
            classifier-free guidance, as DiT's label embedder.
        y_dim: a vector (B, y_dim) (pooled text / CLIP embedding) embedded by an MLP into c.
        context_dim: cross-attention to tokens (B, T, context_dim) in every block.
        concat_channels: extra channels concatenated to the input (inpainting).
        gradient_checkpointing: recompute each block's activations in the backward pass.
        mask_ratio: in training, the share of tokens dropped before the blocks (patch masking; 0 = off; MaskDiT 0.5,
            MicroDiT 0.75). A model built with it > 0 has a learned mask token; it can be set to 0 later.
    """

    def __init__(self, in_channels: int = 4, out_channels: int | None = None, patch_size: int = 2,
                 hidden_size: int = 384, depth: int = 12, num_heads: int = 6, preset: str | None = None,
                 mlp_ratio: float = 4.0, num_classes: int | None = None, y_dim: int | None = None,
                 context_dim: int | None = None, concat_channels: int = 0, gradient_checkpointing: bool = False,
                 mask_ratio: float = 0.0):
        super().__init__()
        if preset is not None:
            size, _, patch = preset.partition("/")
            if size not in PRESETS or patch not in ("2", "4", "8"):
                raise ValueError(f"preset {preset!r}: use one of {', '.join(PRESETS)} with patch 2, 4 or 8, e.g. XL/2")
            depth, hidden_size, num_heads = PRESETS[size]
            patch_size = int(patch)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        if y_dim is not None and num_classes is not None:
            raise ValueError("give at most one of y_dim (a vector) and num_classes (a label)")
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.patch_size, self.hidden_size = patch_size, hidden_size
        self.context_dim, self.y_dim, self.num_classes = context_dim, y_dim, num_classes
        self.concat_channels = concat_channels
        self.gradient_checkpointing = gradient_checkpointing
        self.init_masking(mask_ratio, hidden_size)
        self.patchify = nn.Conv2d(in_channels + concat_channels, hidden_size, patch_size, stride=patch_size)
        self.time_embed = TimestepEmbedding(256, hidden_size)  # DiT's 256 frequencies, then an MLP
        self.y_embed = label_or_vector_embedder(num_classes, y_dim, hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        init_dit_weights(self, [*(block.modulation[-1] for block in self.blocks), self.modulation_out[-1],
                                self.proj_out])
        self.init_mask_token()

    def _check(self, x: Tensor, context: Tensor | None, y: Tensor | None, concat: Tensor | None) -> None:
        p = self.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"input of size {tuple(x.shape[-2:])}: height and width must be divisible by the patch "
                             f"size {p}")
        if self.context_dim is not None and context is None:
            raise ValueError(f"this DiT cross-attends to a context: pass context (B, T, {self.context_dim})")
        if self.y_embed is not None and y is None:
            raise ValueError("this DiT is conditioned on y (a class label or a vector): pass y")
        if self.concat_channels and (concat is None or concat.shape[1] != self.concat_channels):
            raise ValueError(f"this DiT concatenates {self.concat_channels} channels to its input: pass concat")

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None,
                y: Tensor | None = None, concat: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), t (B,) noise conditioning -> prediction (B, out_channels, H, W)."""
        self._check(x, context, y, concat)
        b, _, height, width = x.shape
        p = self.patch_size
        h = torch.cat([x, concat.to(x.dtype)], dim=1) if self.concat_channels else x
        tokens = rearrange(self.patchify(h), "b d h w -> b (h w) d")  # (B, N, D)
        pos = sincos_2d(width // p, height // p, self.hidden_size, x.device).to(tokens.dtype)  # (N, D)
        tokens = tokens + pos  # (B, N, D)
        tokens = self.drop(tokens, (height // p, width // p))  # (B, N_keep, D): patch masking in training
        c = self.time_embed(t)  # (B, D)
        if self.y_embed is not None:
            c = c + self.y_embed(y if self.num_classes is not None else y.to(c.dtype))
        if context is not None:
            context = context.to(c.dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, context, context_mask, use_reentrant=False)
            else:
                tokens = block(tokens, c, context, context_mask)
        tokens = self.restore(tokens, pos)  # (B, N, D): the dropped positions the mask token at its position
        shift, scale = self.modulation_out(c).chunk(2, dim=1)
        out = self.proj_out(modulate(self.norm_out(tokens), shift, scale))  # (B, N, p * p * C_out)
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=height // p, w=width // p, p=p, q=p)


def count_tokens(image_side: int, patch_size: int) -> int:
    """Tokens of a square latent of side ``image_side`` at patch ``patch_size``."""
    return math.ceil(image_side / patch_size) ** 2


def null_class(model: DiT) -> int:
    """The label of the extra null class (classifier-free guidance, dropped labels)."""
    if model.num_classes is None:
        raise ValueError("this DiT is not class-conditional")
    return model.num_classes


__all__ = ["DiT", "DiTBlock", "PRESETS", "count_tokens", "init_dit_weights", "modulate", "null_class", "sincos_2d"]
