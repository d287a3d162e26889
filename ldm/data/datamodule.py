"""The LightningDataModule over WebDataset shard patterns (train / val / test).

See :mod:`ldm.data.streams` for how batches are made equal across ranks and how
evaluation stays exact, and :mod:`ldm.data.batch` for the keys of a batch.
"""

from __future__ import annotations

import atexit
import logging
import signal
import weakref
from collections.abc import Callable
from typing import Any, Literal

import pytorch_lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader

from ldm.data.batch import Tokenizer
from ldm.data.errors import SkipCounter
from ldm.data.streams import POSITION, EvalStream, StreamStart, TrainStream, WorkerStart, make_decoder
from ldm.data.urls import ShardPattern, expand_urls, shard_sample_counts
from ldm.data.workers import (PREEMPTION_SIGNALS, ChainedInit, ignore_preemption_signal, start_forkserver,
                              worker_context)

log = logging.getLogger(__name__)


#: the live workers of every PreemptionSafeLoader of this process (killed at exit: see _kill_workers_at_exit)
_WORKERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _kill_workers_at_exit() -> None:
    """Kill the loader workers still running when the process exits.

    They ignore SIGTERM, and at exit Python's multiprocessing ends its daemonic children with SIGTERM and
    then waits for them: a worker whose loader was not shut down (an error raised from a worker, whose
    traceback keeps the loader's iterator alive) kept ``ldm fit`` waiting forever after it had printed
    its error. Registered after multiprocessing's own exit hook, so it runs first. Workers hold nothing
    to save: they only read shards."""
    workers = [w for w in list(_WORKERS) if w.is_alive()]
    if workers:  # torch's SIGCHLD handler would report the kill as a failed worker
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


class PreemptionSafeLoader(DataLoader):
    """A DataLoader whose workers never act on SLURM's preemption signals (USR1, SIGTERM).

    The workers are created with the signals blocked (a forked or spawned process inherits the signal
    mask) and unblock it only after ignoring it (:func:`ignore_preemption_signal`, run before any
    ``worker_init_fn`` given here): there is no window in which a starting worker could handle it.
    As they ignore SIGTERM, the ones still running when the process exits are killed
    (:func:`_kill_workers_at_exit`).
    """

    def __init__(self, *args, **kwargs):
        user_init = kwargs.pop("worker_init_fn", None)
        kwargs["worker_init_fn"] = ignore_preemption_signal if user_init is None else ChainedInit(user_init)
        if kwargs.get("num_workers", 0) > 0 and kwargs.get("multiprocessing_context") is None:
            kwargs["multiprocessing_context"] = worker_context()
        super().__init__(*args, **kwargs)

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
        try:
            if self.multiprocessing_context.get_start_method() == "forkserver":
                start_forkserver(self.dataset, self.worker_init_fn, self.collate_fn)  # the first time only
            iterator = super()._get_iterator()  # the workers start here
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _WORKERS.update(getattr(iterator, "_workers", ()))  # torch's multi-process iterator keeps its processes there
        return iterator


class EpochDataLoader(PreemptionSafeLoader):
    """A DataLoader over a :class:`TrainStream` that hands the trainer's epoch to the workers and can
    resume in the middle of an epoch.

    Workers are re-created every epoch (``persistent_workers=False``) and receive a
    copy of the stream, so setting ``stream.epoch`` before ``iter()`` reseeds them.

    Resuming: Lightning saves ``state_dict()`` into every checkpoint and hands it back to
    ``load_state_dict()`` on ``--ckpt_path`` / SLURM requeue (the ``Stateful`` protocol its fit loop
    checks for, as torchdata's ``StatefulDataLoader``). The state is the position, in each worker's
    stream, of the last batch the *model trained on* (``consumed_fn``: the fit loop's count of processed
    batches of the epoch), not of the last batch fetched: Lightning prefetches ahead. Under DDP every
    rank's state is gathered into the checkpoint, which rank 0 writes.
    """

    def __init__(self, dataset: TrainStream, epoch_fn: Callable[[], int] | None = None,
                 consumed_fn: Callable[[], int] | None = None, **kwargs):
        kwargs.pop("persistent_workers", None)
        super().__init__(dataset, batch_size=None, persistent_workers=False, **kwargs)
        self.epoch_fn = epoch_fn
        self.consumed_fn = consumed_fn
        self._iterations = 0
        self._start: StreamStart | None = None  # where the current epoch's iteration began
        self._positions: list[tuple[int, int, int]] = []  # (role, raw, batches) of each batch since then
        self._to_load: StreamStart | None = None

    def __iter__(self):
        epoch = self.epoch_fn() if self.epoch_fn is not None else self._iterations
        self._iterations += 1
        stream: TrainStream = self.dataset
        stream.epoch = epoch
        start = self._to_load if self._to_load is not None and self._to_load.epoch == epoch else None
        self._to_load = None
        if start is not None:
            log.info("resuming epoch %d of the training data after batch %d (fast-forward, no decoding)",
                     epoch, start.consumed)
        stream.start = start
        try:
            batches = super().__iter__()  # workers take their copy of the stream (with its start) here
        finally:
            stream.start = None
        workers = max(1, self.num_workers)
        self._start = start or StreamStart(epoch, 0, tuple(WorkerStart() for _ in range(workers)))
        self._positions = []
        return self._track(batches)

    def _track(self, batches):
        for batch in batches:
            self._positions.append(batch.pop(POSITION))
            yield batch

    def __len__(self) -> int:
        return self.dataset.batches_per_rank

    # -- resume state -----------------------------------------------------------------------
    def _local_state(self) -> dict[str, Any] | None:
        if self._start is None:
            return None
        consumed = self.consumed_fn() if self.consumed_fn is not None else self._start.consumed + len(self._positions)
        workers = [(w.raw, w.batches) for w in self._start.workers]
        for role, raw, batches in self._positions[: max(0, consumed - self._start.consumed)]:
            workers[role] = (raw, batches)
        return {"epoch": self._start.epoch, "consumed": consumed, "workers": workers}

    def state_dict(self) -> dict[str, Any]:
        """Every rank's data position; collective under DDP (Lightning dumps checkpoints on all ranks)."""
        local = self._local_state()
        stream: TrainStream = self.dataset
        ranks = [local]
        if stream.world_size > 1 and dist.is_available() and dist.is_initialized():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, local)
        return {"version": 1, "world_size": stream.world_size, "batch_size": stream.batch_size,
                "batches_per_rank": stream.batches_per_rank, "num_workers": max(1, self.num_workers), "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stream: TrainStream = self.dataset
        now = {"world_size": stream.world_size, "batch_size": stream.batch_size,
               "batches_per_rank": stream.batches_per_rank, "num_workers": max(1, self.num_workers)}
        changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        ranks = state.get("ranks") or []
        if changed or len(ranks) <= stream.rank or ranks[stream.rank] is None:
            what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()) or "no data position saved"
            log.warning("the training data cannot resume exactly where the checkpoint stopped (%s): the "
                        "current epoch restarts its data stream from the beginning", what)
            return
        mine = ranks[stream.rank]
        self._to_load = StreamStart(int(mine["epoch"]), int(mine["consumed"]),
                                    tuple(WorkerStart(int(r), int(b)) for r, b in mine["workers"]))


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

    def _consumed_batches(self) -> int:
        """Training batches of the current epoch the model has trained on (Lightning's processed count)."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

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
        return EpochDataLoader(stream, epoch_fn=self._current_epoch, consumed_fn=self._consumed_batches,
                               num_workers=self.num_workers, pin_memory=self._pin_memory())

    def _eval_loader(self, split: str) -> DataLoader:
        stream = self.eval_stream(split)
        workers = min(self.num_workers, len(stream))
        return PreemptionSafeLoader(stream, batch_size=None, num_workers=workers, pin_memory=self._pin_memory())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _pin_memory(self) -> bool:
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
