"""Loader throughput (samples/s): ldm's ShardDataModule beside a plain webdataset pipeline.

    python experiments/bench/data_loader.py [--samples 2000] [--batch-size 64]

For 64 px and 256 px shapes shards and 0, 1 and 2 DataLoader workers it times the
fastest of three training epochs (after a warm-up epoch) of

* ours: ``ShardDataModule.train_dataloader()``: resampled shards, shuffle buffer,
  PIL decode + resize/crop + [-1, 1] tensors, batching in the workers, fixed epoch;
* reference: the webdataset README pipeline ``WebDataset(urls).shuffle(1000).decode("pil")
  .to_tuple("png", "txt").map_tuple(torchvision transforms).batched(64)`` in a ``WebLoader``.

Both decode the same PNGs to the same tensors; the table shows what our exact-epoch,
rank-aware machinery costs over the bare pipeline.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from torchvision import transforms as T

from ldm.data.datamodule import ShardDataModule
from ldm.data.synthetic import write_synthetic_shards


def reference_loader(urls: list[str], size: int, batch_size: int, workers: int):
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(1000).decode("pil")
          .to_tuple("png", "txt").map_tuple(tf, lambda t: t).batched(batch_size, partial=False))
    return wds.WebLoader(ds, batch_size=None, num_workers=workers)


def time_epoch(loader, repeats: int = 3) -> tuple[int, float]:
    """Samples and seconds of the fastest of ``repeats`` epochs, after a warm-up epoch.

    Each epoch includes starting the workers, as in training with non-persistent workers.
    """
    for _ in loader:  # warm-up: page cache, imports in the workers
        pass
    best = (0, float("inf"))
    for _ in range(repeats):
        start, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch["key"]) if isinstance(batch, dict) else len(batch[1])
        elapsed = time.perf_counter() - start
        if n / elapsed > best[0] / best[1]:
            best = (n, elapsed)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
          f"torch {torch.__version__}, webdataset {wds.__version__ if hasattr(wds, '__version__') else '?'}")
    print(f"# {args.samples} samples per epoch, batch {args.batch_size}, PNG shapes shards of 500 samples\n")
    print("| size | workers | ldm ShardDataModule (samples/s) | plain webdataset (samples/s) | ratio |")
    print("|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            out = Path(tmp) / f"s{size}"
            stats = write_synthetic_shards(out, train=args.samples, val=0, size=size, shard_size=500, progress=False)
            pattern = stats["splits"]["train"]["pattern"]
            urls = [str(out / n) for n in stats["splits"]["train"]["shards"]]
            for workers in args.workers:
                dm = ShardDataModule(train=pattern, image_size=size, batch_size=args.batch_size,
                                     num_workers=workers, crop="center")
                n_ours, t_ours = time_epoch(dm.train_dataloader())
                n_ref, t_ref = time_epoch(reference_loader(urls, size, args.batch_size, workers))
                ours, ref = n_ours / t_ours, n_ref / t_ref
                print(f"| {size} | {workers} | {ours:,.0f} | {ref:,.0f} | {ours / ref:.2f} |", flush=True)


if __name__ == "__main__":
    main()
