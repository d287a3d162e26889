"""Turning a folder of images (and their captions) into WebDataset shards.

Captions come from sidecar ``.txt`` files (``cat.jpg`` + ``cat.txt``) or from one
table with a file column and a caption column (CSV, JSONL or parquet). Images
that cannot be decoded, and images without a non-empty caption, are skipped and
counted by reason; the counts are returned and written into ``stats.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ldm.data.transforms import as_rgb, resize_center_crop
from ldm.data.writer import StagedShardDir, check_split_name, encode_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FILE_COLUMNS = ("file", "filename", "file_name", "path", "image", "image_path", "key")
CAPTION_COLUMNS = ("caption", "text", "txt", "prompt")


@dataclass
class FolderReport:
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first offending file
    stats: dict = field(default_factory=dict)

    def skip(self, reason: str, path: Path) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, str(path))

    def summary(self) -> str:
        lines = [f"wrote {self.written} samples"]
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"skipped {n} ({reason}), e.g. {self.examples[reason]}")
        return "; ".join(lines)


def find_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, source: Path) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{source}: no column {wanted!r} for the {what}; columns are {columns}")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    raise ValueError(
        f"{source}: cannot tell which column holds the {what}; columns are {columns}. "
        f"Name it with --{what}-column (looked for {', '.join(candidates)})"
    )


def read_caption_table(path: Path, file_column: str | None = None, caption_column: str | None = None) -> dict[str, str]:
    """Read a CSV / JSONL / parquet caption table into ``{file: caption}``."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        columns = list(rows[0].keys()) if rows else []
    elif suffix in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        raise ValueError(f"{path}:{n}: not a JSON object per line ({e})") from e
        columns = sorted({k for r in rows for k in r})
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("reading parquet caption files needs pyarrow: pip install pyarrow") from e
        table = pq.read_table(path)
        columns = table.column_names
        rows = table.to_pylist()
    else:
        raise ValueError(f"{path}: caption table must be .csv, .jsonl or .parquet")
    if not rows:
        raise ValueError(f"{path}: caption table is empty")
    fcol = _pick(columns, file_column, FILE_COLUMNS, "file", path)
    ccol = _pick(columns, caption_column, CAPTION_COLUMNS, "caption", path)
    return {str(r[fcol]): ("" if r.get(ccol) is None else str(r[ccol])) for r in rows}


def _lookup(table: dict[str, str], image: Path, root: Path) -> str | None:
    rel = image.relative_to(root).as_posix()
    for key in (rel, image.name, image.stem, str(image), os.path.splitext(rel)[0]):
        if key in table:
            return table[key]
    return None


def iter_folder(images: Path, captions: Path | None, file_column: str | None,
                caption_column: str | None) -> Iterator[tuple[Path, str | None]]:
    table = read_caption_table(captions, file_column, caption_column) if captions else None
    for path in find_images(images):
        if table is not None:
            yield path, _lookup(table, path, images)
        else:
            sidecar = path.with_suffix(".txt")
            yield path, sidecar.read_text(encoding="utf-8") if sidecar.is_file() else None


def folder_to_shards(images: str | os.PathLike, out: str | os.PathLike, *, captions: str | os.PathLike | None = None,
                     size: int | None = None, shard_size: int = 1000, image_format: str = "jpg",
                     split: str = "train", file_column: str | None = None, caption_column: str | None = None,
                     overwrite: bool = False, progress: bool = True) -> FolderReport:
    """Write every captioned, decodable image under ``images`` into ``out/{split}-NNNNNN.tar``."""
    check_split_name(split)
    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {images} does not exist")
    if size is not None and size < 8:
        raise ValueError(f"--size must be at least 8 px, got {size}")
    report = FolderReport()
    items = list(iter_folder(images, Path(captions) if captions else None, file_column, caption_column))
    if not items:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {images}")
    info = {"kind": "folder", "source": str(images), "captions": str(captions) if captions else "sidecar .txt",
            "image_size": size, "format": image_format}
    with StagedShardDir(out, overwrite=overwrite, info=info) as staged:
        writer = staged.split(split, shard_size)
        for path, caption in tqdm(items, desc=f"shards {split}", unit="img", disable=not progress):
            if caption is None:
                report.skip("no caption", path)
                continue
            caption = caption.strip()
            if not caption:
                report.skip("empty caption", path)
                continue
            try:
                with Image.open(path) as im:
                    im.load()
                    image = as_rgb(im)
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
                report.skip(f"unreadable image: {type(e).__name__}", path)
                continue
            if size is not None:
                image = resize_center_crop(image, size)
            key = path.relative_to(images).with_suffix("").as_posix()
            writer.write({
                "__key__": key.replace(".", "_"),
                image_format: encode_image(image, image_format),
                "txt": caption,
                "json": {"file": path.relative_to(images).as_posix(), "width": image.width, "height": image.height},
            })
            report.written += 1
        if report.written == 0:
            raise ValueError(f"no usable images under {images}: {report.summary()}")
        staged.info["skipped"] = dict(report.skipped)
    report.stats = staged.stats
    for reason, n in sorted(report.skipped.items()):
        log.warning("skipped %d images (%s), e.g. %s", n, reason, report.examples[reason])
    return report
