"""`ldm fit` end to end next to a diffusers UNet2DConditionModel training loop: samples/s, MFU and GPU busy.

    python experiments/bench/fit_throughput.py [--preset sd15] [--batch 32] [--latent 32] [--steps 20 120]
        [--workers 6] [--no-compile] [--no-channels-last] [--checkpointing] [--peak-tflops 989]
    python experiments/bench/fit_throughput.py --tiny          # a CPU smoke run (debug U-Net, a few steps)

Issue 19's first goal: the SD-1.5-shape U-Net trained at 32 x 32 precomputed latents, ``ldm fit`` with its data
loader, EMA and logging included, at >= 40 % MFU and >= 1.3x a diffusers training step with the same options.

Both sides read the same precomputed-latent shards (random latents and random 77 x 768 text-token features, written
here: the figures are speeds, not a model) through the same data loader (``ldm.data.ShardDataModule``'s, pinned,
``--workers`` processes) and train with the same options: bf16 autocast on CUDA (fp32 on the CPU), fused AdamW
(lr 1e-4, weight decay 0.01), gradient clipping at 1.0, 10 % condition dropout, an EMA with warmup updated every
step, regional ``torch.compile`` (ours: ``speed.compile``, each U-Net level block; diffusers: its own
``compile_repeated_blocks()``, the transformer blocks), channels_last, the loss read on the host every
``--log-every`` steps. Ours is ``ldm fit -c configs/trainer/gpu.yaml`` (``configs/trainer/debug.yaml`` on the CPU)
with a LatentDiffusion config built here, run in this process; the reference is the loop of diffusers'
``train_text_to_image.py`` (DDPMScheduler noise, MSE on eps, ``EMAModel(foreach=True)``).

Figures, both sides: samples/s over training steps ``--steps S1 S2`` (synchronised clock at S1 and S2: start-up,
compilation and warm-up excluded); the share of that time the host spent between steps (fetching the next batch,
moving it, the trainer's bookkeeping: a data-bound run shows it); on CUDA, GPU busy = the union of the kernels' time
over the wall time of ``--profile-steps`` further steps under torch.profiler; MFU = 3 x forward FLOPs per sample x
samples/s / ``--peak-tflops`` (FLOPs counted by torch's FlopCounterMode, on the meta device); on CUDA the peak
memory allocated (``torch.cuda.max_memory_allocated``); the SDPA kernels one forward of each network runs
(:class:`ldm.nn.sdpa.SDPABackends`).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as L
import torch
import webdataset as wds
import yaml

from ldm.nn.sdpa import SDPABackends

REPO = Path(__file__).resolve().parents[2]


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


unet_bench = _bench_module("unet")  # preset_args, reference (the matching diffusers U-Net), forward_flops


# -- data --------------------------------------------------------------------------------------------
def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_latent_shards(out: Path, n: int, channels: int, latent: int, tokens: int, width: int, shards: int = 4) -> str:
    """``n`` samples as ``ldm precompute`` writes them (latent.npy, clip_tokens.npy, clip_mask.npy, txt), random."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    per = -(-n // shards)
    for s in range(shards):
        with wds.TarWriter(str(out / f"train-{s:06d}.tar")) as sink:
            for i in range(s * per, min(n, (s + 1) * per)):
                sink.write({"__key__": f"{i:08d}", "txt": "random",
                            "latent.npy": _npy(rng.standard_normal((channels, latent, latent), dtype=np.float32)),
                            "clip_tokens.npy": _npy(rng.standard_normal((tokens, width), dtype=np.float32)),
                            "clip_mask.npy": _npy(np.ones(tokens, dtype=bool))})
    return str(out / f"train-{{000000..{shards - 1:06d}}}.tar")


# -- the measurement, the same on both sides ------------------------------------------------------------
class Window:
    """Clock of training steps ``[start, stop)`` (synchronised at both ends), the host's time between steps in it,
    and on CUDA the GPU's busy share over ``profile`` further steps. Call :meth:`begin` / :meth:`end` around every
    step (``step`` counts from 0)."""

    def __init__(self, start: int, stop: int, profile: int, device: torch.device):
        self.start, self.stop, self.profile, self.device = start, stop, profile, device
        self.t0 = self.t1 = 0.0
        self.between = 0.0  # host seconds between the end of a step and the start of the next, in the window
        self.busy: float | None = None
        self._last_end: float | None = None
        self._prof = None
        self._p0 = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin(self, step: int) -> None:
        now = time.perf_counter()
        if self.start < step < self.stop and self._last_end is not None:
            self.between += now - self._last_end
        if step == self.start:
            self._sync()
            self.t0 = time.perf_counter()
        elif step == self.stop:
            self._sync()
            self.t1 = time.perf_counter()
            if self.profile and self.device.type == "cuda":
                self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                self._prof.__enter__()
                self._p0 = time.perf_counter()
        elif step == self.stop + self.profile and self._prof is not None:
            self._sync()
            wall = time.perf_counter() - self._p0
            self._prof.__exit__(None, None, None)
            self.busy = kernel_time(self._prof) / wall
            self._prof = None

    def end(self, step: int) -> None:
        self._last_end = time.perf_counter()

    @property
    def last_step(self) -> int:
        """The last step to run (the profiled steps read their clock at the start of the step after them)."""
        return self.stop + (self.profile if self.device.type == "cuda" else 0)

    def samples_per_sec(self, batch: int) -> float:
        return (self.stop - self.start) * batch / (self.t1 - self.t0)

    def between_share(self) -> float:
        return self.between / (self.t1 - self.t0)


def kernel_time(prof) -> float:
    """Seconds of the union of the CUDA kernels' intervals recorded by a profiler (overlaps counted once)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    total, end = 0.0, -1.0
    for s, e in spans:
        if s > end:
            total, end = total + (e - s), e
        elif e > end:
            total, end = total + (e - end), e
    return total / 1e6  # profiler times are in microseconds


class StepBegin(L.Callback):
    """The first callback of a Lightning fit: a training step of the :class:`Window` begins."""

    def __init__(self, window: Window):
        self.window = window

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.window.begin(trainer.global_step)


class StepEnd(L.Callback):
    """The last callback: the step ends once every other callback (EMA, monitors) has run."""

    def __init__(self, window: Window):
        self.window = window

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.window.end(trainer.global_step - 1)


# -- ours: ldm fit -------------------------------------------------------------------------------------
def ldm_config(args, unet_args: dict, shards: str, root: Path, total: int) -> dict:
    return {
        "model": {"class_path": "ldm.systems.LatentDiffusion", "init_args": {
            "unet": {"class_path": "ldm.diffusion.UNet", "init_args": unet_args},
            "first_stage": {"class_path": "ldm.autoencoder.IdentityFirstStage",  # precomputed latents: never called
                            "init_args": {"channels": unet_args["in_channels"]}},
            "conditioner": {"class_path": "ldm.diffusion.Conditioner", "init_args": {"mask_padding": False}},
            "precond": {"class_path": "ldm.diffusion.EpsPrecond", "init_args": {"schedule": {
                "class_path": "ldm.diffusion.DiscreteSchedule", "init_args": {"beta_schedule": "scaled_linear"}}}},
            "cond_drop": 0.1,
            "optimizer": {"class_path": "torch.optim.AdamW",
                          "init_args": {"lr": 1e-4, "weight_decay": 0.01, "fused": True}}}},
        "data": {"init_args": {"train": shards, "batch_size": args.batch, "num_workers": args.workers,
                               "decode_images": False, "require_caption": False,
                               "samples_per_epoch": (total + 10) * args.batch}},
        "trainer": {"max_steps": total, "max_epochs": -1, "limit_val_batches": 0, "enable_checkpointing": False,
                    "log_every_n_steps": args.log_every, "gradient_clip_val": 1.0, "enable_model_summary": False,
                    "callbacks": [{"class_path": "ldm.callbacks.EMAWarmup", "init_args": {"decay": 0.9999}}]},
        "run": {"name": "bench-fit", "root": str(root), "version": "ours", "wandb_mode": "disabled"},
    }


def run_ours(args, unet_args: dict, shards: str, work: Path, window: Window) -> tuple[float, dict]:
    from ldm.cli import LDMCLI

    config = work / "ldm.yaml"
    config.write_text(yaml.safe_dump(ldm_config(args, unet_args, shards, work / "runs", window.last_step + 1)))
    trainer_preset = "gpu.yaml" if args.device == "cuda" else "debug.yaml"
    extra = ["--trainer.enable_progress_bar=false", f"--speed.compile={str(args.compile).lower()}",
             f"--speed.channels_last={str(args.channels_last).lower()}"] if args.device == "cuda" else \
            ["--trainer.enable_progress_bar=false", "--trainer.max_epochs=-1"]
    if args.device != "cuda" and args.channels_last:
        extra.append("--speed.channels_last=true")
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees this script's own arguments too
    try:
        cli = LDMCLI(args=["-c", str(REPO / "configs/trainer" / trainer_preset), "-c", str(config), *extra], run=False)
    finally:
        sys.argv = argv
    cli.trainer.callbacks.insert(0, StepBegin(window))
    cli.trainer.callbacks.append(StepEnd(window))
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    speed = next((c for c in cli.trainer.callbacks if type(c).__name__ == "Speedups"), None)
    info = {"compiled blocks": len(speed.compiled) if speed is not None else 0,
            "logged": {k: float(v) for k, v in cli.trainer.logged_metrics.items() if "per_sec" in k or "mfu" in k}}
    return time.perf_counter() - start, info


# -- the reference: diffusers' training loop -------------------------------------------------------------
def run_reference(args, unet_args: dict, shards: str, window: Window) -> tuple[float, dict]:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from ldm.data import ShardDataModule
    from ldm.data.datamodule import EpochDataLoader

    device = torch.device(args.device)
    start = time.perf_counter()
    torch.manual_seed(0)
    unet = unet_bench.reference(unet_args).to(device).train()
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    if args.compile and device.type == "cuda":
        unet.compile_repeated_blocks()  # diffusers' regional compilation (its BasicTransformerBlocks)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, foreach=True)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear")
    dm = ShardDataModule(train=shards, batch_size=args.batch, num_workers=args.workers, decode_images=False,
                         require_caption=False, samples_per_epoch=(window.last_step + 11) * args.batch)
    loader = EpochDataLoader(dm.train_stream(), num_workers=args.workers, pin_memory=device.type == "cuda")
    bf16 = device.type == "cuda"
    for step, batch in enumerate(loader):
        if step > window.last_step:
            break
        window.begin(step)
        latents = batch["latent"].to(device, non_blocking=True)
        context = batch["clip_tokens"].to(device, non_blocking=True)
        if args.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (len(latents),), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        drop = torch.rand(len(latents), device=device) < 0.1
        context = torch.where(drop[:, None, None], torch.zeros_like(context), context)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = unet(noisy, t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        if (step + 1) % args.log_every == 0:
            logging.getLogger("bench").debug("step %d loss %.4f", step, loss.item())
        window.end(step)
    return time.perf_counter() - start, {}


# -- report --------------------------------------------------------------------------------------------
def sdpa_kernels(build, call, unet_args: dict, args) -> str:
    device = torch.device(args.device)
    model = build(unet_args).to(device).eval()
    x = torch.randn(1, unet_args["in_channels"], args.latent, args.latent, device=device)
    ctx = torch.randn(1, args.tokens, unet_args["context_dim"], device=device)
    with SDPABackends() as probe, torch.no_grad(), torch.autocast(device.type, torch.bfloat16,
                                                                   enabled=device.type == "cuda"):
        call(model, x, torch.tensor([500.0], device=device), ctx)
    return probe.summary()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: debug U-Net, 8 x 8 latents, a few steps")
    p.add_argument("--preset", default="sd15", choices=sorted(unet_bench.PRESETS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--latent", type=int, default=32, help="latent height = width")
    p.add_argument("--tokens", type=int, default=77)
    p.add_argument("--steps", type=int, nargs=2, default=[20, 120], help="the timed window [S1, S2) of steps")
    p.add_argument("--profile-steps", type=int, default=10, help="steps after S2 profiled for GPU busy (CUDA)")
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--samples", type=int, default=512, help="samples in the shards (read repeatedly)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU (989: H100 SXM)")
    args = p.parse_args()
    if args.tiny:
        args.preset, args.batch, args.latent, args.tokens = "debug", 4, 8, 8
        args.steps, args.workers, args.samples, args.log_every, args.compile = [2, 6], 0, 32, 4, False
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning|lightning_fabric")
    unet_args = unet_bench.preset_args(args.preset, args.checkpointing)
    flops = unet_bench.forward_flops(unet_bench.ours, unet_bench.call_ours, unet_args, 1, args.latent, args.tokens)
    device = torch.device(args.device)
    print(f"# {args.preset} U-Net (random weights, random latents and text features), {args.device}, batch "
          f"{args.batch}, {args.latent}x{args.latent} latents, {args.tokens} tokens, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, fused AdamW, EMA, clip 1.0, "
          f"{'regional compile, ' if args.compile and device.type == 'cuda' else ''}"
          f"{'channels_last, ' if args.channels_last else ''}{'checkpointing, ' if args.checkpointing else ''}"
          f"{args.workers} workers; timed steps {args.steps[0]}-{args.steps[1]}; "
          f"{flops / 1e9:.2f} GFLOP forward per sample; torch {torch.__version__}"
          + (f"; {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    kernels = {"ours": sdpa_kernels(unet_bench.ours, unet_bench.call_ours, unet_args, args),
               "ref": sdpa_kernels(unet_bench.reference, unet_bench.call_reference, unet_args, args)}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = write_latent_shards(work / "shards", args.samples, unet_args["in_channels"], args.latent,
                                     args.tokens, unet_args["context_dim"])
        for label, run in (("ours", lambda w: run_ours(args, unet_args, shards, work, w)),
                           ("ref", lambda w: run_reference(args, unet_args, shards, w))):
            window = Window(*args.steps, args.profile_steps, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            wall, info = run(window)
            info["memory"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            rows[label] = (window, wall, info)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    print("\n| | samples/s | host between steps | GPU busy | MFU | peak memory | SDPA kernels (one forward) | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    rates = {}
    for label, name in (("ours", "ldm fit"), ("ref", "diffusers loop")):
        window, wall, info = rows[label]
        rates[label] = rate = window.samples_per_sec(args.batch)
        busy = f"{window.busy:.1%}" if window.busy is not None else "n/a (CPU)" if device.type != "cuda" else "n/a"
        mfu = f"{3 * flops * rate / peak:.1%}" if peak else "-"
        memory = f"{info['memory']:.1f} GiB" if info.get("memory") is not None else "n/a"
        print(f"| {name} | {rate:.2f} | {window.between_share():.1%} | {busy} | {mfu} | {memory} | {kernels[label]} "
              f"| {wall:.1f} |")
    print(f"| ratio ldm / diffusers | {rates['ours'] / rates['ref']:.2f} | | | | | | |")
    info = rows["ours"][2]
    print(f"\nours: {info.get('compiled blocks', 0)} blocks compiled"
          + (f"; last logged by its monitor: {info['logged']}" if info.get("logged") else ""))


if __name__ == "__main__":
    sys.exit(main())
