"""Image transforms for training and evaluation, with explicit random generators.

The random crop and flip draw from a ``random.Random`` passed in by the stream,
seeded from (seed, epoch, rank, worker), so a run is reproducible whatever the
number of workers' start order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image


def as_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_shorter(image: Image.Image, size: int,
                   resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize so that the shorter side is ``size`` (bicubic by default, antialiased); unchanged if it already is."""
    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    return image.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample, reducing_gap=3.0)


def crop_square(image: Image.Image, size: int, rng: random.Random | None = None) -> Image.Image:
    """A ``size`` square: at a random position drawn from ``rng``, or the centre without one."""
    w, h = image.size
    if rng is not None:
        left, top = rng.randint(0, w - size), rng.randint(0, h - size)
    else:
        left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and crop the centre square."""
    return crop_square(resize_shorter(image, size), size)


def same_aspect_ratio(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether two (width, height) sizes are one picture at two scales, up to rounding each side to a pixel."""
    (wa, ha), (wb, hb) = a, b
    return abs(wa * hb - ha * wb) <= (wa + ha + wb + hb) / 2


def center_crop_mask(mask: Image.Image, image_size: tuple[int, int], size: int) -> Image.Image:
    """A mask drawn on an image of ``image_size`` (or on a scaled copy of it), cut to the ``size`` square exactly
    as :func:`resize_center_crop` / a centre-cropping :class:`ImageTransform` cut the image: the same pixels,
    with nearest resampling so that it stays binary. Raises ValueError if the aspect ratios differ (a mask for
    another picture, or one that would be stretched)."""
    if not same_aspect_ratio(mask.size, image_size):
        raise ValueError(f"mask {mask.size[0]}x{mask.size[1]} and image {image_size[0]}x{image_size[1]} differ "
                         "in aspect ratio")
    nearest = Image.Resampling.NEAREST
    mask = mask.convert("L").resize(image_size, nearest)  # onto the image's pixel grid (a no-op at the same size)
    return crop_square(resize_shorter(mask, size, resample=nearest), size)


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to ``size``, crop a ``size``-square, flip, map to [-1, 1].

    Horizontal flips mirror the scene and so break captions with "left"/"right";
    they are off by default.
    """

    size: int
    crop: Literal["center", "random"] = "center"
    flip: bool = False

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"image size must be >= 8 px, got {self.size}")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {self.crop!r}")

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        image = resize_shorter(as_rgb(image), self.size)
        image = crop_square(image, self.size, rng if self.crop == "random" else None)
        if self.flip and rng is not None and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W)
        return tensor.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (B, 3, H, W) -> uint8 (B, 3, H, W)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] floats (B, 3, H, W) -> PIL images."""
    arrays = to_uint8(images.detach().cpu()).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    return [Image.fromarray(a) for a in arrays]
