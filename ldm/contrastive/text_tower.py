"""A CLIP text tower without an image tower: the text encoder of Stable Diffusion 1.x, or any text transformer
imported from another format (``ldm convert``).

It is open_clip's own ``TextTransformer`` (built by open_clip from a ``CLIPTextCfg``), so open_clip loads its
weights file unchanged: ``TextTransformer.load_state_dict``. The file is a ``.safetensors`` or a weights-only
``torch.save`` of that state dict. The tokenizer is open_clip's: its BPE ``SimpleTokenizer`` (pads with 0), or a
Hugging Face tokenizer folder wrapped in open_clip's ``HFTokenizer`` (e.g. the ``tokenizer/`` folder of a
diffusers pipeline: Stable Diffusion 1.x pads with the end token, which changes every position after the text).

:class:`~ldm.contrastive.FrozenTextEncoder` reads it like a full CLIP (``text_features`` takes the custom-text
path); what needs an image tower (CLIP score, CLIP guidance, image embeddings) says there is none.
"""

from __future__ import annotations

import os
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIPTextCfg, _build_text_tower
from torch import nn


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a weights-only ``torch.save`` file (``.pt`` / ``.bin``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class TextTower(nn.Module):
    """Args:
        text: the open_clip text-tower config (width, heads, layers, context length, vocabulary, pooling, ...).
        embed_dim: width of the pooled embedding (the projection's output); None = the tower's width, with
            ``text.proj_type: none`` (a text model without projection, as Stable Diffusion's).
        quick_gelu: OpenAI CLIP's activation x * sigmoid(1.702 x) instead of GELU.
        pretrained: the tower's weights (``TextTransformer`` state dict: ``.safetensors`` or ``.pt``).
        tokenizer: a Hugging Face tokenizer folder (local); None = open_clip's BPE tokenizer.
    """

    def __init__(self, text: CLIPTextCfg, embed_dim: int | None = None, quick_gelu: bool = False,
                 pretrained: str | None = None, tokenizer: str | None = None):
        super().__init__()
        self.text = _build_text_tower(embed_dim or text.width, text, quick_gelu=quick_gelu)
        if pretrained is not None:
            state = read_state_dict(pretrained)
            try:
                self.text.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(f"{pretrained} does not match the text tower config: {e}") from None
        if tokenizer is not None:
            folder = Path(tokenizer).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
            self.tokenizer = open_clip.tokenizer.HFTokenizer(str(folder), context_length=text.context_length)
        else:
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=text.context_length)

    @property
    def clip(self) -> "TextTower":
        """What :func:`~ldm.contrastive.text_encoder.text_features` reads: a model with a ``text`` tower."""
        return self

    has_image_tower = False

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(tokens)  # (B, D)
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_image(self, images: torch.Tensor, normalize: bool = True):
        raise ValueError("this text encoder has no image tower (an imported text model): CLIP score, CLIP guidance "
                         "and image embeddings need a CLIP; pass one (ldm eval --clip RUN)")
