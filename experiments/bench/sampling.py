"""Text-to-image sampling speed: ldm's pipeline next to diffusers' StableDiffusionPipeline, the same components.

    python experiments/bench/sampling.py [--batch 1 8] [--size 512] [--steps 20] [--cfg 7.5] [--compile]
        [--channels-last] [--repeats 3]
    python experiments/bench/sampling.py --tiny      # a CPU smoke run (a tiny SD-shaped pipeline at 16 px)

Issue 19's sampling goal: the SD-shape U-Net at 512 px (64 x 64 latents), DPM-Solver++(2M) 20 steps with
classifier-free guidance, batch 1 and 8, faster than diffusers' pipeline with the same components and options.

A StableDiffusionPipeline of Stable Diffusion 1.5's shapes (U-Net 320-640-1280-1280, KL-f8 VAE, CLIP ViT-L/14's
12-layer text transformer) is built with random weights (no download; the images are noise, the speed is the
model's), saved, and imported into an ldm run with ``ldm convert diffusers`` (:func:`ldm.interop.import_diffusers`),
so both pipelines hold the same weights. Each call samples ``batch`` prompts end to end (text encoding, 20 guided
steps of the U-Net with both branches in one batch, the VAE decode) with DPM-Solver++(2M), trailing spacing, on
the same device; the figure is seconds per call (median of ``--repeats`` after one warm-up) and images/s. On CUDA
ours runs its networks under bf16 autocast (``ldm sample --precision bf16-mixed``), diffusers the same way (fp32
weights, bf16 autocast: the same options) and, as it is usually run, with bf16 weights. ``--compile``: regional
compilation on both (ours: the U-Net's level blocks; diffusers: ``unet.compile_repeated_blocks()``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = ["an astronaut riding a horse", "a red cube on top of a blue sphere", "a watercolor lighthouse at dusk",
           "a corgi wearing sunglasses"]


def sd_pipeline(root: Path, tiny: bool):
    """Stable Diffusion 1.5's shapes (``tiny``: the 16 px test pipeline's), random weights, DPM-Solver++(2M)."""
    import diffusers
    import transformers

    from ldm.interop.tokenizer import write_clip_tokenizer

    torch.manual_seed(0)
    if tiny:
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8, norm_num_groups=32)
        vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                      down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, sample_size=16)
        text = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                           num_hidden_layers=2, max_position_embeddings=77)
    else:
        unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.x's U-Net
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
        text = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                           num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77,
                                           hidden_act="quick_gelu")
    text.update({"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407})
    tokenizer = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(root / "tokenizer"))
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                      algorithm_type="dpmsolver++", solver_order=2,
                                                      timestep_spacing="trailing")
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=transformers.CLIPTextModel(text), tokenizer=tokenizer,
                                             unet=unet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: compilation, cuDNN autotuning, allocator
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny SD-shaped pipeline at 16 px")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of both U-Nets")
    p.add_argument("--channels-last", action="store_true", help="channels_last U-Nets and VAEs")
    args = p.parse_args()
    if args.tiny:
        args.size, args.repeats = 16, 1
    from ldm.interop.pipeline import import_diffusers
    from ldm.nn.compile import compile_blocks
    from ldm.nn.sdpa import SDPABackends
    from ldm.pipelines.precision import sampling_precision
    from ldm.pipelines.text_to_image import SamplerSettings, TextToImage

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    settings = SamplerSettings(sampler="dpmpp_2m", steps=args.steps, cfg=args.cfg, seed=0, spacing="trailing")
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipe = sd_pipeline(root, args.tiny)
        pipe.save_pretrained(root / "pipe")
        ours = TextToImage.from_checkpoint(str(import_diffusers(root / "pipe", root / "run")), device=device)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for module in (ours.system.unet, ours.system.first_stage, pipe.unet, pipe.vae):
        module.to(memory_format=fmt)
    if args.compile:
        compile_blocks(ours.system.unet)
        pipe.unet.compile_repeated_blocks()
    n_ours = sum(q.numel() for q in ours.system.unet.parameters())
    n_ref = sum(q.numel() for q in pipe.unet.parameters())

    def run_ours(prompts):
        with sampling_precision("bf16-mixed" if cuda else "32-true", ours.system):
            return ours(prompts, settings, image_size=args.size, progress=False)

    def run_ref(prompts, autocast: bool, pipeline=pipe):
        with torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            return pipeline(prompts, height=args.size, width=args.size, num_inference_steps=args.steps,
                            guidance_scale=args.cfg, output_type="pt",
                            generator=torch.Generator(device).manual_seed(0)).images

    kernels = {}
    for label, fn in (("ours", lambda: run_ours(PROMPTS[:1])), ("ref", lambda: run_ref(PROMPTS[:1], cuda))):
        with SDPABackends() as probe:
            fn()
        kernels[label] = probe.summary()
    rows = []
    for batch in args.batch:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        rows.append((batch, "ldm TextToImage", timed(lambda: run_ours(prompts), args.repeats, device), kernels["ours"]))
        rows.append((batch, "diffusers StableDiffusionPipeline" + (" (fp32 weights, bf16 autocast)" if cuda else ""),
                     timed(lambda: run_ref(prompts, cuda), args.repeats, device), kernels["ref"]))
    if cuda:  # diffusers as it is usually run: the weights themselves in bf16
        pipe.to(torch.bfloat16)
        for batch in args.batch:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            rows.append((batch, "diffusers StableDiffusionPipeline (bf16 weights)",
                         timed(lambda: run_ref(prompts, False), args.repeats, device), ""))
    print(f"# {args.device}{' ' + torch.cuda.get_device_name(device) if cuda else ''}, torch {torch.__version__}; "
          f"{'tiny SD-shaped' if args.tiny else 'SD-1.5-shaped'} pipeline with random weights (U-Net {n_ours / 1e6:.1f}M "
          f"parameters ours, {n_ref / 1e6:.1f}M diffusers), {args.size} px, DPM-Solver++(2M) {args.steps} steps, "
          f"CFG {args.cfg}, {'bf16 autocast' if cuda else 'fp32'}{', channels_last' if args.channels_last else ''}"
          f"{', regional compile' if args.compile else ''}; median of {args.repeats} calls after a warm-up\n")
    print("| batch | pipeline | s / call | images/s | SDPA kernels (one call, batch 1) |\n|---:|---|---:|---:|---|")
    for batch, name, seconds, kernel in rows:
        print(f"| {batch} | {name} | {seconds:.3f} | {batch / seconds:.2f} | {kernel} |")
    for batch in args.batch:
        ours_s = next(s for b, n, s, _ in rows if b == batch and n.startswith("ldm"))
        ref_s = next(s for b, n, s, _ in rows if b == batch and n.startswith("diffusers"))
        print(f"| {batch} | ratio ldm / diffusers (same options) | | {ref_s / ours_s:.2f} | |")


if __name__ == "__main__":
    main()
