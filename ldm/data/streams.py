"""Iterable datasets over WebDataset shards: resampled training and exact evaluation.

Training (:class:`TrainStream`) draws shards with replacement from a generator
seeded by ``(seed, epoch, rank, worker)``, shuffles samples in a buffer, decodes
and batches *inside the worker* with ``partial=False``, and stops after a fixed
number of batches (``with_epoch``). Every rank therefore yields exactly the same
number of full batches per epoch, however uneven the shards are, which makes
the classic DDP hang on uneven webdataset shards impossible.

Evaluation (:class:`EvalStream`) reads every sample exactly once, in shard order.
The global sample list is cut into one contiguous range per rank, each padded to
``ceil(N / world_size)`` samples with rows marked ``valid=False``, so all ranks
run the same number of batches and metrics that drop the padding are exact.
Within a rank, batches go to the DataLoader workers round-robin (each worker
reads the rank's range but decodes only its own batches), so batches arrive in
shard order whatever the number of workers.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ldm.data.batch import Batch, Tokenizer, collate
from ldm.data.errors import SkipCounter
from ldm.data.transforms import ImageTransform, as_rgb

log = logging.getLogger("ldm.data")

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
TEXT_KEYS = ("txt", "text", "caption")


def load_image(sample: dict[str, Any]) -> Image.Image | None:
    """The sample's image (``png``/``jpg``/...), decoded to RGB; None if it has none.

    Raises ``OSError`` (PIL's ``UnidentifiedImageError`` among them) when the bytes do not decode.
    """
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        return None
    with Image.open(io.BytesIO(sample[key])) as im:
        im.load()
        return as_rgb(im)


def caption_of(sample: dict[str, Any]) -> str:
    """The sample's caption (``txt``/``text``/``caption``), stripped; "" if it has none."""
    key = next((k for k in TEXT_KEYS if k in sample), None)
    return sample[key].decode("utf-8").strip() if key else ""


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


@dataclass(frozen=True)
class SampleDecoder:
    """Raw shard sample (bytes per extension) -> decoded sample dict.

    Decodes the image (``png``/``jpg``/...) through the transform, the caption, the ``json``
    metadata, and every ``.npy`` array (``latent.npy`` -> ``latent``, ``clip_text.npy`` ->
    ``clip_text``, ...) to a tensor. With ``decode_images=False`` (latent-only training) the
    image is skipped. Raises ``ValueError`` for a sample with neither image nor arrays, or
    (when required) without a non-empty caption; the stream's handler counts and skips it.
    """

    transform: ImageTransform
    require_caption: bool = True
    decode_images: bool = True

    def __call__(self, sample: dict[str, Any], rng: random.Random | None = None) -> dict[str, Any]:
        key = sample.get("__key__", "?")
        where = f"sample {key!r} of {sample.get('__url__', '?')}"
        out: dict[str, Any] = {}
        for name, value in sample.items():
            if name.endswith(".npy"):
                out[name[: -len(".npy")]] = torch.from_numpy(np.load(io.BytesIO(value), allow_pickle=False))
        if self.decode_images and (image := load_image(sample)) is not None:
            out["image"] = self.transform(image, rng)
        elif self.decode_images or not out:
            found = sorted(k for k in sample if not k.startswith("__"))
            wanted = ", ".join(IMAGE_KEYS) if self.decode_images else "a .npy array"
            raise ValueError(f"{where} has no image (looked for {wanted}; found {found})")
        text = caption_of(sample)
        if self.require_caption and not text:
            raise ValueError(f"{where} has an empty or missing caption")
        meta = json.loads(sample["json"]) if "json" in sample else {}
        return {**out, "text": text, "meta": meta, "key": key}


class _Progress:
    """Raises when many shards in a row yield no usable sample (instead of spinning forever)."""

    def __init__(self, limit: int, urls: Sequence[str]):
        self.limit, self.urls = limit, urls
        self.good = 0

    def shards(self, rng: random.Random) -> Iterator[dict[str, str]]:
        empty_streak, last_good = 0, self.good
        while True:
            yield {"url": rng.choice(self.urls)}
            if self.good == last_good:
                empty_streak += 1
                if empty_streak >= self.limit:
                    raise RuntimeError(
                        f"{empty_streak} shards in a row gave no usable sample; the training shards "
                        f"({self.urls[0]} ... {len(self.urls)} in all) look unreadable or empty"
                    )
            else:
                empty_streak, last_good = 0, self.good

    def count(self, sample: dict[str, Any]) -> dict[str, Any]:
        self.good += 1
        return sample


#: key of the (role, raw samples read, batches yielded) triple a TrainStream batch carries to the main
#: process; :class:`~ldm.data.datamodule.EpochDataLoader` pops it before the batch reaches the model
POSITION = "_position"


@dataclass(frozen=True)
class WorkerStart:
    """Where one worker role starts an epoch: after ``raw`` samples of its shuffled stream, of which
    ``batches`` full batches were already yielded (both 0 for a fresh epoch)."""

    raw: int = 0
    batches: int = 0


@dataclass(frozen=True)
class StreamStart:
    """Where a resumed epoch starts: ``consumed`` batches of this rank were trained on, and each worker
    role's position (index = role). Batch ``i`` of an epoch comes from role ``i % num_workers``, so a
    resumed DataLoader whose worker ``j`` plays role ``(j + consumed) % num_workers`` yields the remaining
    batches in the uninterrupted order."""

    epoch: int
    consumed: int
    workers: tuple[WorkerStart, ...]


class TrainStream(IterableDataset):
    """Infinite resampled training batches, ``batches_per_rank`` of them per epoch on every rank.

    Resumable: every batch carries its position (:data:`POSITION`), and with ``start`` set (a
    :class:`StreamStart` for the current epoch) each worker fast-forwards its shuffled stream past the
    samples it had read, without decoding them. Augmentation draws come from a generator seeded per
    sample (by its index in the worker's stream), so skipped samples need no replay.
    """

    def __init__(self, urls: Sequence[str], decoder: SampleDecoder, *, batch_size: int, batches_per_rank: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000,
                 skips: SkipCounter | None = None, tokenizer: Tokenizer | None = None):
        super().__init__()
        if not urls:
            raise ValueError("no training shards")
        if batches_per_rank < 1:
            raise ValueError(f"an epoch must have at least one batch per rank, got {batches_per_rank}")
        self.urls = list(urls)
        self.decoder = decoder
        self.batch_size = batch_size
        self.batches_per_rank = batches_per_rank
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.skips = skips or SkipCounter("train")
        self.tokenizer = tokenizer
        self.epoch = 0  # set by the loader before each epoch, copied into the workers
        self.start: StreamStart | None = None  # set by the loader for a resumed epoch

    def batches_for_worker(self, worker: int, num_workers: int) -> int:
        """Batches this worker yields; the DataLoader round-robins workers, so ranks total exactly."""
        return len(range(worker, self.batches_per_rank, num_workers))

    def _role(self, worker: int, num_workers: int) -> tuple[int, WorkerStart]:
        start = self.start
        if start is None or start.epoch != self.epoch:
            return worker, WorkerStart()
        if len(start.workers) != num_workers:
            raise ValueError(f"resume state has {len(start.workers)} worker roles, the loader {num_workers}")
        role = (worker + start.consumed) % num_workers
        return role, start.workers[role]

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = _worker()
        role, begin = self._role(worker, num_workers)
        remaining = self.batches_for_worker(role, num_workers) - begin.batches
        if remaining <= 0:
            return iter(())
        base = (self.seed, self.epoch, self.rank, role)
        progress = _Progress(limit=max(50, 3 * len(self.urls)), urls=self.urls)
        samples = wds.DataPipeline(
            partial(progress.shards, random.Random(_seed(*base, 0))),
            wds.tarfile_to_samples(handler=self.skips),
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=random.Random(_seed(*base, 1))),
        )
        return self._batches(iter(samples), base, role, begin, remaining, progress)

    def _batches(self, samples: Iterator[dict[str, Any]], base: tuple[int, ...], role: int, begin: WorkerStart,
                 remaining: int, progress: _Progress) -> Iterator[Batch]:
        for _ in range(begin.raw):  # fast-forward: read and shuffled as before, not decoded
            next(samples)
        raw, done, buf = begin.raw, begin.batches, []
        for sample in samples:  # infinite: shards are drawn with replacement
            raw += 1
            try:
                item = self.decoder(sample, random.Random(_seed(*base, 2, raw)))
            except Exception as exn:  # counted and skipped (the handler re-raises what it does not skip)
                if self.skips(exn):
                    continue
                raise
            buf.append(progress.count(item))
            if len(buf) < self.batch_size:
                continue
            batch, buf, done = collate(buf, self.tokenizer), [], done + 1
            batch[POSITION] = (role, raw, done)
            yield batch
            remaining -= 1
            if remaining == 0:
                return


def _log_and_continue(exn: BaseException) -> bool:
    log.warning("shard read error: %s: %s", type(exn).__name__, str(exn)[:300])
    return True


class EvalStream(IterableDataset):
    """Every evaluation sample exactly once across ranks, padded so that all ranks run equally long."""

    def __init__(self, urls: Sequence[str], counts: Sequence[int], decoder: SampleDecoder, *, batch_size: int,
                 rank: int = 0, world_size: int = 1, skips: SkipCounter | None = None,
                 tokenizer: Tokenizer | None = None):
        super().__init__()
        if len(urls) != len(counts):
            raise ValueError("one sample count per shard is needed")
        self.urls, self.counts = list(urls), [int(c) for c in counts]
        self.decoder = decoder
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.skips = skips or SkipCounter("val")
        self.tokenizer = tokenizer
        self.total = sum(self.counts)
        self.per_rank = math.ceil(self.total / world_size)
        self.start = min(rank * self.per_rank, self.total)
        self.stop = min(self.start + self.per_rank, self.total)
        self._template: dict[str, Any] | None = None

    def __len__(self) -> int:
        """Batches per rank (the same on every rank)."""
        return math.ceil(self.per_rank / self.batch_size)

    def _samples(self, lo: int, hi: int) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """Yield ``(global_index, raw sample)`` for global indices in ``[lo, hi)``; None where unreadable."""
        offset = 0
        for url, count in zip(self.urls, self.counts):
            first, end = offset, offset + count
            offset = end
            if end <= lo or first >= hi:
                continue
            index = first
            # tar-level errors are logged here; the samples they lose are counted one by one below
            stream = wds.tarfile_to_samples(handler=_log_and_continue)([{"url": url}])
            for sample in stream:
                if index >= hi or index >= end:
                    break
                if index >= lo:
                    yield index, sample
                index += 1
            # a shard shorter than its recorded count (truncated since): report the gap as unreadable
            while index < min(end, hi):
                if index >= lo:
                    yield index, None
                index += 1

    def _placeholder(self, index: int) -> dict[str, Any]:
        """A padding row shaped like the real ones (zeros), marked ``valid=False``."""
        if self._template is None:
            self._template = self._first_decodable()
        if self._template is not None:
            tensors = {k: torch.zeros_like(v) for k, v in self._template.items() if isinstance(v, torch.Tensor)}
        else:
            size = self.decoder.transform.size
            tensors = {"image": torch.zeros(3, size, size)}
        return {**tensors, "text": "", "meta": {}, "key": f"<pad:{index}>", "valid": False}

    def _first_decodable(self) -> dict[str, Any] | None:
        """A decoded sample of the split to shape padding rows like, for a rank without a readable sample
        of its own (its padding must carry ``latent`` / ``clip_*`` too, not only an image), or None."""
        for _, raw in self._samples(0, min(self.total, 64)):
            if raw is None:
                continue
            try:
                return self.decoder(raw)
            except Exception:  # noqa: BLE001 - any bad sample: try the next one
                continue
        return None

    def _mine(self, local: int, worker: int, num_workers: int) -> bool:
        # batches go to workers round-robin, as the DataLoader collects them: the order is the shard order
        return (local // self.batch_size) % num_workers == worker

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = _worker()
        real = self.stop - self.start  # samples of this rank; the rest up to per_rank is padding
        buf: list[dict[str, Any]] = []
        for index, raw in self._samples(self.start, self.stop):
            local = index - self.start
            if not self._mine(local, worker, num_workers):
                continue
            item = None
            if raw is not None:
                try:
                    item = {**self.decoder(raw), "valid": True}
                    if self._template is None:
                        self._template = item
                except Exception as exn:  # counted, logged, replaced by a padding row
                    self.skips(exn)
            else:
                self.skips(EOFError(f"sample {index} is missing from its shard (truncated since it was written?)"))
            buf.append(item if item is not None else self._placeholder(index))
            if len(buf) == self.batch_size:
                yield collate(buf, self.tokenizer)
                buf = []
        for local in range(real, self.per_rank):
            if self._mine(local, worker, num_workers):
                buf.append(self._placeholder(self.start + local))
                if len(buf) == self.batch_size:
                    yield collate(buf, self.tokenizer)
                    buf = []
        if buf:
            yield collate(buf, self.tokenizer)


def make_decoder(size: int, crop: str = "center", flip: bool = False, require_caption: bool = True,
                 decode_images: bool = True) -> SampleDecoder:
    return SampleDecoder(ImageTransform(size=size, crop=crop, flip=flip), require_caption=require_caption,
                         decode_images=decode_images)

