"""The unCLIP diffusion prior: text -> CLIP image embedding (Ramesh et al. 2022, "DALL-E 2", sec. 2.2).

A decoder-only transformer over the sequence

    [text token features (T), CLIP text embedding, noise-level embedding, noised image embedding, final query]

with a causal attention mask (each position sees itself and the positions before it; padded
text tokens are hidden). The output at the final query, after a LayerNorm and a linear map, is
the network's prediction for the image embedding; what it predicts (x0 in DALL-E 2, or eps / v)
is the preconditioner's business (:mod:`ldm.diffusion.precond`), as for the U-Net.

Called ``prior(x, t, text_emb=, text_tokens=, text_mask=)`` with ``x`` the scaled noisy image
embedding (B, D) and ``t`` the preconditioner's noise conditioning (B,); token features are
optional (``token_dim=None``). Blocks are the pre-LayerNorm transformer blocks of
:mod:`ldm.nn.transformer` (SDPA attention, GEGLU feed-forward).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.nn import TimestepEmbedding, TransformerBlock


class PriorTransformer(nn.Module):
    """Args:
        embed_dim: CLIP embedding width D (text and image embeddings).
        token_dim: width of the text token features (None = no tokens in the sequence).
        max_tokens: longest token sequence (the text encoder's context length).
        width, layers, heads: the transformer's size.
        dropout: attention / feed-forward dropout.
    """

    def __init__(self, embed_dim: int = 512, token_dim: int | None = 512, max_tokens: int = 77, width: int = 512,
                 layers: int = 6, heads: int = 8, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.embed_dim, self.token_dim, self.max_tokens = embed_dim, token_dim, max_tokens
        self.token_proj = nn.Linear(token_dim, width) if token_dim else None
        self.text_proj = nn.Linear(embed_dim, width)
        self.time_embed = TimestepEmbedding(width, width)
        self.x_proj = nn.Linear(embed_dim, width)
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        self.positions = nn.Parameter(torch.randn((max_tokens if token_dim else 0) + 4, width) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, width // heads, None, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, embed_dim)

    def sequence(self, x: Tensor, t: Tensor, text_emb: Tensor, text_tokens: Tensor | None = None,
                 text_mask: Tensor | None = None) -> Tensor:
        """Hidden states of every position (B, L, width), L = T + 4."""
        b = x.shape[0]
        parts, keep = [], []
        if self.token_proj is not None:
            if text_tokens is None:
                raise ValueError(f"this prior reads text token features: pass text_tokens (B, T, {self.token_dim})")
            if text_tokens.shape[1] > self.max_tokens:
                raise ValueError(f"{text_tokens.shape[1]} text tokens, at most {self.max_tokens} (max_tokens)")
            parts.append(self.token_proj(text_tokens.to(self.x_proj.weight.dtype)))  # (B, T, W)
            mask = text_mask if text_mask is not None else torch.ones(text_tokens.shape[:2], dtype=torch.bool)
            keep.append(mask.to(x.device).bool())
        parts += [self.text_proj(text_emb.to(self.x_proj.weight.dtype))[:, None],  # (B, 1, W)
                  self.time_embed(t)[:, None],  # (B, 1, W)
                  self.x_proj(x)[:, None],  # (B, 1, W)
                  self.query.expand(b, 1, -1)]  # (B, 1, W)
        keep.append(torch.ones(b, 4, dtype=torch.bool, device=x.device))
        h = torch.cat(parts, dim=1)  # (B, L, W)
        length = h.shape[1]
        h = h + self.positions[-length:]  # token positions align to the right: the last four are fixed
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()  # (L, L)
        mask = causal[None] & torch.cat(keep, dim=1)[:, None, :]  # (B, L, L): earlier, non-padding keys
        for block in self.blocks:
            h = block(h, self_mask=mask)
        return h

    def forward(self, x: Tensor, t: Tensor, text_emb: Tensor, text_tokens: Tensor | None = None,
                text_mask: Tensor | None = None) -> Tensor:
        """Noisy image embedding x (B, D), noise conditioning t (B,) -> prediction (B, D)."""
        h = self.sequence(x, t, text_emb, text_tokens, text_mask)
        return self.out(self.norm(h[:, -1]))  # (B, D)
