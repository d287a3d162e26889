"""Transformer blocks over feature maps: the spatial transformer of the LDM U-Net.

Rombach et al. 2022, sec. 3.3 and appendix: image features are the queries of a
cross-attention whose keys and values are a conditioning sequence (text tokens),
``softmax(Q K^T / sqrt(d)) V`` with ``Q = W_q phi(z)``, ``K = W_k tau(y)``, ``V = W_v tau(y)``.
A block is pre-LayerNorm self-attention, cross-attention and a GEGLU feed-forward
(Shazeer 2020), each residual; the spatial transformer wraps blocks between a GroupNorm +
input projection and a zero-initialised output projection, so a fresh block is the identity.

Attention runs through ``scaled_dot_product_attention`` (flash / memory-efficient kernels
where available). A context mask (B, T), True on real tokens, hides padding from the
queries; a row with no real token (a dropped condition) attends to all positions
instead of producing NaN. A (B, N, T) mask restricts each query separately (causal masks).
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.nn.blocks import group_norm


class Attention(nn.Module):
    """Multi-head attention of queries (B, N, dim) over a context (B, T, context_dim), or self-attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, dropout: float = 0.0,
                 qkv_bias: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        #: set to a callable (probs (B, heads, N, T)) -> None to receive the attention weights
        #: (computed explicitly, so only when asked: attention-map tools use it)
        self.probe = None

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)  # (B, heads, N, d)
        k = rearrange(self.to_k(context), "b t (h d) -> b h t d", h=self.heads)  # (B, heads, T, d)
        v = rearrange(self.to_v(context), "b t (h d) -> b h t d", h=self.heads)  # (B, heads, T, d)
        attn_mask = None
        if mask is not None:
            mask = mask.bool() | ~mask.bool().any(dim=-1, keepdim=True)  # all-padding rows see everything
            # (B, T): which keys every query may see; (B, N, T): per query (causal masks)
            attn_mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]  # (B, 1, 1 or N, T)
        if self.probe is not None:
            scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, heads, N, T)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            probs = scores.softmax(dim=-1)
            self.probe(probs)
            out = probs @ v  # (B, heads, N, d)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, dim)


class GEGLU(nn.Module):
    """Linear to 2 x inner, then ``a * gelu(gate)`` (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, inner) each
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """x + SelfAttn(LN x); x + CrossAttn(LN x, context) (when context_dim); x + FF(LN x)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim) if context_dim else None
        self.attn2 = Attention(dim, heads, head_dim, context_dim, dropout) if context_dim else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                self_mask: Tensor | None = None) -> Tensor:
        """``mask`` (B, T) hides context tokens; ``self_mask`` (B, N, N) or (B, N) restricts self-attention."""
        x = x + self.attn1(self.norm1(x), mask=self_mask)  # (B, N, dim)
        if self.attn2 is not None:
            if context is None:
                raise ValueError("this block cross-attends to a context: pass context (B, T, context_dim)")
            x = x + self.attn2(self.norm2(x), context, mask)  # (B, N, dim)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm -> Linear in -> ``depth`` transformer blocks over the H*W positions -> Linear out (zero-init)."""

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int = 1, context_dim: int | None = None,
                 dropout: float = 0.0, groups: int = 32):
        super().__init__()
        inner = heads * head_dim
        self.norm = group_norm(channels, groups)
        self.proj_in = nn.Linear(channels, inner)
        self.blocks = nn.ModuleList(TransformerBlock(inner, heads, head_dim, context_dim, dropout) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        t = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))  # (B, HW, inner)
        for block in self.blocks:
            t = block(t, context, mask)
        return x + rearrange(self.proj_out(t), "b (h w) c -> b c h w", h=h, w=w)  # (B, C, H, W)
