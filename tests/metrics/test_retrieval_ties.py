"""Retrieval R@k: open_clip_train's ranking, the true match losing ties (issue 15, defect 3)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm.metrics import recall_at_k


def open_clip_recall(image, text, ks=(1, 5, 10), gt_loses_ties=True):
    """open_clip_train's ``get_clip_metrics`` (``train.py``), its ranking lines verbatim at logit scale 1;
    with ``gt_loses_ties`` each row is sorted stably with its true match moved to the end."""
    logits_per_image = (image @ text.t()).detach().cpu()
    logits = {"i2t": logits_per_image, "t2i": logits_per_image.t().detach().cpu()}
    ground_truth = torch.arange(len(text)).view(-1, 1)
    out = {}
    for name, logit in logits.items():
        if gt_loses_ties:
            n = len(logit)  # per row: the other candidates in index order, then the true match
            order = torch.stack([torch.cat([torch.arange(i), torch.arange(i + 1, n), torch.tensor([i])])
                                 for i in range(n)])  # (N, N)
            ranking = order.gather(1, torch.argsort(logit.gather(1, order), descending=True, stable=True))
        else:
            ranking = torch.argsort(logit, descending=True)
        preds = torch.where(ranking == ground_truth)[1].numpy()
        for k in ks:
            out[f"{name}_R@{k}"] = float(np.mean(preds < k))
    return out


def _embeddings(case: str, n: int = 200, d: int = 16, seed: int = 0):
    """(image, text): distinct pairs, duplicate captions (20 texts for 200 images), or duplicates on both sides."""
    g = torch.Generator().manual_seed(seed)
    if case == "distinct":
        text = F.normalize(torch.randn(n, d, generator=g), dim=-1)
        return F.normalize(text + 0.8 * torch.randn(n, d, generator=g), dim=-1), text
    which = torch.randint(0, 20, (n,), generator=g)
    text = F.normalize(torch.randn(20, d, generator=g), dim=-1)[which]  # (n, d), each caption ~10 times
    if case == "duplicate captions":
        return F.normalize(text + 0.8 * torch.randn(n, d, generator=g), dim=-1), text
    image = F.normalize(text + 0.8 * torch.randn(20, d, generator=g)[which], dim=-1)  # duplicate images too
    return image, text


def test_a_tie_with_the_true_match_is_not_a_hit():
    # images 0..3 are e0..e3; captions 0 and 1 are one text, (e0 + e1) / sqrt 2: tied for images 0 and 1
    image, text = torch.eye(4), torch.eye(4)
    text[0] = text[1] = F.normalize(torch.tensor([1.0, 1.0, 0.0, 0.0]), dim=0)
    # images 0 and 1 each have the other caption tied with theirs: rank 1; texts 0 and 1 likewise.
    # Counting ties as hits gave R@1 1.0 both ways.
    assert recall_at_k(image, text, ks=(1, 2)) == {"i2t_R@1": 0.5, "i2t_R@2": 1.0, "t2i_R@1": 0.5, "t2i_R@2": 1.0}


@pytest.mark.parametrize("case", ["distinct", "duplicate captions", "duplicate pairs"])
def test_recall_equals_open_clips_formula_with_the_true_match_losing_ties(case):
    image, text = _embeddings(case)
    ours, theirs = recall_at_k(image, text), open_clip_recall(image, text)
    assert ours == pytest.approx(theirs, abs=1e-6), (ours, theirs)
    if case == "distinct":  # no ties: whatever order the sort gives ties, open_clip's figures
        assert ours == pytest.approx(open_clip_recall(image, text, gt_loses_ties=False), abs=1e-6)
    else:  # ties, and fewer hits than counting every tie as one
        sim = image @ text.t()
        assert (sim == sim.diagonal()[:, None]).sum() > 2 * len(sim)
        assert ours["i2t_R@1"] < float(((sim > sim.diagonal()[:, None]).sum(dim=1) < 1).float().mean())


def test_recall_equals_open_clip_train_without_ties_and_never_exceeds_it_with_ties():
    train = pytest.importorskip("open_clip_train.train")
    for case in ("distinct", "duplicate captions", "duplicate pairs"):
        image, text = _embeddings(case, seed=1)
        theirs = train.get_clip_metrics(image, text, torch.tensor(1.0))
        ours = recall_at_k(image, text, ks=(1, 5, 10))
        for ours_key, their_key in (("i2t", "image_to_text"), ("t2i", "text_to_image")):
            for k in (1, 5, 10):
                a, b = ours[f"{ours_key}_R@{k}"], float(theirs[f"{their_key}_R@{k}"])
                ok = a == pytest.approx(b, abs=1e-6) if case == "distinct" else a <= b + 1e-6
                assert ok, (case, ours_key, k, a, b)
