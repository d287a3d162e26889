"""Captioned synthetic scenes: coloured shapes with spatial relations and exact ground truth.

Each scene holds 1-3 objects on a plain background. Every object has a shape
(:data:`SHAPES`), a named colour (:data:`COLORS`) and a size (:data:`SIZES`).
For 2 objects the caption states one spatial relation ("a small red circle to
the left of a large blue square"); for 3 objects it states their order along a
row or a column. The metadata records every object's shape, colour, RGB, size,
pixel bounding box ``[x0, y0, x1, y1)`` and the relations as
``(subject, relation, object)`` index triples, so generated images can later be
checked exactly (issue: compositional accuracy).

Placement is constructive, not rejection-sampled: objects that must be ordered
along an axis are laid out with random gaps that always fit, so every relation
in the metadata holds strictly on the bounding boxes (``a.x1 <= b.x0`` for
"left of"). Scenes are deterministic in ``(seed, split, index)`` and
independent of each other, so any subset can be regenerated in parallel.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (130, 40, 190),
    "orange": (250, 130, 0),
    "cyan": (0, 200, 215),
    "pink": (250, 110, 185),
    "brown": (125, 75, 30),
}

#: object side as a fraction of the image side
SIZES: dict[str, float] = {"small": 0.17, "large": 0.28}

BACKGROUND: tuple[int, int, int] = (240, 240, 240)

#: relation name -> (axis, subject comes first along the axis), axis 0 = x, 1 = y
RELATIONS: dict[str, tuple[int, bool]] = {
    "left_of": (0, True),
    "right_of": (0, False),
    "above": (1, True),
    "below": (1, False),
}

_RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left_of": ("to the left of", "left of"),
    "right_of": ("to the right of", "right of"),
    "above": ("above", "on top of"),
    "below": ("below", "under", "beneath"),
}

_ONE = (
    "{a}",
    "a picture of {a}",
    "an image of {a}",
    "{a} on a plain background",
    "there is {a}",
    "a single {a_bare}",
)
_TWO = (
    "{a} {rel} {b}",
    "{a} is {rel} {b}",
    "there is {a} {rel} {b}",
    "a picture of {a} {rel} {b}",
    "{A} {rel} {b}.",
)
_THREE_ROW = (
    "{a}, {b} and {c} from left to right",
    "from left to right: {a}, {b} and {c}",
    "{a}, {b} and {c} in a row, left to right",
)
_THREE_COL = (
    "{a}, {b} and {c} from top to bottom",
    "from top to bottom: {a}, {b} and {c}",
    "{a}, {b} and {c} stacked from top to bottom",
)

MIN_SIZE, MAX_SIZE = 32, 256
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, half-open
    rgb: tuple[int, int, int] = (0, 0, 0)

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Relation:
    subject: int
    relation: str
    object: int


@dataclass
class Scene:
    image_size: int
    objects: list[SceneObject]
    relations: list[Relation]
    caption: str
    background: tuple[int, int, int] = BACKGROUND
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "shapes",
            "image_size": self.image_size,
            "background": list(self.background),
            "objects": [
                {**asdict(o), "bbox": list(o.bbox), "rgb": list(o.rgb)} for o in self.objects
            ],
            "relations": [asdict(r) for r in self.relations],
            "caption": self.caption,
            **self.meta,
        }


def article(phrase: str) -> str:
    """``a red circle`` / ``an orange circle``."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _shape_polygon(shape: str, x0: float, y0: float, s: float) -> list[tuple[float, float]] | None:
    cx, cy, r = x0 + s / 2, y0 + s / 2, s / 2
    if shape == "triangle":
        return [(cx, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    if shape == "diamond":
        return [(cx, y0), (x0 + s, cy), (cx, y0 + s), (x0, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    if shape == "cross":
        t = s / 6  # half arm thickness: arms are a third of the side
        return [
            (cx - t, y0), (cx + t, y0), (cx + t, cy - t), (x0 + s, cy - t), (x0 + s, cy + t),
            (cx + t, cy + t), (cx + t, y0 + s), (cx - t, y0 + s), (cx - t, cy + t), (x0, cy + t),
            (x0, cy - t), (cx - t, cy - t),
        ]
    return None


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, scale: int = 1) -> None:
    """Draw one object into ``draw`` whose canvas is ``scale`` times the scene size."""
    x0, y0, x1, y1 = (v * scale for v in obj.bbox)
    s = x1 - x0
    # inclusive pixel coordinates for PIL's ellipse / rectangle
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=obj.rgb)
    elif obj.shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=obj.rgb)
    else:
        poly = _shape_polygon(obj.shape, x0, y0, s - 1)
        if poly is None:
            raise ValueError(f"unknown shape {obj.shape!r}; known: {', '.join(SHAPES)}")
        draw.polygon(poly, fill=obj.rgb)


def render(scene: Scene) -> Image.Image:
    """Render a scene as an RGB image, anti-aliased by supersampling."""
    big = scene.image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        draw_object(draw, obj, scale=_SUPERSAMPLE)
    return canvas.resize((scene.image_size, scene.image_size), Image.Resampling.BOX)


def _split_free(rng: np.random.Generator, free: int, parts: int) -> list[int]:
    """Split ``free`` pixels into ``parts`` non-negative integers at random."""
    if free <= 0:
        return [0] * parts
    weights = rng.dirichlet(np.ones(parts))
    cuts = np.floor(weights * free).astype(int)
    return cuts.tolist()


def _place_along(rng, sides: list[int], size: int, margin: int, gap: int) -> list[int]:
    """Start coordinates of boxes laid out in order along one axis with gaps >= ``gap``."""
    n = len(sides)
    free = size - 2 * margin - sum(sides) - (n - 1) * gap
    if free < 0:
        raise ValueError("objects do not fit along the axis")
    spare = _split_free(rng, free, n + 1)
    starts, pos = [], margin + spare[0]
    for i, side in enumerate(sides):
        starts.append(pos)
        pos += side + gap + spare[i + 1]
    return starts


def _place_free(rng, side: int, size: int, margin: int) -> int:
    return int(rng.integers(margin, size - margin - side + 1))


def _stream_id(split: str) -> int:
    return zlib.crc32(split.encode()) & 0x7FFFFFFF


def sample_scene(seed: int, index: int, image_size: int = 64, split: str = "train",
                 max_objects: int = 3) -> Scene:
    """Draw scene ``index`` of a split, deterministically from ``(seed, split, index)``."""
    if not MIN_SIZE <= image_size <= MAX_SIZE:
        raise ValueError(f"image size must be between {MIN_SIZE} and {MAX_SIZE} px, got {image_size}")
    if not 1 <= max_objects <= 3:
        raise ValueError(f"max_objects must be 1, 2 or 3, got {max_objects}")
    rng = np.random.default_rng([seed, _stream_id(split), index])
    n = int(rng.integers(1, max_objects + 1))
    # distinct descriptions, so the caption names each object unambiguously
    descs: list[tuple[str, str, str]] = []
    while len(descs) < n:
        d = (str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), str(rng.choice(list(SIZES))))
        if d not in descs:
            descs.append(d)
    sides = [max(4, round(SIZES[size] * image_size)) for _, _, size in descs]
    margin, gap = max(1, image_size // 32), max(1, image_size // 32)

    relations: list[Relation] = []
    if n == 1:
        xs = [_place_free(rng, sides[0], image_size, margin)]
        ys = [_place_free(rng, sides[0], image_size, margin)]
        order = [0]
        rel_name = None
    elif n == 2:
        rel_name = str(rng.choice(list(RELATIONS)))
        axis, subject_first = RELATIONS[rel_name]
        order = [0, 1] if subject_first else [1, 0]
    else:
        rel_name = "left_of" if rng.random() < 0.5 else "above"
        axis = RELATIONS[rel_name][0]
        order = [0, 1, 2]
    if n > 1:
        along = _place_along(rng, [sides[i] for i in order], image_size, margin, gap)
        starts = [0] * n
        for pos, i in zip(along, order):
            starts[i] = pos
        across = [_place_free(rng, sides[i], image_size, margin) for i in range(n)]
        xs, ys = (starts, across) if axis == 0 else (across, starts)
        if n == 2:
            relations.append(Relation(0, rel_name, 1))
        else:
            relations += [Relation(0, rel_name, 1), Relation(1, rel_name, 2)]

    objects = [
        SceneObject(shape=s, color=c, size=z, rgb=COLORS[c], bbox=(xs[i], ys[i], xs[i] + sides[i], ys[i] + sides[i]))
        for i, (s, c, z) in enumerate(descs)
    ]
    caption, template = _caption(rng, objects, rel_name)
    return Scene(image_size=image_size, objects=objects, relations=relations, caption=caption,
                 meta={"seed": seed, "split": split, "index": index, "template": template})


def _caption(rng: np.random.Generator, objects: list[SceneObject], rel_name: str | None) -> tuple[str, str]:
    a = [article(o.phrase) for o in objects]
    if len(objects) == 1:
        t = int(rng.integers(len(_ONE)))
        return _ONE[t].format(a=a[0], a_bare=objects[0].phrase), f"one/{t}"
    if len(objects) == 2:
        assert rel_name is not None
        phrases = _RELATION_PHRASES[rel_name]
        rel = phrases[int(rng.integers(len(phrases)))]
        t = int(rng.integers(len(_TWO)))
        text = _TWO[t].format(a=a[0], A=a[0][0].upper() + a[0][1:], b=a[1], rel=rel)
        return text, f"two/{t}"
    templates = _THREE_ROW if rel_name == "left_of" else _THREE_COL
    t = int(rng.integers(len(templates)))
    return templates[t].format(a=a[0], b=a[1], c=a[2]), f"three/{rel_name}/{t}"


def relation_holds(subject: SceneObject, relation: str, obj: SceneObject) -> bool:
    """Whether ``subject relation obj`` holds strictly on the bounding boxes."""
    sx0, sy0, sx1, sy1 = subject.bbox
    ox0, oy0, ox1, oy1 = obj.bbox
    return {
        "left_of": sx1 <= ox0,
        "right_of": ox1 <= sx0,
        "above": sy1 <= oy0,
        "below": oy1 <= sy0,
    }[relation]
