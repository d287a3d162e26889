"""Retrieval recall@k and zero-shot accuracy over normalised embeddings.

``recall_at_k``: image i and text i are a pair; image->text R@k is the fraction of images
whose paired text is among the k most similar texts (cosine), and text->image the reverse.
Computed on the full set of embeddings; the system gathers them exactly over ranks first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def recall_at_k(image: Tensor, text: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``{"i2t_R@1": ..., "t2i_R@1": ...}`` for (N, D) image and text embeddings of N pairs."""
    if image.shape != text.shape:
        raise ValueError(f"need one text per image, got {tuple(image.shape)} and {tuple(text.shape)}")
    sim = image.float() @ text.float().t()  # (N, N)
    n = len(sim)
    target = torch.arange(n, device=sim.device)
    out = {}
    for direction, s in (("i2t", sim), ("t2i", sim.t())):
        # rank of the true match = number of candidates scoring strictly higher
        rank = (s > s[target, target][:, None]).sum(dim=1)
        for k in ks:
            out[f"{direction}_R@{k}"] = float((rank < k).float().mean()) if n else float("nan")
    return out


def class_embeddings(embed_texts: Callable[[list[str]], Tensor], classes: Sequence[str],
                     templates: Sequence[str]) -> Tensor:
    """(C, D): per class, the normalised mean of its normalised template embeddings (Radford et al. 2021)."""
    prompts = [t.format(c) for c in classes for t in templates]
    emb = embed_texts(prompts).reshape(len(classes), len(templates), -1)
    emb = torch.nn.functional.normalize(emb, dim=-1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1)


def zero_shot_accuracy(image: Tensor, classes: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of nearest-class prediction, over rows with a label >= 0."""
    keep = labels >= 0
    if not keep.any():
        return float("nan")
    pred = (image[keep].float() @ classes.float().t()).argmax(dim=1)
    return float((pred == labels[keep]).float().mean())
