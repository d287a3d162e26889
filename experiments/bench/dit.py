"""DiT speed: our DiT next to diffusers' DiTTransformer2DModel, same configuration (issue 20).

    python experiments/bench/dit.py [--preset XL/2] [--batch 32] [--latent 32] [--device cuda] [--bf16]
        [--compile] [--checkpointing] [--mask-ratio 0.5] [--peak-tflops 989]
    python experiments/bench/dit.py --preset tiny --batch 4 --iters 3          # a CPU smoke run

Both networks are the class-conditional DiT of the paper (1000 ImageNet classes, learned sigma: 8 output channels
for 4 latent channels, 32 x 32 latents = 256 px images at f8): ours ``DiT(preset=..., out_channels=8,
num_classes=1000)``, the reference ``DiTTransformer2DModel(num_attention_heads, attention_head_dim=64,
num_layers, patch_size, num_embeds_ada_norm=1000)``. Their parameter counts differ by one copy of the timestep and
class embedders per block after the first (diffusers keeps one per block; tests/diffusion/test_dit.py checks the
difference exactly), printed here. A training step is forward + MSE to a random target + backward + AdamW step on
the same batch; the figure is images per second, median of the timed iterations after two warm-up steps (which
also absorb ``--compile``'s compilation). Forward FLOPs are counted by ``torch.utils.flop_counter`` on the meta
device (FLOPs, i.e. 2 per multiply-add: XL/2 at 256 px counts 237 GFLOP, the paper's 118.6 "Gflops" being
multiply-adds); with ``--peak-tflops`` (989 for an H100 / H200 SXM in dense bf16) MFU = 3 x forward FLOPs x images/s / peak.

``--mask-ratio r`` adds a row for ours with patch masking (MaskDiT / MicroDiT: the blocks see 1 - r of the tokens;
diffusers has no such option), the saving the masking buys. ``tiny`` (2 blocks of width 64) exists for the CPU.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from ldm.diffusion import DiT
from ldm.diffusion.dit import PRESETS
from unet import time_training  # experiments/bench/unet.py: the same timed training step

SIZES = {**{f"{size}/{p}": (size, p) for size in PRESETS for p in (2, 4, 8)}, "tiny": (None, 2)}


def dims(preset: str) -> tuple[int, int, int, int]:
    """(depth, width, heads, patch) of a preset name."""
    size, patch = SIZES[preset]
    depth, width, heads = PRESETS[size] if size else (2, 64, 1)
    return depth, width, heads, patch


def ours(preset: str, checkpointing: bool, mask_ratio: float = 0.0) -> torch.nn.Module:
    depth, width, heads, patch = dims(preset)
    return DiT(in_channels=4, out_channels=8, patch_size=patch, hidden_size=width, depth=depth, num_heads=heads,
               num_classes=1000, gradient_checkpointing=checkpointing, mask_ratio=mask_ratio)


def reference(preset: str, checkpointing: bool, latent: int) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    depth, width, heads, patch = dims(preset)
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=width // heads, in_channels=4,
                                  out_channels=8, num_layers=depth, sample_size=latent, patch_size=patch,
                                  num_embeds_ada_norm=1000)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


def call_ours(model, x, t, labels):
    return model(x, t.float(), y=labels)


def call_reference(model, x, t, labels):
    return model(x, timestep=t, class_labels=labels).sample


def forward_flops(model, call, latent: int) -> int:
    """Forward FLOPs of one image (meta device: costs nothing for XL)."""
    x, t, labels = torch.empty(1, 4, latent, latent), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        call(model, x, t, labels)
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["XL/2"], choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--latent", type=int, default=32, help="latent height = width (32: 256 px at f8)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both")
    p.add_argument("--compile", action="store_true", help="torch.compile both (whole model)")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both")
    p.add_argument("--mask-ratio", type=float, default=0.0, help="also time ours with this patch-masking ratio")
    p.add_argument("--flops-only", action="store_true", help="count FLOPs and parameters, do not time")
    p.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s at the precision used, for MFU")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print(f"device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}, torch {torch.__version__}, "
          f"batch {args.batch}, latent {args.latent}x{args.latent}, {'bf16 autocast' if args.bf16 else 'fp32'}"
          f"{', compiled' if args.compile else ''}{', checkpointing' if args.checkpointing else ''}")
    print(f"{'preset':<20} {'params':>10} {'GFLOP/img':>10} {'img/s':>9} {'vs diffusers':>13}"
          + ("  MFU" if args.peak_tflops else ""))
    for preset in args.preset:
        rows = [("ours", lambda: ours(preset, args.checkpointing), call_ours),
                ("diffusers", lambda: reference(preset, args.checkpointing, args.latent), call_reference)]
        if args.mask_ratio > 0:
            rows.append((f"ours mask {args.mask_ratio:g}", lambda: ours(preset, args.checkpointing, args.mask_ratio),
                         call_ours))
        results: dict[str, tuple[int, int, float]] = {}  # label -> (parameters, forward FLOPs / image, images/s)
        for label, build, call in rows:
            with torch.device("meta"):
                model = build()
                n = sum(q.numel() for q in model.parameters())
                flops = forward_flops(model.train(), call, args.latent)
            speed = float("nan")
            if not args.flops_only:
                model = build().to(args.device).train()
                if args.compile:
                    model = torch.compile(model)
                x = torch.randn(args.batch, 4, args.latent, args.latent, device=args.device)
                t = torch.randint(0, 1000, (args.batch,), device=args.device)
                labels = torch.randint(0, 1000, (args.batch,), device=args.device)
                target = torch.randn(args.batch, 8, args.latent, args.latent, device=args.device)  # learned sigma
                speed = time_training(model, call, x, t, labels, args.iters, args.bf16, target)
                del model
            results[label] = (n, flops, speed)
        for label, (n, flops, speed) in results.items():
            ratio = "" if label == "diffusers" or args.flops_only else f"{speed / results['diffusers'][2]:.2f}x"
            line = f"{preset + ' ' + label:<20} {n / 1e6:>9.2f}M {flops / 1e9:>10.2f} {speed:>9.2f} {ratio:>13}"
            if args.peak_tflops and not args.flops_only:
                line += f"  {3 * flops * speed / (args.peak_tflops * 1e12):.1%}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
