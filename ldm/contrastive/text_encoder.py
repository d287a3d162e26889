"""A frozen CLIP text encoder for the diffusion stages: per-token features, mask, pooled embedding.

Built from one of our contrastive runs (``checkpoint``: a run folder or a .ckpt in one) or
from a pretrained open_clip file (``model_name`` + ``pretrained`` path, e.g. the OpenCLIP
ViT-H/14 that Stable Diffusion 2 conditions on). ``forward(tokens)`` returns

* ``tokens`` (B, T, W): the text transformer's output after the final LayerNorm, the
  sequence the U-Net cross-attends to and the prior reads;
* ``mask`` (B, T): True on real tokens (start, words, end), False on padding;
* ``pooled`` (B, D): the normalised text embedding (CLIP's joint space).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

from ldm.contrastive.model import OpenCLIP


class FrozenTextEncoder(nn.Module):
    def __init__(self, checkpoint: str | None = None, model_name: str | None = None, pretrained: str | None = None):
        super().__init__()
        if (checkpoint is None) == (model_name is None):
            raise ValueError("give either checkpoint (a contrastive run) or model_name (+ pretrained file)")
        if checkpoint is not None:
            from ldm.systems.loading import load_clip

            self.model = load_clip(checkpoint)
        else:
            self.model = OpenCLIP(model_name=model_name, pretrained=pretrained)
        self.model.eval().requires_grad_(False)
        probe = self(self.tokenizer([""]))["tokens"]  # (1, T, W)
        self.context_length, self.width = probe.shape[1], probe.shape[2]

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def train(self, mode: bool = True) -> "FrozenTextEncoder":
        return super().train(False)  # frozen: always in eval mode

    def encode_prompts(self, prompts: list[str], device: torch.device | str | None = None) -> dict[str, Tensor]:
        """Tokenize and encode a list of prompts (for sampling)."""
        tokens = self.tokenizer(list(prompts)).to(device or next(self.model.parameters()).device)
        return self(tokens)

    @torch.no_grad()
    def forward(self, tokens: Tensor) -> dict[str, Tensor]:
        clip = self.model.clip
        if hasattr(clip, "text"):  # CustomTextCLIP: the tower returns (pooled, tokens) when asked
            clip.text.output_tokens = True
            pooled, feats = clip.text(tokens)
        else:
            cast = clip.transformer.get_cast_dtype()
            x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding.to(cast)  # (B, T, W)
            x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))  # (B, T, W)
            feats = x
            pooled = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
            proj = clip.text_projection
            if proj is not None:
                pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return {"tokens": feats, "mask": tokens != 0, "pooled": F.normalize(pooled, dim=-1)}
