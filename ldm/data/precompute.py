"""Add model outputs to shards for the later stages (``ldm precompute latents|embeddings``).

For every input shard ``NAME.tar`` an output shard ``NAME.tar`` is written holding what the
input had plus new ``.npy`` members:

* latents: ``latent.npy`` (float32, multiplied by the autoencoder's scale factor), optionally
  ``latent_std.npy`` (the KL posterior's std, scaled the same way); the images are dropped
  unless ``keep_images``.
* embeddings: ``clip_image.npy`` and ``clip_text.npy`` (pooled, normalised) and
  ``clip_tokens.npy`` (the text tower's per-token features, (T, W)); everything is kept.

So the two compose: embeddings first (on image shards), then latents. Each output shard is
written under a temporary name and renamed when complete: a rerun skips finished shards.
A ``stats.json`` lists the shards and counts per split prefix.

Over several processes (``ranks``: an :class:`ldm.pipelines.distributed.Ranks`, or anything with its
``strided`` and ``gather``) each rank encodes every ``world_size``-th input shard and writes the
output shards of the same names, so none is written twice and the output is that of one process;
rank 0 gathers the counts and alone writes ``stats.json``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from ldm.data.streams import IMAGE_KEYS, caption_of, load_image
from ldm.data.transforms import ImageTransform
from ldm.data.urls import expand_urls, is_remote, shard_sample_counts
from ldm.data.writer import read_splits, split_entry, write_stats

Encoder = Callable[[list[dict[str, Any]]], list[dict[str, bytes]]]


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _map_shards(urls: list[str], out: Path, encode: Encoder, *, batch_size: int, drop: tuple[str, ...],
                desc: str, progress: bool, info: dict[str, Any], ranks=None) -> dict | None:
    """Run ``encode`` over batches of raw samples of every shard (this rank's share of them); write shard by
    shard, resumably. The stats, on rank 0 (None on the others)."""
    out.mkdir(parents=True, exist_ok=True)
    if ranks is not None:
        urls = ranks.strided(urls)
    local = [u for u in urls if not is_remote(u)]
    total = sum(shard_sample_counts(local)) if len(local) == len(urls) else None
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress)
    counts: dict[str, int] = {}
    skipped = 0
    for url in urls:
        name = os.path.basename(url)
        target = out / name
        if target.is_file():  # finished by an earlier run
            counts[name] = sum(shard_sample_counts([str(target)]))
            bar.update(counts[name])
            continue
        tmp = out / f".{name}.tmp"
        n = 0
        try:
            with wds.TarWriter(str(tmp)) as writer:
                batch: list[dict[str, Any]] = []

                def flush() -> None:
                    nonlocal n, skipped
                    if not batch:
                        return
                    try:
                        extras = encode(batch)
                    except (OSError, ValueError):  # one bad image: encode one by one, skip the bad ones
                        extras = []
                        for sample in batch:
                            try:
                                extras.append(encode([sample])[0])
                            except (OSError, ValueError):
                                extras.append(None)
                    for sample, extra in zip(batch, extras):
                        if extra is None:
                            skipped += 1
                            continue
                        record = {k: v for k, v in sample.items()
                                  if not k.startswith("__") and k not in drop and k not in extra}
                        writer.write({"__key__": sample["__key__"], **record, **extra})
                        n += 1
                    bar.update(len(batch))
                    batch.clear()

                for sample in wds.tarfile_to_samples(handler=wds.warn_and_continue)([{"url": url}]):
                    batch.append(sample)
                    if len(batch) == batch_size:
                        flush()
                flush()
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        counts[name] = n
    bar.close()
    if ranks is not None:
        parts = ranks.gather((counts, skipped))
        if parts is None:
            return None
        counts = {name: c for part, _ in parts for name, c in part.items()}
        skipped = sum(s for _, s in parts)
    splits = read_splits(out)
    for prefix in sorted({n.rpartition("-")[0] or n for n in counts}):  # train-000001.tar -> train
        shard_counts = {**splits.get(prefix, {}).get("shard_counts", {}),
                        **{n: c for n, c in counts.items() if (n.rpartition("-")[0] or n) == prefix}}
        splits[prefix] = split_entry(out, shard_counts)
    stats = {**info, "skipped": skipped, "splits": splits}
    write_stats(out, stats)
    return stats


def _images(batch: list[dict[str, Any]], transform: ImageTransform) -> torch.Tensor:
    images = []
    for sample in batch:
        image = load_image(sample)
        if image is None:
            raise ValueError(f"sample {sample.get('__key__')} has no image")
        images.append(transform(image))
    return torch.stack(images)


def precompute_latents(autoencoder, shards: str, out: str | os.PathLike, *, size: int, batch_size: int = 32,
                       with_std: bool = False, keep_images: bool = False, device: str = "cpu",
                       progress: bool = True, ranks=None) -> dict | None:
    """Encode every image of ``shards`` with a trained autoencoder into ``out``; returns the stats (None on
    ranks other than 0 of ``ranks``)."""
    urls = expand_urls(shards)
    if not urls:
        raise ValueError(f"no shards match {shards!r}")
    autoencoder = autoencoder.to(device).eval()
    transform = ImageTransform(size=size, crop="center")

    @torch.no_grad()
    def encode(batch):
        mean, std = autoencoder.encode_posterior(_images(batch, transform).to(device))
        extras = []
        for i in range(len(batch)):
            extra = {"latent.npy": npy(mean[i].float().cpu().numpy())}
            if with_std and std is not None:
                extra["latent_std.npy"] = npy(std[i].float().cpu().numpy())
            extras.append(extra)
        return extras

    info = {"kind": "latents", "source": shards, "image_size": size, "with_std": with_std,
            "scale_factor": float(autoencoder.scale_factor)}
    return _map_shards(urls, Path(out), encode, batch_size=batch_size, drop=() if keep_images else IMAGE_KEYS,
                       desc="precompute latents", progress=progress, info=info, ranks=ranks)


def precompute_embeddings(text_encoder, shards: str, out: str | os.PathLike, *, batch_size: int = 64,
                          with_tokens: bool = True, device: str = "cpu", progress: bool = True,
                          ranks=None) -> dict | None:
    """Add CLIP image / text embeddings (and per-token text features) to every sample of ``shards``; returns
    the stats (None on ranks other than 0 of ``ranks``)."""
    urls = expand_urls(shards)
    if not urls:
        raise ValueError(f"no shards match {shards!r}")
    if not getattr(text_encoder, "has_image_tower", True):
        raise ValueError("CLIP embeddings need a whole CLIP; this text encoder is a text tower alone (an imported "
                         "one): precompute with a contrastive run (--ckpt) or an open_clip model (--model-name)")
    text_encoder = text_encoder.to(device).eval()
    clip = text_encoder.model
    transform = ImageTransform(size=clip.image_size[0], crop="center")

    @torch.no_grad()
    def encode(batch):
        captions = [caption_of(sample) for sample in batch]
        text = text_encoder(text_encoder.tokenizer(captions).to(device))
        has_images = all(any(k in s for k in IMAGE_KEYS) for s in batch)
        image = clip.encode_image(_images(batch, transform).to(device)) if has_images else None
        extras = []
        for i in range(len(batch)):
            extra = {"clip_text.npy": npy(text["pooled"][i].float().cpu().numpy())}
            if image is not None:
                extra["clip_image.npy"] = npy(image[i].float().cpu().numpy())
            if with_tokens:
                extra["clip_tokens.npy"] = npy(text["tokens"][i].float().cpu().numpy())
                extra["clip_mask.npy"] = npy(text["mask"][i].cpu().numpy())
            extras.append(extra)
        return extras

    info = {"kind": "embeddings", "source": shards, "with_tokens": with_tokens}
    return _map_shards(urls, Path(out), encode, batch_size=batch_size, drop=(), desc="precompute embeddings",
                       progress=progress, info=info, ranks=ranks)
