"""What resuming mid-epoch costs: the data position restored by fast-forward vs replaying N batches.

    python experiments/bench/resume.py [--samples 4000] [--size 256] [--batch-size 32] [--at 50 100]

A resumed run (``--ckpt_path`` or a SLURM requeue) restores each DataLoader worker's position in
its shuffled shard stream from the checkpoint (:class:`ldm.data.datamodule.EpochDataLoader`). The
skipped samples are read from the tar files and pass through the shuffle buffer, but are not
decoded or transformed. This script times, for the same loader and position N (in batches):

* replay: iterating batches 0..N-1 of the epoch (what a loader without state would have to do
  to land on the same batches: read, decode, augment, collate N batches);
* fast-forward: a loader restored at batch N, up to its first batch (batch N);
* one batch: a fresh loader up to its first batch (the floor: worker start-up, first shard, buffer fill).

and checks that the restored loader's first batch is batch N of the uninterrupted epoch.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from ldm.data.datamodule import ShardDataModule
from ldm.data.synthetic import write_synthetic_shards


def loader_at(dm: ShardDataModule, at: int, state: dict | None):
    loader = dm.train_dataloader()
    loader.consumed_fn = None  # no trainer: the batches taken from the loader count as trained on
    if state is not None:
        loader.load_state_dict(state)
    return loader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--at", type=int, nargs="+", default=[50, 100])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_shards(Path(tmp), train=args.samples, val=0, size=args.size, seed=0, shard_size=500,
                               progress=False)
        dm = ShardDataModule(train=f"{tmp}/train-*.tar", image_size=args.size, batch_size=args.batch_size,
                             num_workers=args.workers, crop="random", flip=True)
        print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.samples} shapes "
              f"scenes at {args.size} px (PNG), batch {args.batch_size}, {args.workers} workers")
        print("| position N | replay N batches (s) | fast-forward to N (s) | fresh loader, 1 batch (s) | same batch |")
        print("|---:|---:|---:|---:|---|")
        for at in args.at:
            loader = loader_at(dm, at, None)
            t0 = time.perf_counter()
            it = iter(loader)
            for _ in range(at):
                next(it)
            replay = time.perf_counter() - t0
            state = loader.state_dict()  # what a checkpoint after N trained batches holds
            reference = next(it)["key"]
            del it
            fresh = loader_at(dm, 0, None)
            t0 = time.perf_counter()
            next(iter(fresh))
            one = time.perf_counter() - t0
            resumed = loader_at(dm, at, state)
            t0 = time.perf_counter()
            first = next(iter(resumed))["key"]
            forward = time.perf_counter() - t0
            print(f"| {at} | {replay:.2f} | {forward:.2f} | {one:.2f} | {first == reference} |")


if __name__ == "__main__":
    main()
