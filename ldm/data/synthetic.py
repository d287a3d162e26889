"""Writing synthetic captioned datasets as shards (``ldm shards synthetic``)."""

from __future__ import annotations

import os
from typing import Any

from tqdm import tqdm

from ldm.data import shapes
from ldm.data.writer import StagedShardDir, encode_image

KINDS = ("shapes",)


def write_synthetic_shards(out: str | os.PathLike, *, kind: str = "shapes", train: int = 1000, val: int = 100,
                           size: int = 64, seed: int = 0, shard_size: int = 1000, max_objects: int = 3,
                           image_format: str = "png", overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Render ``train`` + ``val`` scenes into ``out/{train,val}-NNNNNN.tar``; returns the stats."""
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; available: {', '.join(KINDS)}")
    if not shapes.MIN_SIZE <= size <= shapes.MAX_SIZE:
        raise ValueError(f"--size must be between {shapes.MIN_SIZE} and {shapes.MAX_SIZE} px, got {size}")
    if train < 0 or val < 0 or train + val == 0:
        raise ValueError(f"need a positive number of samples, got --train {train} --val {val}")
    info = {"kind": kind, "seed": seed, "image_size": size, "max_objects": max_objects, "format": image_format,
            "shapes": list(shapes.SHAPES), "colors": list(shapes.COLORS), "sizes": list(shapes.SIZES)}
    with StagedShardDir(out, overwrite=overwrite, info=info) as staged:
        for split, n in (("train", train), ("val", val)):
            if n == 0:
                continue
            writer = staged.split(split, shard_size)
            for i in tqdm(range(n), desc=f"{kind} {split}", unit="img", disable=not progress):
                scene = shapes.sample_scene(seed, i, size, split=split, max_objects=max_objects)
                writer.write({
                    "__key__": f"{split}_{i:08d}",
                    image_format: encode_image(shapes.render(scene), image_format),
                    "txt": scene.caption,
                    "json": scene.to_json(),
                })
    return staged.stats
