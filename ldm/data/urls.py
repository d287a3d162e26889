"""Shard URL patterns: brace expansion, globs, `::` lists, existence checks, counts.

A *shard pattern* is what a config names for a split, e.g.
``data/shapes/train-{000000..000009}.tar`` or ``a-{0..3}.tar::b-*.tar``.
The CLI checks that local shard files exist once the config is fully composed,
so a typo fails before any model or data is built; remote URLs (``pipe:``,
``s3://``, ``http://``) are passed through to webdataset untouched.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

from braceexpand import braceexpand

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "gcs://", "hf://", "ais://")


def is_remote(url: str) -> bool:
    return url.startswith(_REMOTE_PREFIXES)


def _local_path(url: str) -> str:
    return url[len("file:") :] if url.startswith("file:") else url


def expand_urls(pattern: str | Sequence[str]) -> list[str]:
    """Expand a shard pattern into a list of URLs, in order.

    ``::`` separates several patterns (as in webdataset); each is brace-expanded;
    a local pattern holding ``*``, ``?`` or ``[`` is globbed (sorted).
    """
    parts = list(pattern) if not isinstance(pattern, str) else pattern.split("::")
    urls: list[str] = []
    for part in parts:
        part = part.strip()
        if not part:
            continue
        for url in braceexpand(part):
            if not is_remote(url) and any(c in url for c in "*?["):
                urls.extend(sorted(glob.glob(os.path.expanduser(_local_path(url)))))
            else:
                urls.append(os.path.expanduser(url) if not is_remote(url) else url)
    return urls


def missing_shards(urls: Sequence[str]) -> list[str]:
    return [u for u in urls if not is_remote(u) and not os.path.isfile(_local_path(u))]


class ShardPattern(str):
    """A shard pattern (used as a config type).

    The CLI calls :meth:`check` on every ShardPattern of the fully composed config (after
    all files and overrides, relative to the working directory) and rejects the config with
    the key and the missing files named, before any model or data is built.
    """

    def __new__(cls, value: str) -> "ShardPattern":
        if not isinstance(value, str) or not value.strip():
            raise ValueError("expected a non-empty shard pattern such as 'shards/train-{000000..000009}.tar'")
        return super().__new__(cls, value)

    def check(self) -> None:
        """Raise ``ValueError`` naming the missing files if a local shard does not exist."""
        value = str(self)
        urls = expand_urls(value)
        if not urls:
            raise ValueError(f"shard pattern {value!r} matches no files")
        missing = missing_shards(urls)
        if missing:
            shown = ", ".join(missing[:3]) + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
            raise ValueError(
                f"shard pattern {value!r}: {len(missing)} of {len(urls)} shard files do not exist: {shown}. "
                "Make shards with `ldm shards synthetic ...` or `ldm shards from-folder ...`, "
                "or fix the path."
            )


def _register_with_jsonargparse() -> None:
    from jsonargparse.typing import register_type

    register_type(ShardPattern, serializer=str, deserializer=ShardPattern)


_register_with_jsonargparse()


def _counts_from_stats(url: str) -> int | None:
    """Sample count of a shard as recorded by our writers in the sibling stats.json."""
    path = Path(_local_path(url))
    stats = path.parent / "stats.json"
    if not stats.is_file():
        return None
    try:
        data = json.loads(stats.read_text())
    except (OSError, ValueError):
        return None
    for split in data.get("splits", {}).values():
        counts = split.get("shard_counts", {})
        if path.name in counts:
            return int(counts[path.name])
    return None


def count_tar_samples(url: str) -> int:
    """Count samples in a local tar shard by reading member headers only.

    A sample is a distinct key prefix (everything before the first dot of the
    basename), as webdataset groups files. A truncated tar counts what it can read.
    """
    keys: set[str] = set()
    try:
        with tarfile.open(_local_path(url), mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, base = os.path.split(member.name)
                if base.startswith("__"):
                    continue
                keys.add(os.path.join(dirname, base.split(".", 1)[0]))
    except (tarfile.TarError, OSError, EOFError):
        pass
    return len(keys)


def shard_sample_counts(urls: Sequence[str]) -> list[int]:
    """Samples per shard: from our stats.json when it lists the shard, else by scanning headers."""
    counts = []
    for url in urls:
        if is_remote(url):
            raise ValueError(
                f"cannot count the samples of remote shard {url!r}; set the number of samples explicitly "
                "(e.g. data.samples_per_epoch / data.val_samples)"
            )
        n = _counts_from_stats(url)
        counts.append(n if n is not None else count_tar_samples(url))
    return counts
