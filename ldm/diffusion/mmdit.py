"""SD3's multimodal diffusion transformer (MMDiT, Esser et al. 2024, sec. 4 and fig. 2) as a third backbone.

Read top to bottom:

* patchify and 2-d sin-cos positions as :class:`~ldm.diffusion.DiT`'s; text tokens (B, T, context_dim) enter
  through a linear ``context_embedder`` to the model width;
* the condition vector c = timestep embedding + MLP of the pooled text vector ``y`` (fig. 2a);
* ``depth`` joint blocks (fig. 2b): image tokens and text tokens are two streams, each with its own weights
  (adaLN-Zero modulation from c, q / k / v, output projection, MLP), and one attention over the concatenation of
  the two sequences, so either modality reads the other. A ``context_mask`` hides padded text tokens from every
  query of the joint attention. The last block's text stream is "pre-only" (SD3's ``pre_only``, diffusers'
  ``context_pre_only``): its tokens feed the last attention as keys and values, and nothing of the text is
  computed after it (a shift / scale modulation only: no gates, no output projection, no MLP);
* optional qk-norm (SD3.5, sec. 5.3.2 of the paper: RMSNorm on each head's queries and keys, per stream);
* final layer: adaLN-modulated LayerNorm, a linear to p * p * out_channels, unpatchify.

The block follows SD3's reference code (Stability-AI/sd3-ref ``mmdit.py``: ``DismantledBlock.pre_attention`` /
``post_attention`` and ``block_mixing``), with diffusers' ``SD3Transformer2DModel`` weights one to one: for the same
config the parameter counts are equal (SD3-medium: 2,028,328,000; tests/diffusion/test_mmdit.py) and diffusers'
weights loaded into ours give the same output (the modulations of the pre-only stream and the final layer are
(shift, scale) here, as in SD3's code, and (scale, shift) in diffusers'; image tokens come first in the joint
sequence, as in diffusers; the order does not change the attention).

Positions are computed for the input's grid on every call, never stored: with ``pos_embed_max_size`` they are SD3's
(the centre crop of a ``pos_embed_max_size``-square table whose ``sample_size / patch_size`` patches span unit
steps, i.e. positions (top + i) * base / max), equal to diffusers' cropped table, which it keeps as a persistent
buffer (SD3-medium: 192^2 x 1536 = 56,623,104 numbers, not parameters, on neither side of the count); without it
they are the integer grid of DiT / MAE (:func:`~ldm.diffusion.dit.sincos_2d`).

Initialisation is DiT's (xavier linears, zero adaLN modulations and a zero final layer): a fresh model predicts 0
and every block is the identity on both streams. diffusers' model keeps PyTorch's default initialisation (SD3
released no training code): its fresh model predicts noise.

It takes what :class:`~ldm.diffusion.UNet` and :class:`~ldm.diffusion.DiT` take,
``forward(x, t, context=, context_mask=, y=, concat=)``, with the attributes the :class:`~ldm.diffusion.Conditioner`
checks (``context_dim``, ``y_dim``, ``num_classes``, ``concat_channels``), so a config swaps one for another.
Patch masking (:mod:`ldm.diffusion.patch_masking`, as the DiT's): with ``mask_ratio`` > 0, in training the joint
blocks see the kept image tokens only (and every text token); the dropped positions get the mask token before the
final layer. REPA (:class:`~ldm.diffusion.repa.RepresentationAlignment`) aligns the image stream of a joint block.
Not here: SD3.5's MMDiT-X dual attention layers (a second, image-only attention in the first blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.diffusion.dit import init_dit_weights, label_or_vector_embedder, modulate
from ldm.diffusion.patch_masking import PatchMasking
from ldm.nn import TimestepEmbedding


def sincos_positions(rows: Tensor, cols: Tensor, dim: int) -> Tensor:
    """2-d sin-cos features (len(rows) * len(cols), dim) of a grid at (fractional) row and column positions,
    row-major; the layout of :func:`~ldm.diffusion.dit.sincos_2d` (which is the integer grid): half the channels
    encode the column, half the row, each as [sin, cos] of pos / 10000^(2i / (dim / 2))."""
    if dim % 4:
        raise ValueError(f"the width {dim} must be divisible by 4 for 2-d sin-cos positions")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=rows.device) / (dim / 4))  # (dim/4,)

    def encode(pos: Tensor) -> Tensor:
        args = pos.reshape(-1, 1).double() * omega[None]  # (N, dim/4)
        return torch.cat([args.sin(), args.cos()], dim=1)  # (N, dim/2)

    r, c = torch.meshgrid(rows.double(), cols.double(), indexing="ij")  # (H, W) each
    return torch.cat([encode(c), encode(r)], dim=1).float()  # (H*W, dim)


class JointAttention(nn.Module):
    """One attention over [image tokens; text tokens], each stream with its own q / k / v (and qk-norm)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False, context_pre_only: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))  # image stream
        self.ctx_q, self.ctx_k, self.ctx_v = (nn.Linear(dim, dim) for _ in range(3))  # text stream
        norm = (lambda: nn.RMSNorm(self.head_dim, eps=1e-6)) if qk_norm else nn.Identity
        self.norm_q, self.norm_k, self.norm_ctx_q, self.norm_ctx_k = norm(), norm(), norm(), norm()
        self.to_out = nn.Linear(dim, dim)
        self.ctx_out = None if context_pre_only else nn.Linear(dim, dim)

    def _heads(self, t: Tensor) -> Tensor:
        return rearrange(t, "b n (h d) -> b h n d", h=self.heads)

    def forward(self, x: Tensor, ctx: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x (B, N, D) and ctx (B, T, D), modulated; mask (B, T), True on real text tokens -> (x (B, N, D),
        ctx (B, T, D) or None for a pre-only text stream)."""
        n = x.shape[1]
        q = torch.cat([self.norm_q(self._heads(self.to_q(x))), self.norm_ctx_q(self._heads(self.ctx_q(ctx)))], dim=2)
        k = torch.cat([self.norm_k(self._heads(self.to_k(x))), self.norm_ctx_k(self._heads(self.ctx_k(ctx)))], dim=2)
        v = torch.cat([self._heads(self.to_v(x)), self._heads(self.ctx_v(ctx))], dim=2)  # (B, heads, N + T, d) each
        attn_mask = None
        if mask is not None:  # image keys always visible: no query is left without a key
            keys = torch.cat([mask.new_ones(mask.shape[0], n, dtype=torch.bool), mask.bool()], dim=1)  # (B, N + T)
            attn_mask = keys[:, None, None, :]  # (B, 1, 1, N + T)
        out = rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask), "b h n d -> b n (h d)")
        x_out, ctx_out = out[:, :n], out[:, n:]  # (B, N, D), (B, T, D)
        return self.to_out(x_out), None if self.ctx_out is None else self.ctx_out(ctx_out)


class JointBlock(nn.Module):
    """MMDiT block (fig. 2b): per stream, h = mod(LN h) -> joint attention -> h + g1 * attn; h + g2 * MLP(mod(LN h)).
    ``context_pre_only``: the text stream stops after its q / k / v (shift / scale modulation only)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 context_pre_only: bool = False):
        super().__init__()
        self.context_pre_only = context_pre_only
        hidden = int(dim * mlp_ratio)

        def mlp() -> nn.Sequential:
            return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm1_ctx = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.modulation_ctx = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if context_pre_only else 6) * dim))
        self.attn = JointAttention(dim, heads, qk_norm, context_pre_only)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp()
        self.norm2_ctx = None if context_pre_only else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp_ctx = None if context_pre_only else mlp()

    def forward(self, x: Tensor, ctx: Tensor, c: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x (B, N, D) image tokens, ctx (B, T, D) text tokens, c (B, D) -> (x, ctx; None after a pre-only block)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=1)  # (B, D) each
        mods = self.modulation_ctx(c).chunk(2 if self.context_pre_only else 6, dim=1)  # (B, D) each
        x_attn, ctx_attn = self.attn(modulate(self.norm1(x), shift1, scale1),
                                     modulate(self.norm1_ctx(ctx), mods[0], mods[1]), mask)
        x = x + gate1[:, None] * x_attn  # (B, N, D)
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        if self.context_pre_only:
            return x, None
        _, _, c_gate1, c_shift2, c_scale2, c_gate2 = mods
        ctx = ctx + c_gate1[:, None] * ctx_attn  # (B, T, D)
        ctx = ctx + c_gate2[:, None] * self.mlp_ctx(modulate(self.norm2_ctx(ctx), c_shift2, c_scale2))
        return x, ctx


class MMDiT(PatchMasking, nn.Module):
    """Args:
        in_channels: channels of the noisy input (latent channels).
        out_channels: channels of the prediction (default: in_channels).
        patch_size: p, the side of a patch.
        hidden_size, depth, num_heads: width (SD3: 64 x depth), blocks and heads (SD3: depth).
        context_dim: width of the text tokens (B, T, context_dim) (SD3: 4096, its T5 / CLIP-padded tokens).
        y_dim: width of the pooled text vector (B, y_dim) embedded into c (SD3: 2048, its two CLIPs' pooled
            features); None: c is the timestep embedding alone.
        num_classes: class labels (B,) embedded into c instead of ``y_dim`` (with one extra null class).
        mlp_ratio: MLP width / model width.
        qk_norm: RMSNorm on queries and keys (SD3.5).
        pos_embed_max_size, sample_size: SD3's position table (side in patches) and the latent side whose patches
            span unit steps of it (diffusers' ``pos_embed_max_size`` and ``sample_size``); None: the integer grid.
        concat_channels: extra channels concatenated to the input (inpainting).
        gradient_checkpointing: recompute each block's activations in the backward pass.
        mask_ratio: in training, the share of image tokens dropped before the blocks (patch masking; 0 = off;
            MicroDiT 0.75). A model built with it > 0 has a learned mask token; it can be set to 0 later.
    """

    def __init__(self, in_channels: int = 4, out_channels: int | None = None, patch_size: int = 2,
                 hidden_size: int = 384, depth: int = 6, num_heads: int = 6, context_dim: int = 768,
                 y_dim: int | None = None, num_classes: int | None = None, mlp_ratio: float = 4.0,
                 qk_norm: bool = False, pos_embed_max_size: int | None = None, sample_size: int | None = None,
                 concat_channels: int = 0, gradient_checkpointing: bool = False, mask_ratio: float = 0.0):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        if not context_dim:
            raise ValueError("an MMDiT attends jointly to text tokens: give context_dim (their width)")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if y_dim is not None and num_classes is not None:
            raise ValueError("give at most one of y_dim (a vector) and num_classes (a label)")
        if pos_embed_max_size is not None and sample_size is None:
            raise ValueError("pos_embed_max_size needs sample_size (the latent side its patches span at unit steps)")
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.patch_size, self.hidden_size = patch_size, hidden_size
        self.context_dim, self.y_dim, self.num_classes = context_dim, y_dim, num_classes
        self.concat_channels = concat_channels
        self.pos_embed_max_size, self.sample_size = pos_embed_max_size, sample_size
        self.gradient_checkpointing = gradient_checkpointing
        self.init_masking(mask_ratio, hidden_size)
        self.patchify = nn.Conv2d(in_channels + concat_channels, hidden_size, patch_size, stride=patch_size)
        self.time_embed = TimestepEmbedding(256, hidden_size)  # 256 frequencies, then an MLP (SD3's, DiT's)
        self.y_embed = label_or_vector_embedder(num_classes, y_dim, hidden_size)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        self.blocks = nn.ModuleList(JointBlock(hidden_size, num_heads, mlp_ratio, qk_norm, i == depth - 1)
                                    for i in range(depth))
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation (:func:`~ldm.diffusion.dit.init_dit_weights`), both streams' modulations at zero."""
        layers = [self.modulation_out[-1], self.proj_out]
        for block in self.blocks:
            layers += [block.modulation[-1], block.modulation_ctx[-1]]
        init_dit_weights(self, layers)
        self.init_mask_token()

    def positions(self, height: int, width: int, device=None) -> Tensor:
        """(height * width, D) sin-cos positions of a grid of patches (SD3's crop, or the integer grid)."""
        rows = torch.arange(height, dtype=torch.float64, device=device)
        cols = torch.arange(width, dtype=torch.float64, device=device)
        if self.pos_embed_max_size is not None:
            size = self.pos_embed_max_size
            if height > size or width > size:
                raise ValueError(f"a grid of {height} x {width} patches exceeds pos_embed_max_size {size}")
            step = (self.sample_size // self.patch_size) / size  # diffusers' grid / (grid_size / base_size)
            rows, cols = (rows + (size - height) // 2) * step, (cols + (size - width) // 2) * step
        return sincos_positions(rows, cols, self.hidden_size)

    def _check(self, x: Tensor, context: Tensor | None, context_mask: Tensor | None, y: Tensor | None,
               concat: Tensor | None) -> None:
        p = self.patch_size
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"input of size {tuple(x.shape[-2:])}: height and width must be divisible by the patch "
                             f"size {p}")
        if context is None or context.ndim != 3 or context.shape[-1] != self.context_dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"this MMDiT attends jointly to text: pass context (B, T, {self.context_dim}), got {got}")
        if context_mask is not None and context_mask.shape != context.shape[:2]:
            raise ValueError(f"context_mask must be (B, T) = {tuple(context.shape[:2])}, got "
                             f"{tuple(context_mask.shape)}")
        if self.y_embed is not None and y is None:
            raise ValueError("this MMDiT is conditioned on y (the pooled text vector or a class label): pass y")
        if self.y_dim is not None and y is not None and (y.ndim != 2 or y.shape[-1] != self.y_dim):
            raise ValueError(f"y must be (B, {self.y_dim}), got {tuple(y.shape)}")
        if self.concat_channels and (concat is None or concat.shape[1] != self.concat_channels):
            raise ValueError(f"this MMDiT concatenates {self.concat_channels} channels to its input: pass concat")

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None,
                y: Tensor | None = None, concat: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), t (B,) noise conditioning, context (B, T, context_dim) text tokens, context_mask (B, T)
        True on real tokens, y (B, y_dim) pooled text -> prediction (B, out_channels, H, W)."""
        self._check(x, context, context_mask, y, concat)
        b, _, height, width = x.shape
        p = self.patch_size
        h = torch.cat([x, concat.to(x.dtype)], dim=1) if self.concat_channels else x
        tokens = rearrange(self.patchify(h), "b d h w -> b (h w) d")  # (B, N, D)
        pos = self.positions(height // p, width // p, x.device).to(tokens.dtype)  # (N, D)
        tokens = self.drop(tokens + pos, (height // p, width // p))  # (B, N_keep, D): patch masking in training
        c = self.time_embed(t)  # (B, D)
        if self.y_embed is not None:
            c = c + self.y_embed(y if self.num_classes is not None else y.to(c.dtype))
        ctx = self.context_embedder(context.to(c.dtype))  # (B, T, D)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens, ctx = checkpoint(block, tokens, ctx, c, context_mask, use_reentrant=False)
            else:
                tokens, ctx = block(tokens, ctx, c, context_mask)
        tokens = self.restore(tokens, pos)  # (B, N, D): the dropped positions the mask token at its position
        shift, scale = self.modulation_out(c).chunk(2, dim=1)
        out = self.proj_out(modulate(self.norm_out(tokens), shift, scale))  # (B, N, p * p * C_out)
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=height // p, w=width // p, p=p, q=p)


__all__ = ["JointAttention", "JointBlock", "MMDiT", "sincos_positions"]
