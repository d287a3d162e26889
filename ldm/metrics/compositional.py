"""Compositional accuracy on the synthetic shapes: does a generated image show what its caption says?

A deterministic checker that reads an image and decides, against the caption's structured
metadata (the ``json`` of :mod:`ldm.data.shapes` scenes), whether

* **count**: the number of objects is right;
* **colour** / **shape**: each described object is there with its colour / its shape, and
  **binding**: with both on the same object (seed 002's "a red cube on top of a blue cube");
* **relation**: every stated spatial relation holds between the matched objects.

How it reads an image (no learned parts): pixels farther than ``fg_threshold`` from the scene
background are foreground; 8-connected components (``scipy.ndimage.label``) smaller than
``min_area`` of the image are noise. A component's colour is the palette colour nearest to the
median of its strongest pixels; its mask is the pixels more than half-way from the background
to that colour (the renderer's half-coverage edge); its shape is the template of
:data:`~ldm.data.shapes.SHAPES` (drawn by the renderer itself, cropped to its tight box) with
the highest IoU after both are resized to ``template_size``. Described and detected objects
are matched by the assignment with the most colour + shape agreements, then the most size agreements
(the larger of two described sizes drawn with the larger side); relations compare the matched
objects' centres, and a relation counts only if it holds under every such best assignment (the
checker does not credit a relation between objects it cannot tell apart). The checker is meant for 64 px and larger: at 32 px a small object is
5 px wide and shapes are ambiguous (accuracies on the renderer's own images in
``docs/evaluation.md``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from torch import Tensor
from torchmetrics import Metric

from ldm.data.shapes import BACKGROUND, COLORS, SHAPES, SIZES, SceneObject, draw_object

ATTRIBUTES = ("count", "color", "shape", "binding", "relation", "all_correct")


@dataclass
class DetectedObject:
    color: str
    shape: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1, half-open
    area: int

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2


def _size_agreements(candidate: list, expected: Sequence[Mapping[str, Any]]) -> int:
    """Pairs of described objects of different sizes whose matched objects are drawn in that order (the larger side
    for the larger size; sides, not areas: a large star covers less than a small square)."""
    def side(m: DetectedObject) -> int:
        return max(m.bbox[2] - m.bbox[0], m.bbox[3] - m.bbox[1])

    return sum(1 for (m, e), (n, f) in itertools.combinations(zip(candidate, expected), 2)
               if m is not None and n is not None and e.get("size") != f.get("size")
               and (side(m) > side(n)) == (SIZES.get(e.get("size"), 0) > SIZES.get(f.get("size"), 0)))


@dataclass
class Verdict:
    """The checker's decision for one image; lists follow the caption's objects / relations."""

    count: bool
    color: list[bool]
    shape: list[bool]
    relation: list[bool]
    detected: list[DetectedObject] = field(default_factory=list)

    @property
    def binding(self) -> list[bool]:
        return [c and s for c, s in zip(self.color, self.shape, strict=True)]

    @property
    def all_correct(self) -> bool:
        return self.count and all(self.binding) and all(self.relation)

    def summary(self) -> str:
        if self.all_correct:
            return "correct"
        wrong = [name for name, ok in (("count", self.count), ("colour", all(self.color)), ("shape", all(self.shape)),
                                       ("binding", all(self.binding)), ("relation", all(self.relation))) if not ok]
        return "wrong " + ", ".join(wrong)


@lru_cache(maxsize=8)
def shape_templates(size: int = 32) -> dict[str, np.ndarray]:
    """Each shape drawn by the renderer (supersampled), cropped to its tight box, as a size x size mask."""
    big = 256
    out = {}
    for shape in SHAPES:
        canvas = Image.new("RGB", (big, big), (0, 0, 0))
        draw_object(ImageDraw.Draw(canvas), SceneObject(shape, "red", "large", (0, 0, big, big), (255, 0, 0)))
        mask = np.asarray(canvas.convert("L")) > 0
        out[shape] = _normalise(mask, size)
    return out


def _normalise(mask: np.ndarray, size: int) -> np.ndarray:
    """Crop a boolean mask to its tight box and resize it to size x size (area-averaged, >= 0.5)."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1].astype(np.float32)
    resized = Image.fromarray(crop * 255).resize((size, size), Image.Resampling.BOX)
    return np.asarray(resized) >= 127.5


def _palette() -> tuple[list[str], np.ndarray]:
    return list(COLORS), np.array(list(COLORS.values()), dtype=np.float32)


class CompositionalChecker:
    """Args:
        background: the scene background colour.
        fg_threshold: RGB distance from the background above which a pixel is foreground.
        min_area: smallest object, as a fraction of the image area (smaller components are noise).
        template_size: resolution at which masks are compared with the shape templates.
        max_objects: at most this many of the largest components are considered.
    """

    def __init__(self, background: Sequence[int] = BACKGROUND, fg_threshold: float = 40.0, min_area: float = 0.002,
                 template_size: int = 32, max_objects: int = 6):
        self.background = np.asarray(background, dtype=np.float32)
        self.fg_threshold, self.min_area = fg_threshold, min_area
        self.template_size, self.max_objects = template_size, max_objects
        self.names, self.colors = _palette()

    def detect(self, image: np.ndarray) -> list[DetectedObject]:
        """Objects in an RGB uint8 image (H, W, 3)."""
        rgb = image.astype(np.float32)
        dist = np.linalg.norm(rgb - self.background, axis=-1)  # (H, W)
        labels, n = ndimage.label(dist > self.fg_threshold, structure=np.ones((3, 3)))
        if n == 0:
            return []
        areas = ndimage.sum_labels(np.ones_like(dist), labels, index=np.arange(1, n + 1))
        keep = [i + 1 for i in np.argsort(-areas)[: self.max_objects] if areas[i] >= self.min_area * dist.size]
        templates = shape_templates(self.template_size)
        objects = []
        for label in keep:
            component = labels == label
            d = dist[component]
            strong = rgb[component][d >= np.median(d)]  # the object's interior, not its anti-aliased edge
            colour_idx = int(np.argmin(np.linalg.norm(self.colors - np.median(strong, axis=0), axis=1)))
            half = 0.5 * float(np.linalg.norm(self.colors[colour_idx] - self.background))
            mask = component & (dist > half)
            if mask.sum() < 2:
                mask = component
            ys, xs = np.nonzero(mask)
            norm = _normalise(mask, self.template_size)
            ious = {s: (norm & t).sum() / max(1, (norm | t).sum()) for s, t in templates.items()}
            objects.append(DetectedObject(color=self.names[colour_idx], shape=max(ious, key=ious.get),
                                          bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                                          area=int(mask.sum())))
        return objects

    def check(self, image: np.ndarray, meta: Mapping[str, Any]) -> Verdict:
        """The verdict for an RGB uint8 image (H, W, 3) against a scene's metadata."""
        expected = meta["objects"]
        detected = self.detect(image)
        # every assignment of detected objects (or none) to the described ones; n <= 3, so brute force, in
        # permutation order (deduplicated by a dict, not a set: a set of tuples holding None iterates in an order that
        # changes from process to process, and so did the relation rate of one checkpoint between two ldm eval
        # calls). The best assignments have the most colour + shape agreements, then the most size agreements (of two
        # described objects of different sizes, the larger drawn larger).
        candidates = list(range(len(detected))) + [None] * len(expected)
        best, best_score = [], (-1, -1)
        for perm in dict.fromkeys(itertools.permutations(candidates, len(expected))):
            candidate = [detected[d] if d is not None else None for d in perm]
            score = (sum((m.color == e["color"]) + (m.shape == e["shape"])
                         for m, e in zip(candidate, expected, strict=True) if m is not None),
                     _size_agreements(candidate, expected))
            if score > best_score:
                best, best_score = [candidate], score
            elif score == best_score:
                best.append(candidate)
        match = best[0]
        # A stated relation holds when it holds under every best assignment: where the checker cannot tell which
        # drawn object is which (a green star and a yellow cross for "a red circle left of a blue square"), it must not
        # credit the relation by choosing the way round in which it holds. Described objects alike in size, colour
        # and shape ("a red circle left of a red circle") are interchangeable: there the relation holds when it
        # holds with them either way round.
        relations = [all(self._holds_up_to_alike(c, r, expected) for c in best) for r in meta.get("relations", [])]
        color = [m is not None and m.color == e["color"] for m, e in zip(match, expected, strict=True)]
        shape = [m is not None and m.shape == e["shape"] for m, e in zip(match, expected, strict=True)]
        return Verdict(count=len(detected) == len(expected), color=color, shape=shape, relation=relations,
                       detected=detected)

    @classmethod
    def _holds_up_to_alike(cls, candidate: list, relation: Mapping[str, Any], expected: Sequence[Mapping]) -> bool:
        def alike(i: int, j: int) -> bool:
            return all(expected[i].get(k) == expected[j].get(k) for k in ("size", "color", "shape"))

        s, o = relation["subject"], relation["object"]
        pairs = [(s, o)] + ([(o, s)] if alike(s, o) else [])
        return any(cls._relation_holds(candidate[a], relation["relation"], candidate[b]) for a, b in pairs)

    @staticmethod
    def _relation_holds(a: DetectedObject | None, relation: str, b: DetectedObject | None) -> bool:
        if a is None or b is None:
            return False
        (ax, ay), (bx, by) = a.centre, b.centre
        return {"left_of": ax < bx, "right_of": ax > bx, "above": ay < by, "below": ay > by}[relation]


class CompositionalAccuracy(Metric):
    """Rates over images: count, colour, shape, binding (per described object), relation (per stated
    relation), all-correct (per image). Sums are synced across ranks, so the rates are exact under DDP."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, checker: CompositionalChecker | None = None, **kwargs):
        super().__init__(**kwargs)
        self.__dict__["checker"] = checker or CompositionalChecker()
        for name in ("images", "count", "objects", "color", "shape", "binding", "relations", "relation", "all_correct"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def verdicts(self, images: Tensor, metas: Sequence[Mapping[str, Any]]) -> list[Verdict]:
        """The checker's verdicts for images (B, 3, H, W) in [-1, 1] and their scene metadata (not accumulated)."""
        arrays = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [self.checker.check(a, m) for a, m in zip(arrays, metas, strict=True)]

    def update(self, images: Tensor | None = None, metas: Sequence[Mapping[str, Any]] | None = None, *,
               verdicts: list[Verdict] | None = None) -> None:
        """Images and their metadata, or ``verdicts`` from :meth:`verdicts`."""
        if verdicts is None:
            verdicts = self.verdicts(images, metas)
        for v in verdicts:
            self.images += 1
            self.count += int(v.count)
            self.objects += len(v.color)
            self.color += sum(v.color)
            self.shape += sum(v.shape)
            self.binding += sum(v.binding)
            self.relations += len(v.relation)
            self.relation += sum(v.relation)
            self.all_correct += int(v.all_correct)

    def compute(self) -> dict[str, Tensor]:
        def rate(num, den):
            return num.double() / den.clamp(min=1)

        return {"count": rate(self.count, self.images), "color": rate(self.color, self.objects),
                "shape": rate(self.shape, self.objects), "binding": rate(self.binding, self.objects),
                "relation": rate(self.relation, self.relations), "all_correct": rate(self.all_correct, self.images)}
