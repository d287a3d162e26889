"""A captioned preview grid of shard samples, as a PNG a person can look at."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw, ImageFont

from ldm.data.streams import caption_of, load_image
from ldm.data.urls import expand_urls


def read_samples(pattern: str, n: int) -> list[tuple[Image.Image, str]]:
    """The first ``n`` readable (image, caption) pairs of a shard pattern, in order."""
    out: list[tuple[Image.Image, str]] = []
    stream = wds.tarfile_to_samples(handler=wds.ignore_and_continue)([{"url": u} for u in expand_urls(pattern)])
    for sample in stream:
        try:
            image = load_image(sample)
        except OSError:
            continue
        if image is None:
            continue
        out.append((image, caption_of(sample)))
        if len(out) >= n:
            break
    return out


def caption_grid(items: Sequence[tuple[Image.Image, str]], cell: int = 160, columns: int | None = None,
                 caption_lines: int = 4) -> Image.Image:
    """Lay out images with their captions wrapped underneath."""
    if not items:
        raise ValueError("nothing to show: no readable samples")
    columns = columns or min(len(items), max(1, math.ceil(math.sqrt(len(items)))))
    rows = math.ceil(len(items) / columns)
    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    line_h = 13
    text_h = caption_lines * line_h + 6
    pad = 6
    grid = Image.new("RGB", (columns * (cell + pad) + pad, rows * (cell + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(8, int(cell / 5.6))
    for i, (image, caption) in enumerate(items):
        r, c = divmod(i, columns)
        x, y = pad + c * (cell + pad), pad + r * (cell + text_h + pad)
        resample = Image.Resampling.NEAREST if max(image.size) < cell else Image.Resampling.LANCZOS
        scale = cell / max(image.size)  # fit the cell, keeping the aspect ratio (a square image fills it)
        w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        grid.paste(image.resize((w, h), resample), (x + (cell - w) // 2, y + (cell - h) // 2))
        lines = textwrap.wrap(caption, chars)[:caption_lines]
        for k, line in enumerate(lines):
            draw.text((x, y + cell + 3 + k * line_h), line, fill=(20, 20, 20), font=font)
    return grid


def write_preview(pattern: str, out: str | Path, n: int = 16, cell: int = 160) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    caption_grid(read_samples(pattern, n), cell=cell).save(out)
    return out
