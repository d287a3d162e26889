"""Autoencoder speed: our KL-f8 encoder/decoder next to diffusers' AutoencoderKL, same config.

    python experiments/bench/autoencoder.py [--size 128] [--batch 2] [--device cpu|cuda] [--bf16]

Both are Stable Diffusion's KL-f8 shape (channels 128/256/512/512, 2 ResBlocks per level,
mid attention, 4 latent channels). Each iteration runs encode -> sample -> decode -> L1 loss
-> backward; the figure is images per second, best of the timed iterations after warm-up.
"""

from __future__ import annotations

import argparse
import time

import torch

from ldm.autoencoder import Autoencoder, Decoder, DiagonalGaussian, Encoder


def ours() -> torch.nn.Module:
    mult = (1, 2, 4, 4)
    return Autoencoder(Encoder(out_channels=8, channels=128, channel_mult=mult, num_res_blocks=2),
                       Decoder(in_channels=4, channels=128, channel_mult=mult, num_res_blocks=2),
                       DiagonalGaussian(8, 4))


def reference() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)


def step_ours(model, x):
    recon, _, _ = model(x)
    return recon


def step_reference(model, x):
    posterior = model.encode(x).latent_dist
    return model.decode(posterior.sample()).sample


def bench(model, step, x, iters: int, autocast: bool) -> float:
    def once():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            recon = step(model, x)
            loss = (recon.float() - x).abs().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    once()  # warm-up
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - start)
    return len(x) / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device).clamp(-1, 1)
    a, b = ours().to(args.device), reference().to(args.device)
    na, nb = (sum(p.numel() for p in m.parameters()) for m in (a, b))
    print(f"# {args.device}, batch {args.batch} x {args.size}px, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"forward + backward, best of {args.iters}; parameters: ldm {na / 1e6:.2f}M, diffusers {nb / 1e6:.2f}M\n")
    ra = bench(a, step_ours, x, args.iters, args.bf16)
    rb = bench(b, step_reference, x, args.iters, args.bf16)
    print("| model | images/s |\n|---|---:|")
    print(f"| ldm KL-f8 | {ra:.2f} |\n| diffusers AutoencoderKL | {rb:.2f} |\n| ratio ldm / diffusers | {ra / rb:.2f} |")


if __name__ == "__main__":
    main()
