"""Evaluating a text-to-image model: generate for validation captions, then FID / KID / IS,
CLIP score, FD-CLIP and compositional accuracy, exactly over any number of ranks.

The caption set is the first ``n`` samples of a validation shard pattern (in shard order,
with their metadata and real images, read through the data module's exact validation path).
Rank ``r`` of ``w`` generates a contiguous block of whole batches of captions
(:meth:`~ldm.pipelines.distributed.Ranks.block`), image ``i`` from the noise of seed ``seed + i``
(see :class:`~ldm.pipelines.TextToImage`) in the batch one process puts it in, so the images, and
the metrics computed on rank 0 from the features gathered from all ranks, are those of a single process.
Real-image features come from the reference cache (:mod:`ldm.metrics.reference`) when present.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ldm.data import shapes
from ldm.data.datamodule import ShardDataModule
from ldm.data.urls import expand_urls
from ldm.metrics.clip_score import CLIPScore
from ldm.metrics.compositional import CompositionalAccuracy, Verdict
from ldm.metrics.generation import (
    ClipImageFeatures,
    GenerationMetrics,
    InceptionFeatures,
)
from ldm.metrics.reference import load_reference, reference_key, save_reference
from ldm.pipelines.distributed import Ranks
from ldm.pipelines.text_to_image import SamplerSettings, TextToImage

log = logging.getLogger(__name__)

BINDING_PHRASES = {"left_of": "to the left of", "right_of": "to the right of", "above": "on top of", "below": "under"}


@dataclass
class EvalSet:
    captions: list[str]
    metas: list[dict[str, Any]]
    images: Tensor  # (N, 3, H, W) real images in [-1, 1]
    urls: list[str]
    image_size: int

    def __len__(self) -> int:
        return len(self.captions)


def load_eval_set(pattern: str, n: int, image_size: int) -> EvalSet:
    """The first ``n`` samples of a shard pattern (exact validation order) with captions, metadata, images."""
    dm = ShardDataModule(val=pattern, image_size=image_size, batch_size=min(64, n), num_workers=0)
    captions, metas, images = [], [], []
    for batch in dm.val_dataloader():
        valid = batch["valid"]
        captions += [t for t, v in zip(batch["text"], valid.tolist(), strict=True) if v]
        metas += [m for m, v in zip(batch["meta"], valid.tolist(), strict=True) if v]
        images.append(batch["image"][valid])
        if len(captions) >= n:
            break
    if not captions:
        raise ValueError(f"no captioned images in {pattern!r}")
    if len(captions) < n:
        log.warning("only %d samples in %s (asked for %d): evaluating on %d", len(captions), pattern, n, len(captions))
    n = min(n, len(captions))
    return EvalSet(captions[:n], metas[:n], torch.cat(images)[:n], expand_urls(pattern), image_size)


def binding_eval_set(n: int, image_size: int, seed: int = 0) -> EvalSet:
    """Attribute-binding scenes (Ramesh et al. 2022, sec. 7: "a red cube on top of a blue cube"): two objects
    of the same shape and size in different colours, one beside or above the other; real images rendered."""
    rng = np.random.default_rng(seed)
    captions, metas, images, i = [], [], [], 0
    while len(captions) < n:
        base = shapes.sample_scene(seed, i, image_size, "binding")
        i += 1
        if len(base.objects) != 2:
            continue
        a, b = base.objects
        side = a.bbox[2] - a.bbox[0]
        colors = [str(c) for c in rng.choice(list(shapes.COLORS), size=2, replace=False)]
        objects = [shapes.SceneObject(a.shape, colors[k], a.size, box, shapes.COLORS[colors[k]])
                   for k, box in enumerate([a.bbox, (b.bbox[0], b.bbox[1], b.bbox[0] + side, b.bbox[1] + side)])]
        relation = base.relations[0].relation
        if not shapes.relation_holds(objects[0], relation, objects[1]) or max(objects[1].bbox) > image_size:
            continue
        caption = f"{shapes.article(colors[0])} {a.shape} {BINDING_PHRASES[relation]} {shapes.article(colors[1])} {a.shape}"
        scene = shapes.Scene(image_size=image_size, objects=objects, relations=[shapes.Relation(0, relation, 1)],
                             caption=caption, meta={"seed": seed, "split": "binding", "index": i - 1})
        captions.append(caption)
        metas.append(scene.to_json())
        array = np.asarray(shapes.render(scene))
        images.append(torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return EvalSet(captions, metas, torch.stack(images), [f"binding:seed={seed}"], image_size)


@dataclass
class EvalResult:
    """What one evaluation gave. ``metrics`` are those of the whole set, on every rank. On one process, and on
    rank 0 of several after ``keep_images``, ``images`` are the first images of the set (``indices``) and
    ``clip_scores`` / ``verdicts`` those of every image in order; on other ranks, those of their own block."""

    metrics: dict[str, float]
    indices: range  # the global indices of ``images``
    images: Tensor  # (len(indices), 3, H, W) in [-1, 1]
    clip_scores: list[float] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)

    def labels(self, evalset: EvalSet, k: int) -> list[str]:
        """Captions of the first k images with their CLIP score and compositional verdict."""
        out = []
        for i in range(k):
            label = evalset.captions[self.indices[i]]
            if self.clip_scores:
                label += f" | CLIP {self.clip_scores[i]:.1f}"
            if self.verdicts:
                label += f" | {self.verdicts[i].summary()}"
            out.append(label)
        return out


class GenerationEvaluator:
    """Args:
        inception_weights: local Inception file, or ``download`` (torch-fidelity fetches it; needs internet);
            None = FID / KID / IS off (FD-CLIP, CLIP score and compositional accuracy still run).
        clip: an :class:`~ldm.contrastive.OpenCLIP` scorer for CLIP score and FD-CLIP (None = off).
        clip_id: where the scorer came from (a run folder or file), for the reference cache key.
        compositional: check shapes scenes with :class:`~ldm.metrics.compositional.CompositionalAccuracy`.
        batch_size: images per generation / feature batch.
        cache: use the reference feature cache.

    Over several ranks (``evaluate(rank=, world=)``, the default process group initialised) each rank generates
    and featurises its block of whole batches; the features, per-image CLIP scores and verdicts are gathered to
    rank 0 in index order and the metrics computed there on exactly the set one process holds, then sent to
    every rank. The metrics' own torchmetrics sync is off, so nothing is gathered twice.
    """

    def __init__(self, inception_weights: str | None = None, clip=None, clip_id: str | None = None,
                 compositional: bool = True, batch_size: int = 32, cache: bool = True, device: str | torch.device = "cpu"):
        self.inception = InceptionFeatures(inception_weights).to(device) if inception_weights else None
        if self.inception is None:
            log.warning("FID / KID / IS are off: no Inception weights given (a local file, or 'download' when online)")
        self.weights = inception_weights
        self.clip, self.clip_id = clip, clip_id
        self.metrics = GenerationMetrics(self.inception, ClipImageFeatures(clip) if clip is not None else None,
                                         sync_on_compute=False).to(device)
        self.clip_score = CLIPScore(clip, sync_on_compute=False).to(device) if clip is not None else None
        self.compositional = CompositionalAccuracy(sync_on_compute=False).to(device) if compositional else None
        self.batch_size, self.cache, self.device = batch_size, cache, device
        self._reference_key: str | None = None

    def _reference(self, evalset: EvalSet, ranks: Ranks, progress: bool) -> str | None:
        """Install cached real features, or add this rank's real images (the key to save them under)."""
        key = reference_key(evalset.urls, evalset.image_size, len(evalset), self.weights, self.clip_id)
        if key == self._reference_key:
            return None  # installed by an earlier evaluation of this evaluator
        cached = load_reference(key) if self.cache and ranks.is_main else None
        if ranks.broadcast(cached is not None):  # only rank 0 computes metrics: the others skip the real images too
            if cached is not None:
                self.metrics.set_reference(cached)
            self._reference_key = key
            return None
        block = ranks.block(len(evalset), self.batch_size)
        for lo in _progress(range(block.start, block.stop, self.batch_size), progress, "real features"):
            hi = min(lo + self.batch_size, block.stop)
            self.metrics.update(evalset.images[lo:hi].to(self.device), torch.arange(lo, hi), real=True)
        return key

    @torch.no_grad()
    def evaluate(self, pipe: TextToImage, evalset: EvalSet, settings: SamplerSettings, *, rank: int = 0,
                 world: int = 1, progress: bool = True, keep_images: int | None = None) -> EvalResult:
        """Generate for every caption of ``evalset`` and score. ``keep_images``: gather the first that many
        images of the set to rank 0 (collective); None keeps each rank's own block."""
        ranks = Ranks(rank, world)
        self.metrics.reset()
        for m in (self.clip_score, self.compositional):
            if m is not None:
                m.reset()
        new_key = self._reference(evalset, ranks, progress)
        block = ranks.block(len(evalset), self.batch_size)
        images, scores, verdicts = [], [], []
        checkable = all("objects" in m for m in evalset.metas)
        for lo in _progress(range(block.start, block.stop, self.batch_size), progress,
                            f"generating {len(block)} images"):
            hi = min(lo + self.batch_size, block.stop)
            captions = evalset.captions[lo:hi]
            x = pipe(captions, settings, image_size=evalset.image_size, progress=False, index_offset=lo)
            self.metrics.update(x.to(self.device), torch.arange(lo, hi))
            if self.clip_score is not None:
                scores += self.clip_score.scores(x, captions).tolist()
            if self.compositional is not None and checkable:
                verdicts += self.compositional.verdicts(x, evalset.metas[lo:hi])
            images.append(x.cpu())
        empty = torch.empty(0, 3, evalset.image_size, evalset.image_size)
        images = torch.cat(images) if images else empty
        indices = block
        if keep_images is not None:
            k = max(0, min(keep_images, len(evalset)) - block.start)
            first = ranks.gather(images[:k])
            images = torch.cat(first)[:keep_images] if first is not None else empty
            indices = range(len(images)) if ranks.is_main else range(0)
        parts = ranks.gather((self.metrics.local_features(), scores, verdicts))
        metrics = None
        if parts is not None:  # rank 0: the features, scores and verdicts of every rank, in index order
            self.metrics.load_features([p[0] for p in parts])
            scores, verdicts = [s for p in parts for s in p[1]], [v for p in parts for v in p[2]]
            metrics = self._compute(scores, verdicts, checkable, new_key)
            metrics["n"] = len(evalset)
        if new_key is not None:
            self._reference_key = new_key
        metrics = ranks.broadcast(metrics)
        return EvalResult(metrics, indices, images, scores, verdicts)

    def _compute(self, scores: list[float], verdicts: list[Verdict], checkable: bool, new_key: str | None) -> dict:
        metrics = self.metrics.compute()
        if new_key is not None and self.metrics.gathered_real:
            if self.cache:
                save_reference(new_key, self.metrics.gathered_real)
            self.metrics.set_reference(self.metrics.gathered_real)
        if self.clip_score is not None:
            self.clip_score.update(scores=torch.tensor(scores, dtype=torch.float64))
            metrics["clip_score"] = float(self.clip_score.compute())
        if self.compositional is not None and checkable:
            self.compositional.update(verdicts=verdicts)
            metrics.update({f"compositional/{k}": float(v) for k, v in self.compositional.compute().items()})
        return metrics


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="batch")
