"""The batch dictionary every data module yields and every system consumes.

Keys (all optional except ``image`` for image data):

============  =====================  ==================================================
key           type / shape           meaning
============  =====================  ==================================================
image         float (B, 3, H, W)     pixels in [-1, 1] (absent with data.decode_images=false)
latent        float (B, C, h, w)     scaled autoencoder latents (``latent.npy``, ldm precompute latents)
latent_std    float (B, C, h, w)     posterior std of a KL autoencoder (``latent_std.npy``, if written)
text          list[str] (B)          captions, as stored in the shard
tokens        long (B, T)            captions tokenized by the model's tokenizer
meta          list[dict] (B)         the shard's ``json`` metadata ({} when absent)
key           list[str] (B)          sample keys (``__key__``)
valid         bool (B)               False for padding rows of evaluation batches; metrics
                                     must ignore them (ranks are padded to equal length)
============  =====================  ==================================================

Every ``NAME.npy`` array in a shard becomes the tensor ``batch[NAME]``; later stages add
``clip_text`` (B, D), ``clip_image`` (B, D) and ``clip_tokens`` (B, T, D) that way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import torch

Tokenizer = Callable[[list[str]], torch.Tensor]


class Batch(TypedDict, total=False):
    image: torch.Tensor
    latent: torch.Tensor
    latent_std: torch.Tensor
    text: list[str]
    tokens: torch.Tensor
    meta: list[dict[str, Any]]
    key: list[str]
    valid: torch.Tensor


def collate(samples: Sequence[dict[str, Any]], tokenizer: Tokenizer | None = None) -> Batch:
    """Stack decoded samples into a :class:`Batch`; tokenize the captions if a tokenizer is given."""
    batch: Batch = {
        "text": [s["text"] for s in samples],
        "meta": [s.get("meta", {}) for s in samples],
        "key": [s["key"] for s in samples],
    }
    for name, value in samples[0].items():  # image, latent, clip_* ...: stacked along the batch
        if isinstance(value, torch.Tensor) and all(isinstance(s.get(name), torch.Tensor) for s in samples):
            batch[name] = torch.stack([s[name] for s in samples])
    if any("valid" in s for s in samples):
        batch["valid"] = torch.tensor([bool(s.get("valid", True)) for s in samples])
    if tokenizer is not None:
        batch["tokens"] = tokenizer(batch["text"])
    return batch
