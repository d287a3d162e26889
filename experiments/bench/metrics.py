"""FID speed and agreement: our metric path next to ``torch_fidelity.calculate_metrics``, same images.

    python experiments/bench/metrics.py [--n 50] [--size 64] [--batch 25] [--inception FILE] [--device cpu|cuda]

Real set: n rendered shapes scenes; "generated" set: n other scenes with Gaussian noise (std 0.2).
Both paths extract torch-fidelity's Inception features of both sets and compute FID, KID and IS;
the script prints both values, their relative difference, both wall times and the ratio.
Without ``--inception`` the Inception weights are randomly initialised (written to a temporary
file): the values then only check agreement and speed, they are not FIDs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ldm.data.shapes import render, sample_scene
from ldm.metrics.generation import (
    GenerationMetrics,
    InceptionFeatures,
    write_random_inception_weights,
)


def images(n: int, size: int, seed: int, noise: float) -> torch.Tensor:
    x = torch.from_numpy(np.stack([np.asarray(render(sample_scene(seed, i, size, "val"))) for i in range(n)]))
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    return (x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


class Uint8(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor):
        self.x = ((x + 1) * 127.5).round().to(torch.uint8)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--inception", help="torch-fidelity Inception weights (default: random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    import torch_fidelity

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.inception or write_random_inception_weights(Path(tmp) / "inception-random.pth")
        real, fake = images(args.n, args.size, 0, 0.0), images(args.n, args.size, 1, 0.2)
        kid_size = min(1000, args.n)

        start = time.perf_counter()
        metric = GenerationMetrics(InceptionFeatures(weights).to(args.device), kid_subset_size=kid_size).to(args.device)
        for lo in range(0, args.n, args.batch):
            idx = torch.arange(lo, min(lo + args.batch, args.n))
            metric.update(real[idx].to(args.device), idx, real=True)
            metric.update(fake[idx].to(args.device), idx)
        ours = metric.compute()
        t_ours = time.perf_counter() - start

        start = time.perf_counter()
        ref = torch_fidelity.calculate_metrics(
            input1=Uint8(fake), input2=Uint8(real), fid=True, kid=True, isc=True, cuda=args.device.startswith("cuda"),
            batch_size=args.batch, feature_extractor_weights_path=weights, kid_subset_size=kid_size, verbose=False,
            cache=False)
        t_ref = time.perf_counter() - start

    label = "" if args.inception else " (random Inception weights: agreement check, not a FID)"
    print(f"{args.n} real + {args.n} generated images at {args.size} px, batch {args.batch}, {args.device}{label}")
    print(f"{'metric':<6} {'ours':>14} {'torch-fidelity':>16} {'rel. diff':>10}")
    for ours_key, ref_key in (("fid", "frechet_inception_distance"), ("kid", "kernel_inception_distance_mean"),
                              ("is", "inception_score_mean")):
        a, b = ours[ours_key], ref[ref_key]
        print(f"{ours_key:<6} {a:>14.6g} {b:>16.6g} {abs(a - b) / max(abs(b), 1e-12):>10.2e}")
    print(f"time: ours {t_ours:.1f} s, torch-fidelity {t_ref:.1f} s, ratio (torch-fidelity / ours) {t_ref / t_ours:.2f}")


if __name__ == "__main__":
    main()
