"""U-Net speed: our conditional U-Net next to diffusers' UNet2DConditionModel, same configuration.

    python experiments/bench/unet.py [--preset debug shapes sd15] [--batch 8] [--latent 16]
        [--device cpu|cuda] [--bf16] [--compile] [--channels-last] [--checkpointing] [--peak-tflops 989]

For each preset (the U-Net of ``configs/ldm/<preset>.yaml``; ``sd15`` = ``sd15-256.yaml``) both
networks are built with the matching configuration (the parameter counts are printed and must
agree within 1 %), then timed on the same batch: a training step is forward + MSE to a random
target + backward + AdamW step, and the figure is images per second, median of the timed
iterations after warm-up. Forward FLOPs are counted by ``torch.utils.flop_counter`` (on the meta
device, so they cost nothing even for the SD-1.5 shape). With ``--peak-tflops`` (e.g. 989 for
an H100 SXM in dense bf16) the model-FLOPs utilisation 3 x forward FLOPs x images/s / peak is
printed too. ``--flops-only`` skips the timing (SD-1.5 on a laptop CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from ldm.diffusion import UNet
from ldm.diffusion.unet import count_parameters

REPO = Path(__file__).resolve().parents[2]
PRESETS = {"debug": "debug.yaml", "shapes": "shapes-kl-f4.yaml", "sd15": "sd15-256.yaml", "pixel": "pixel-64.yaml"}


def preset_args(name: str, checkpointing: bool) -> dict:
    args = yaml.safe_load((REPO / "configs/ldm" / PRESETS[name]).read_text())["model"]["init_args"]["unet"]["init_args"]
    args = dict(args, gradient_checkpointing=checkpointing)
    args.setdefault("heads", 8)
    return args


def ours(args: dict) -> torch.nn.Module:
    return UNet(**args)


def reference(args: dict) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    mult, levels = args["channel_mult"], set(args["attention_levels"])
    widths = [args["channels"] * m for m in mult]
    heads = [args["heads"] if args.get("heads") else w // args["head_dim"] for w in widths]
    model = UNet2DConditionModel(
        in_channels=args["in_channels"], out_channels=args["in_channels"],
        down_block_types=tuple("CrossAttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(len(mult))),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in levels else "UpBlock2D" for i in reversed(range(len(mult)))),
        block_out_channels=tuple(widths), layers_per_block=args["num_res_blocks"],
        cross_attention_dim=args["context_dim"], attention_head_dim=tuple(heads),
        norm_num_groups=args.get("groups", 32), use_linear_projection=True)
    if args.get("gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    return model


def call_ours(model, x, t, ctx):
    return model(x, t, context=ctx)


def call_reference(model, x, t, ctx):
    return model(x, t, encoder_hidden_states=ctx).sample


def forward_flops(build, call, args: dict, batch: int, latent: int, tokens: int) -> int:
    with torch.device("meta"):
        model = build(args)
        x = torch.empty(batch, args["in_channels"], latent, latent)
        t = torch.empty(batch)
        ctx = torch.empty(batch, tokens, args["context_dim"])
        counter = FlopCounterMode(display=False)
        with counter:
            call(model, x, t, ctx)
    return counter.get_total_flops()


def time_training(model, call, x, t, ctx, iters: int, bf16: bool, target: torch.Tensor | None = None) -> float:
    """Images per second of forward + MSE to ``target`` (default: noise of x's shape) + backward + AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    target = torch.randn_like(x) if target is None else target

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = call(model, x, t, ctx)
        loss = (out.float() - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(iters + 2):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up steps (compilation, allocator)
            times.append(time.perf_counter() - start)
    return len(x) / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["debug", "shapes"], choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--latent", type=int, default=16, help="latent height = width")
    p.add_argument("--tokens", type=int, default=77, help="context length")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both")
    p.add_argument("--compile", action="store_true", help="torch.compile both")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for both")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both")
    p.add_argument("--flops-only", action="store_true", help="count FLOPs and parameters, do not time")
    p.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s at the precision used, for MFU")
    args = p.parse_args()
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f"device {args.device}, torch {torch.__version__}, batch {args.batch}, latent {args.latent}x{args.latent}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}{', compiled' if args.compile else ''}"
          f"{', channels_last' if args.channels_last else ''}{', checkpointing' if args.checkpointing else ''}")
    header = (f"{'preset':<8} {'params ours':>12} {'diffusers':>12} {'GFLOP/img ours':>15} {'diffusers':>10} "
              f"{'img/s ours':>11} {'diffusers':>10} {'speed-up':>9}")
    print(header + ("  MFU ours / diffusers" if args.peak_tflops else ""))
    for name in args.preset:
        cfg = preset_args(name, args.checkpointing)
        row = {}
        for label, build, call in (("ours", ours, call_ours), ("ref", reference, call_reference)):
            with torch.device("meta"):
                n = count_parameters(build(cfg))
            flops = forward_flops(build, call, cfg, 1, args.latent, args.tokens)
            speed = float("nan")
            if not args.flops_only:
                model = build(cfg).to(args.device, memory_format=fmt).train()
                if args.compile:
                    model = torch.compile(model)
                x = torch.randn(args.batch, cfg["in_channels"], args.latent, args.latent, device=args.device)
                x = x.contiguous(memory_format=fmt)
                t = torch.randint(0, 1000, (args.batch,), device=args.device).float()
                ctx = torch.randn(args.batch, args.tokens, cfg["context_dim"], device=args.device)
                speed = time_training(model, call, x, t, ctx, args.iters, args.bf16)
                del model
            row[label] = (n, flops, speed)
        (n_o, f_o, s_o), (n_r, f_r, s_r) = row["ours"], row["ref"]
        if abs(n_o - n_r) > 0.01 * n_r:
            raise SystemExit(f"{name}: parameter counts differ by more than 1 %: {n_o} vs {n_r}")
        line = (f"{name:<8} {n_o / 1e6:>11.2f}M {n_r / 1e6:>11.2f}M {f_o / 1e9:>15.2f} {f_r / 1e9:>10.2f} "
                f"{s_o:>11.2f} {s_r:>10.2f} {s_o / s_r:>8.2f}x")
        if args.peak_tflops and not args.flops_only:
            peak = args.peak_tflops * 1e12
            line += f"  {3 * f_o * s_o / peak:>6.1%} / {3 * f_r * s_r / peak:.1%}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
