"""Retrieval recall@k and zero-shot accuracy over normalised embeddings.

``recall_at_k``: image i and text i are a pair; image->text R@k is the fraction of images
whose paired text is among the k most similar texts (cosine), and text->image the reverse.
Computed on the full set of embeddings; the system gathers them exactly over ranks first.
R@k is open_clip_train's (``get_clip_metrics``: the rank of the true match is its position in
``argsort(descending=True)`` of its row), with ties settled: where candidates score exactly as
the true match (duplicate captions or images), open_clip's unstable argsort leaves their order
to the sort implementation (torch 2.14 on the CPU: neither index order nor its reverse), so we
rank the true match behind all of them: a tie is never a hit. Equal to open_clip_train's figure
where nothing ties, never above it where something does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def recall_at_k(image: Tensor, text: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``{"i2t_R@1": ..., "t2i_R@1": ...}`` for (N, D) image and text embeddings of N pairs.

    The rank of the true match is its position in a stable descending sort of its row with the true
    match listed last (open_clip_train's ``get_clip_metrics`` with the ground truth losing ties): the
    number of other candidates scoring at least as high. Of two identical captions neither is found at
    rank 0; counting ties as hits (before issue 15) inflated R@k on data with duplicate captions.
    """
    if image.shape != text.shape:
        raise ValueError(f"need one text per image, got {tuple(image.shape)} and {tuple(text.shape)}")
    sim = image.float() @ text.float().t()  # (N, N)
    n = len(sim)
    target = torch.arange(n, device=sim.device)
    out = {}
    for direction, s in (("i2t", sim), ("t2i", sim.t())):
        # rank of the true match = number of other candidates scoring at least as high (it loses ties)
        rank = (s >= s[target, target][:, None]).sum(dim=1) - 1  # (N,)
        for k in ks:
            out[f"{direction}_R@{k}"] = int((rank < k).sum()) / n if n else float("nan")  # exact fraction
    return out


def class_embeddings(model, classes: Sequence[str], templates: Sequence[str]) -> Tensor:
    """(C, D): per class, the normalised mean of its normalised template embeddings (Radford et al. 2021),
    by ``open_clip.build_zero_shot_classifier`` (transposed), all prompts in one batch.

    ``model``: a CLIP with ``encode_text(tokens, normalize=True)`` and its ``tokenizer``
    (:class:`~ldm.contrastive.OpenCLIP`).
    """
    import open_clip

    device = next(model.parameters()).device
    weights = open_clip.build_zero_shot_classifier(model, model.tokenizer, list(classes), list(templates),
                                                   num_classes_per_batch=None, device=device)  # (D, C)
    return weights.t()


def zero_shot_accuracy(image: Tensor, classes: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of nearest-class prediction, over rows with a label >= 0."""
    keep = labels >= 0
    if not keep.any():
        return float("nan")
    pred = (image[keep].float() @ classes.float().t()).argmax(dim=1)
    return float((pred == labels[keep]).float().mean())
