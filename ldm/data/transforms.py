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
        image = image.convert("RGB")
        w, h = image.size
        if min(w, h) != self.size:
            scale = self.size / min(w, h)
            w, h = max(self.size, round(w * scale)), max(self.size, round(h * scale))
            image = image.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
        if self.crop == "random" and rng is not None:
            left, top = rng.randint(0, w - self.size), rng.randint(0, h - self.size)
        else:
            left, top = (w - self.size) // 2, (h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        if self.flip and rng is not None and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W)
        return tensor.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (B, 3, H, W) -> uint8 (B, 3, H, W)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
