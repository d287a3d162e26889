"""Writing WebDataset shards atomically, with a ``stats.json`` beside them.

Shards are written into a hidden staging folder inside the output folder and
moved into place only when every split has been written; on any error the
staging folder is removed, so a crash or Ctrl-C never leaves half-written
shards that a later run would read. ``stats.json`` records per split the sample
count, the shard list, the per-shard counts (used to split validation exactly
across ranks without scanning) and a brace pattern to paste into a config.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

SHARD_NAME = "{split}-%06d.tar"
#: a split name is a file-name prefix inside the output folder: no path parts, no glob characters
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_split_name(name: str) -> str:
    """``name`` if it is a plain split name, else a ValueError. Why: the name becomes ``out/{name}-NNNNNN.tar``
    and a glob to find the split's old shards, so ``../x`` wrote outside the output folder and ``*`` with
    ``--overwrite`` removed every other split."""
    if not isinstance(name, str) or not SPLIT_NAME.fullmatch(name):
        raise ValueError(f"invalid split name {name!r}: use letters, digits, '_' and '-' only ([A-Za-z0-9_-]+), "
                         "e.g. train or val")
    return name


def split_shards(out: Path, name: str) -> list[Path]:
    """The shard files of split ``name`` in ``out`` (``name-NNNNNN.tar``; not those of a split ``name-extra``)."""
    pattern = re.compile(rf"{re.escape(check_split_name(name))}-\d+\.tar")
    return sorted(p for p in out.glob(f"{name}-*.tar") if pattern.fullmatch(p.name))


def encode_image(image: Image.Image, fmt: str = "png", quality: int = 95) -> bytes:
    """Encode a PIL image as PNG or JPEG bytes."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", optimize=False)
    elif fmt in ("jpg", "jpeg"):
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"unsupported image format {fmt!r}; use 'png' or 'jpg'")
    return buf.getvalue()


def brace_pattern(names: list[str]) -> str:
    """``['train-000000.tar', 'train-000001.tar'] -> 'train-{000000..000001}.tar'``."""
    if not names:
        return ""
    if len(names) == 1:
        return names[0]
    first, last = names[0], names[-1]
    prefix, _, rest = first.rpartition("-")
    num_first, ext = rest.split(".", 1)
    num_last = last.rpartition("-")[2].split(".", 1)[0]
    return f"{prefix}-{{{num_first}..{num_last}}}.{ext}"


def split_entry(out: Path, shard_counts: dict[str, int]) -> dict[str, Any]:
    """The ``stats.json`` entry of one split: sample count, shards in order, per-shard counts, pattern."""
    names = sorted(n for n, c in shard_counts.items() if c > 0)
    return {"samples": sum(shard_counts[n] for n in names), "shards": names,
            "shard_counts": {n: shard_counts[n] for n in names},
            "pattern": str(out / brace_pattern(names)) if names else None}


def read_splits(out: Path) -> dict[str, Any]:
    """The ``splits`` of an existing ``out/stats.json`` ({} when absent or unreadable)."""
    path = out / "stats.json"
    try:
        return json.loads(path.read_text()).get("splits", {}) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def write_stats(out: Path, stats: dict[str, Any]) -> None:
    """Write ``out/stats.json`` atomically."""
    tmp = out / "stats.json.tmp"
    tmp.write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(tmp, out / "stats.json")


class SplitWriter:
    """Writes one split's samples with ``webdataset.ShardWriter``, counting per shard."""

    def __init__(self, staging: Path, split: str, shard_size: int):
        check_split_name(split)
        if shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {shard_size}")
        self.split = split
        self.counts: OrderedDict[str, int] = OrderedDict()
        self._writer = wds.ShardWriter(str(staging / SHARD_NAME.format(split=split)), maxcount=shard_size, verbose=0)

    def write(self, sample: dict[str, Any]) -> None:
        self._writer.write(sample)
        name = os.path.basename(self._writer.fname)
        self.counts[name] = self.counts.get(name, 0) + 1

    def close(self) -> None:
        self._writer.close()


class StagedShardDir:
    """Context manager: stage shards of several splits, publish them all on success.

    >>> with StagedShardDir("out", overwrite=True) as out:
    ...     w = out.split("train", shard_size=1000)
    ...     w.write({"__key__": "k", "png": b"...", "txt": "a caption"})
    """

    def __init__(self, out: str | os.PathLike, overwrite: bool = False, info: dict[str, Any] | None = None):
        self.out = Path(out)
        self.overwrite = overwrite
        self.info = dict(info or {})
        self.writers: dict[str, SplitWriter] = {}
        self.staging = self.out / f".staging-{os.getpid()}-{time.time_ns()}"
        self.stats: dict[str, Any] = {}

    def __enter__(self) -> "StagedShardDir":
        self.out.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir()
        return self

    def split(self, name: str, shard_size: int) -> SplitWriter:
        existing = split_shards(self.out, name)
        if existing and not self.overwrite:
            raise FileExistsError(
                f"{self.out} already holds {len(existing)} '{name}' shards; pass --overwrite to replace them "
                "or choose another --out"
            )
        writer = SplitWriter(self.staging, name, shard_size)
        self.writers[name] = writer
        return writer

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            for w in self.writers.values():
                w.close()
            if exc_type is None:
                self._publish()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)

    def _publish(self) -> None:
        splits: dict[str, Any] = {}
        for name, w in self.writers.items():
            for old in split_shards(self.out, name):
                old.unlink()
            splits[name] = split_entry(self.out, w.counts)
            for n in splits[name]["shards"]:
                os.replace(self.staging / n, self.out / n)
        # keep the entries of splits this run did not touch (e.g. val written earlier)
        previous = {k: v for k, v in read_splits(self.out).items()
                    if k not in splits and (self.out / (v.get("shards") or [""])[0]).is_file()}
        self.stats = {**self.info, "splits": {**previous, **splits}}
        write_stats(self.out, self.stats)
