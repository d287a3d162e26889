"""Autoencoder speed: our KL-f8 encoder/decoder next to diffusers' AutoencoderKL, same config.

    python experiments/bench/autoencoder.py [--size 128] [--batch 2] [--device cpu|cuda] [--bf16]
    python experiments/bench/autoencoder.py --train-step [--size 256] [--batch 8] [--bf16] [--fused]
        [--channels-last] [--compile] [--peak-tflops 989] [--vgg16 PATH]
    python experiments/bench/autoencoder.py --train-step --tiny      # a CPU smoke run of the training step

Both are Stable Diffusion's KL-f8 shape (channels 128/256/512/512, 2 ResBlocks per level,
mid attention, 4 latent channels). Each iteration runs encode -> sample -> decode -> L1 loss
-> backward; the figure is images per second, best of the timed iterations after warm-up.

``--train-step`` (issue 19: the KL-f8 training step >= 1.2x diffusers' AutoencoderKL with LPIPS + discriminator)
times the whole step of :class:`ldm.systems.AutoencoderSystem` instead, on both networks with the same loss
modules (:class:`ldm.autoencoder.AutoencoderLoss`: L1 + LPIPS + KL, the PatchGAN term with its adaptive weight
from step 0, then the discriminator's hinge step) and the same options: Adam (``--fused``: fused), bf16 autocast,
channels_last, regional compilation (ours: its ResBlocks and attention, :func:`ldm.nn.compile.compile_blocks`;
diffusers': its ``ResnetBlock2D`` and ``Attention`` blocks; both: the LPIPS and discriminator networks). LPIPS needs
torchvision's VGG16 weights (``--vgg16``); without them random VGG16 weights are written (the step costs the same;
its LPIPS values mean nothing). MFU = training FLOPs per image (counted by FlopCounterMode over one whole eager
step, forward and backward) x images/s / ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ldm.autoencoder import Autoencoder, AutoencoderLoss, Decoder, DiagonalGaussian, Encoder


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


# -- the whole training step (--train-step) ----------------------------------------------------------------
def tiny_ours() -> torch.nn.Module:
    return Autoencoder(Encoder(out_channels=8, channels=32, channel_mult=(1, 2), num_res_blocks=1, groups=8),
                       Decoder(in_channels=4, channels=32, channel_mult=(1, 2), num_res_blocks=1, groups=8),
                       DiagonalGaussian(8, 4))


def tiny_reference() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                         norm_num_groups=8)


def random_vgg16(path: Path) -> Path:
    """torchvision's VGG16 state dict with random convolutions (the classifier as zero-stride views: ~60 MB)."""
    from torchvision.models import vgg16

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in vgg16(weights=None).state_dict().items()}
    state = {f"features.{k}": v for k, v in vgg16(weights=None).features.state_dict().items()}
    state.update({k: torch.zeros(()).expand(shape) for k, shape in shapes.items() if k not in state})
    torch.save(state, path)
    return path


def forward_ours(model, x):
    recon, _, info = model(x)
    return recon, info, model.decoder.last_layer


def forward_reference(model, x):
    posterior = model.encode(x).latent_dist
    recon = model.decode(posterior.sample()).sample
    return recon, {"kl": posterior.kl()}, model.decoder.conv_out.weight


class TrainStep:
    """One training step of the autoencoder system (generator step, then discriminator step) on a network."""

    def __init__(self, model, forward, loss: AutoencoderLoss, fused: bool, bf16: bool):
        self.model, self.forward, self.loss, self.bf16 = model, forward, loss, bf16
        adam = dict(lr=4.5e-6, betas=(0.5, 0.9), fused=fused)
        self.opt_g = torch.optim.Adam(model.parameters(), **adam)
        self.opt_d = torch.optim.Adam(loss.discriminator.parameters(), **adam)

    def __call__(self, x: torch.Tensor) -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            recon, info, last_layer = self.forward(self.model, x)
            loss_g, _ = self.loss.generator_loss(x, recon.float(), info, last_layer, step=1)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss_d, _ = self.loss.discriminator_loss(x, recon.float())
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()


def step_flops(step: TrainStep, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(x)
    return counter.get_total_flops()


def time_step(step: TrainStep, x: torch.Tensor, iters: int) -> float:
    step(x)  # warm-up (compilation, allocator, cuDNN autotuning)
    step(x)
    best = float("inf")
    for _ in range(iters):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return len(x) / best


def train_step_main(args) -> None:
    import tempfile

    from ldm.nn.compile import compile_blocks

    torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).clamp(-1, 1)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    with tempfile.TemporaryDirectory() as tmp:
        vgg = Path(args.vgg16) if args.vgg16 else random_vgg16(Path(tmp) / "vgg16-random.pth")
        rows = {}
        for label, build, forward, blocks in (
                ("ldm KL-f8", tiny_ours if args.tiny else ours, forward_ours, None),
                ("diffusers AutoencoderKL", tiny_reference if args.tiny else reference, forward_reference,
                 ["ResnetBlock2D", "Attention", "LPIPS", "PatchDiscriminator"])):
            torch.manual_seed(0)
            model = build().to(device, memory_format=fmt).train()
            loss = AutoencoderLoss(perceptual_weight=1.0, perceptual_weights=str(vgg), kl_weight=1e-6,
                                   disc_weight=0.5, disc_start=0).to(device, memory_format=fmt)
            step = TrainStep(model, forward, loss, args.fused, args.bf16)
            flops = step_flops(step, x[:1])
            if args.compile:
                for module in (model, loss):
                    compile_blocks(module, blocks) if blocks else compile_blocks(module)
            n = sum(p.numel() for p in model.parameters())
            rows[label] = (n, flops, time_step(step, x, args.iters))
            del step, model, loss
    print(f"# {args.device}, batch {args.batch} x {args.size}px, {'bf16 autocast' if args.bf16 else 'fp32'}"
          f"{', fused Adam' if args.fused else ''}{', channels_last' if args.channels_last else ''}"
          f"{', regional compile' if args.compile else ''}; generator step (L1 + LPIPS + KL + adaptive PatchGAN) then "
          f"discriminator step, best of {args.iters}; LPIPS {'VGG16 ' + args.vgg16 if args.vgg16 else 'random VGG16'}"
          f"{' (tiny networks)' if args.tiny else ''}\n")
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    print("| model | parameters | train GFLOP / image | images/s | MFU |\n|---|---:|---:|---:|---:|")
    for label, (n, flops, rate) in rows.items():
        mfu = f"{flops * rate / peak:.1%}" if peak else "-"
        print(f"| {label} | {n / 1e6:.2f}M | {flops / 1e9:.2f} | {rate:.2f} | {mfu} |")
    (_, _, ra), (_, _, rb) = rows.values()
    print(f"| ratio ldm / diffusers | | | {ra / rb:.2f} | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--train-step", action="store_true", help="the whole training step, LPIPS and GAN included")
    p.add_argument("--tiny", action="store_true", help="with --train-step: small networks at 32 px (CPU smoke run)")
    p.add_argument("--fused", action="store_true", help="fused Adam (--train-step)")
    p.add_argument("--channels-last", action="store_true", help="channels_last (--train-step)")
    p.add_argument("--compile", action="store_true", help="regional torch.compile (--train-step)")
    p.add_argument("--vgg16", help="torchvision's vgg16-397923af.pth for LPIPS (default: random weights)")
    p.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s, for MFU (--train-step)")
    args = p.parse_args()
    if args.train_step:
        if args.tiny:
            args.size, args.batch = 32, 2
        return train_step_main(args)
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
