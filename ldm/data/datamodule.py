"""The LightningDataModule over WebDataset shard patterns (train / val / test).

See :mod:`ldm.data.streams` for how batches are made equal across ranks and how
evaluation stays exact, and :mod:`ldm.data.batch` for the keys of a batch.
"""

from __future__ import annotations

import logging
from typing import Literal

import pytorch_lightning as L
from torch.utils.data import DataLoader

from ldm.data.batch import Tokenizer
from ldm.data.errors import SkipCounter
from ldm.data.streams import EvalStream, TrainStream, make_decoder
from ldm.data.urls import ShardPattern, expand_urls, shard_sample_counts

log = logging.getLogger(__name__)


class EpochDataLoader(DataLoader):
    """A DataLoader over a :class:`TrainStream` that hands the trainer's epoch to the workers.

    Workers are re-created every epoch (``persistent_workers=False``) and receive a
    copy of the stream, so setting ``stream.epoch`` before ``iter()`` reseeds them.
    """

    def __init__(self, dataset: TrainStream, epoch_fn=None, **kwargs):
        kwargs.pop("persistent_workers", None)
        super().__init__(dataset, batch_size=None, persistent_workers=False, **kwargs)
        self.epoch_fn = epoch_fn
        self._iterations = 0

    def __iter__(self):
        self.dataset.epoch = self.epoch_fn() if self.epoch_fn is not None else self._iterations
        self._iterations += 1
        return super().__iter__()

    def __len__(self) -> int:
        return self.dataset.batches_per_rank


class ShardDataModule(L.LightningDataModule):
    """Image-caption batches from WebDataset shards.

    Args:
        train: shard pattern of the training split, e.g. ``shards/train-{000000..000009}.tar``.
        val: shard pattern of the validation split (exact, rank-split, deterministic).
        test: shard pattern for ``ldm test`` (read like ``val``).
        image_size: side of the square images, in pixels.
        batch_size: samples per batch on each rank.
        val_batch_size: batch size for validation / test (default: ``batch_size``).
        num_workers: DataLoader worker processes per rank.
        crop: ``random`` or ``center`` crop for training (evaluation always crops the centre).
        flip: random horizontal flips in training (mirrors "left"/"right" captions: off by default).
        shuffle_buffer: samples held in each worker's shuffle buffer.
        samples_per_epoch: training samples per epoch over all ranks (default: the size of the
            training split). Each rank yields ``samples_per_epoch // (world_size * batch_size)`` batches.
        seed: seed of shard resampling, shuffling and augmentation (mixed with epoch, rank, worker).
        require_caption: skip samples with an empty caption (count them) instead of passing "".
        skip_log_interval_s: at most one log line per this many seconds about skipped samples.
        decode_images: decode the images; false for latent shards (``ldm precompute latents``) when the
            model trains on ``batch["latent"]`` only.
        tokenizer: turns a list of captions into a (B, T) tensor; linked from the model by the CLI.
    """

    def __init__(self, train: ShardPattern | None = None, val: ShardPattern | None = None,
                 test: ShardPattern | None = None, image_size: int = 64, batch_size: int = 32,
                 val_batch_size: int | None = None, num_workers: int = 2,
                 crop: Literal["center", "random"] = "random", flip: bool = False, shuffle_buffer: int = 1000,
                 samples_per_epoch: int | None = None, seed: int = 0, require_caption: bool = True,
                 skip_log_interval_s: float = 30.0, decode_images: bool = True, tokenizer: Tokenizer | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.train_pattern, self.val_pattern, self.test_pattern = train, val, test
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.crop, self.flip = crop, flip
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.require_caption = require_caption
        self.decode_images = decode_images
        self.tokenizer = tokenizer
        self.skips = {name: SkipCounter(name, skip_log_interval_s) for name in ("train", "val", "test")}

    # -- distributed context ------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    # -- loaders ------------------------------------------------------------------------
    def train_stream(self) -> TrainStream:
        if self.train_pattern is None:
            raise ValueError("data.train is not set: name the training shards, e.g. --data.train 'shards/train-{000000..000009}.tar'")
        urls = expand_urls(self.train_pattern)
        rank, world = self._rank_world()
        total = self.samples_per_epoch
        if total is None:
            total = sum(shard_sample_counts(urls))
        batches = total // (world * self.batch_size)
        if batches < 1:
            raise ValueError(
                f"{total} samples per epoch cannot fill one batch of {self.batch_size} on each of {world} ranks; "
                "lower data.batch_size or raise data.samples_per_epoch"
            )
        decoder = make_decoder(self.image_size, self.crop, self.flip, self.require_caption, self.decode_images)
        return TrainStream(urls, decoder, batch_size=self.batch_size, batches_per_rank=batches, seed=self.seed,
                           rank=rank, world_size=world, shuffle_buffer=self.shuffle_buffer,
                           skips=self.skips["train"], tokenizer=self.tokenizer)

    def eval_stream(self, split: str = "val") -> EvalStream:
        pattern = {"val": self.val_pattern, "test": self.test_pattern}[split]
        if pattern is None:
            raise ValueError(f"data.{split} is not set: name the {split} shards")
        urls = expand_urls(pattern)
        rank, world = self._rank_world()
        decoder = make_decoder(self.image_size, "center", False, self.require_caption, self.decode_images)
        return EvalStream(urls, shard_sample_counts(urls), decoder, batch_size=self.val_batch_size, rank=rank,
                          world_size=world, skips=self.skips[split], tokenizer=self.tokenizer)

    def train_dataloader(self) -> DataLoader:
        stream = self.train_stream()
        return EpochDataLoader(stream, epoch_fn=self._current_epoch, num_workers=self.num_workers,
                               pin_memory=self._pin_memory())

    def _eval_loader(self, split: str) -> DataLoader:
        stream = self.eval_stream(split)
        workers = min(self.num_workers, len(stream))
        return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=self._pin_memory())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _pin_memory(self) -> bool:
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
