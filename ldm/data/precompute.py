"""Encode image shards into latent shards for the diffusion stages (``ldm precompute latents``).

For every input shard ``NAME.tar`` an output shard ``NAME.tar`` is written with, per sample,
``latent.npy`` (float32, already multiplied by the autoencoder's scale factor), optionally
``latent_std.npy`` (the KL posterior's std, scaled the same way), the original ``txt`` and
``json``, and the image itself with ``keep_images``. Each output shard is written to a
temporary name and renamed when complete, so an interrupted run resumes by skipping the
shards that exist. A ``stats.json`` lists the shards and counts.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ldm.autoencoder import DiagonalGaussian
from ldm.data.streams import IMAGE_KEYS
from ldm.data.transforms import ImageTransform
from ldm.data.urls import expand_urls, is_remote, shard_sample_counts
from ldm.data.writer import brace_pattern


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@torch.no_grad()
def _encode(autoencoder, images: torch.Tensor, with_std: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    h = autoencoder.encoder(images)
    scale = autoencoder.scale_factor
    if isinstance(autoencoder.bottleneck, DiagonalGaussian):
        mean, logvar = autoencoder.bottleneck.moments(h)
        return mean * scale, ((0.5 * logvar).exp() * scale) if with_std else None
    z, _ = autoencoder.bottleneck(h)
    return z * scale, None


def precompute_latents(autoencoder, shards: str, out: str | os.PathLike, *, size: int, batch_size: int = 32,
                       with_std: bool = False, keep_images: bool = False, device: str = "cpu",
                       progress: bool = True) -> dict:
    """Write latent shards for every shard of ``shards`` into ``out``; returns the stats."""
    urls = expand_urls(shards)
    if not urls:
        raise ValueError(f"no shards match {shards!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    autoencoder = autoencoder.to(device).eval()
    transform = ImageTransform(size=size, crop="center")
    local = [u for u in urls if not is_remote(u)]
    total = sum(shard_sample_counts(local)) if len(local) == len(urls) else None
    bar = tqdm(total=total, desc="precompute latents", unit="img", disable=not progress)
    counts: dict[str, int] = {}
    skipped = 0
    for url in urls:
        name = os.path.basename(url)
        target = out / name
        if target.is_file():  # finished earlier: resume
            counts[name] = sum(shard_sample_counts([str(target)]))
            bar.update(counts[name])
            continue
        tmp = out / f".{name}.tmp"
        n = 0
        try:
            with wds.TarWriter(str(tmp)) as writer:
                batch: list[tuple[dict, torch.Tensor]] = []

                def flush() -> None:
                    nonlocal n
                    if not batch:
                        return
                    images = torch.stack([img for _, img in batch]).to(device)
                    mean, std = _encode(autoencoder, images, with_std)
                    for i, (sample, _) in enumerate(batch):
                        record = {"__key__": sample["__key__"], "latent.npy": _npy(mean[i].float().cpu().numpy())}
                        if std is not None:
                            record["latent_std.npy"] = _npy(std[i].float().cpu().numpy())
                        for k in ("txt", "json", *(IMAGE_KEYS if keep_images else ())):
                            if k in sample:
                                record[k] = sample[k]
                        writer.write(record)
                    n += len(batch)
                    bar.update(len(batch))
                    batch.clear()

                for sample in wds.tarfile_to_samples(handler=wds.warn_and_continue)([{"url": url}]):
                    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
                    try:
                        if image_key is None:
                            raise ValueError("no image")
                        with Image.open(io.BytesIO(sample[image_key])) as im:
                            im.load()
                            batch.append((sample, transform(im)))
                    except (OSError, ValueError):
                        skipped += 1
                        continue
                    if len(batch) == batch_size:
                        flush()
                flush()
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        counts[name] = n
    bar.close()
    stats_path = out / "stats.json"
    previous = json.loads(stats_path.read_text()).get("splits", {}) if stats_path.is_file() else {}
    splits = dict(previous)
    for prefix in sorted({n.rpartition("-")[0] or n for n in counts}):  # train-000001.tar -> train
        shard_counts = {**previous.get(prefix, {}).get("shard_counts", {}),
                        **{n: c for n, c in counts.items() if (n.rpartition("-")[0] or n) == prefix}}
        names = sorted(shard_counts)
        splits[prefix] = {"samples": sum(shard_counts.values()), "shards": names, "shard_counts": shard_counts,
                          "pattern": str(out / brace_pattern(names))}
    stats = {"kind": "latents", "source": shards, "image_size": size, "with_std": with_std,
             "scale_factor": float(autoencoder.scale_factor), "skipped": skipped, "splits": splits}
    stats_path.write_text(json.dumps(stats, indent=2) + "\n")
    return stats
