"""A cache of real-image features, so reference statistics are computed once per
(data set, resolution, feature weights) rather than at every evaluation.

The key hashes the shard files (path, size, modification time), the image size, the number
of images, the Inception weights file and the CLIP scorer's checkpoint; anything that
changes them makes a new entry. Entries are ``.pt`` files of float32 features (``pool``
(N, 2048), and ``clip`` (N, D) when a CLIP scorer was used) under ``$LDM_CACHE/reference``
(default ``~/.cache/ldm/reference``), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor


def cache_dir() -> Path:
    return Path(os.environ.get("LDM_CACHE", "~/.cache/ldm")).expanduser() / "reference"


def _file_id(path: str | None) -> list | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    st = p.stat() if p.exists() else None
    return [str(p.resolve()), st.st_size if st else None, int(st.st_mtime) if st else None]


def reference_key(urls: list[str], image_size: int, n: int, weights: str | None, clip_id: str | None) -> str:
    """A hex digest identifying one reference feature set."""
    blob = {"urls": [_file_id(u) if "://" not in u else u for u in urls], "image_size": image_size, "n": n,
            "weights": _file_id(weights) or "torch-fidelity download", "clip": _file_id(clip_id) if clip_id else None}
    return hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def load_reference(key: str, folder: Path | None = None) -> dict[str, Tensor] | None:
    path = (folder or cache_dir()) / f"{key}.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an unreadable entry is recomputed, not fatal
        return None


def save_reference(key: str, features: dict[str, Tensor], folder: Path | None = None) -> Path:
    folder = folder or cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.pt"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({k: v.float().cpu() for k, v in features.items()}, tmp)
    os.replace(tmp, path)
    return path
