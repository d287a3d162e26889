"""``ldm sample``: images from a trained latent-diffusion or unCLIP-decoder run, in one of several modes.

    ldm sample --ckpt RUN --prompt "a red circle" [--prompt ...] [--prompts FILE] [--num-images 4]  # text -> image
    ldm sample --ckpt RUN --prompts captions.csv --caption-column text   # FILE: .txt .json .jsonl .csv .tsv
    ldm sample --ckpt DECODER --prior PRIOR --prompt ...                 # unCLIP: text -> prior -> decoder
    ldm sample --ckpt DECODER --mode variations --image in.png --num-images 4 --sampler ddim --eta 1
    ldm sample --ckpt DECODER --mode interpolate --image a.png --image b.png --frames 8
    ldm sample --ckpt DECODER --mode text-diff --image in.png --from-prompt "a red circle" --prompt "a blue circle"
    ldm sample --ckpt RUN --mode img2img --image in.png --prompt ... --strength 0.6
    ldm sample --ckpt RUN --mode inpaint --image in.png (--mask mask.png | --mask-box 0.5,0,1,1) --prompt ...
    ldm sample --ckpt RUN --mode invert --image in.png [--prompt ...]    # DDIM inversion -> reconstruction
    ... [--clip-guidance-scale 1000 [--clip CLIP_RUN] [--noised-clip]] [--attention-maps]
    ldm sample -c sample.yaml [--seed 1]     # options from a YAML file; --print_config writes one
    ... [--precision bf16-mixed] [--weights raw]    # networks in bfloat16 (GPU); the raw, not the EMA, weights

Every mode writes the captioned grid or strip (``--out``), every image on its own
(``<out stem>/NNNN-<caption>.png``, numbered in generation order with as many digits as the count needs, at
least four, so that the names sort) and a record (``<out stem>.json``: checkpoints, mode, inputs, prompts and
their file, seeds, sampler settings, precision, EMA or raw weights, files). Image ``i`` starts from the noise of
seed ``seed + i``, so the same command gives the same images. A decoder conditioned on CLIP image embeddings
(``configs/unclip/``) reads prompts through ``--prior`` (or, without one, through the CLIP text
embedding itself); a cross-attention run reads them directly.

Options in ``ldm fit``'s dialect (:mod:`ldm.tools.options`): ``-c FILE``, ``--print_config``, defaults in
``--help``. The older names ``--cfg``, ``--n``, ``--prior-cfg``, ``--clip-guidance`` and ``--prompt-column`` still
work as aliases of ``--guidance-scale``, ``--num-images``, ``--prior-guidance-scale``, ``--clip-guidance-scale``
and ``--caption-column``; ``--ckpt_path`` (``ldm fit``'s name) is one of ``--ckpt``.

``--mode text`` runs on every GPU of a node or job: launch the same command once per GPU,

    torchrun --nproc-per-node 8 --no-python -- ldm sample --ckpt RUN --prompts captions.txt --num-images 4 \
        --out out/grid.png
    srun --ntasks-per-node 8 --gpus-per-task 1 ldm sample --ckpt RUN --prompts captions.txt --out out/grid.png

and each rank (on ``cuda:LOCAL_RANK``) draws a contiguous block of whole batches of the images, image ``i`` from
seed ``seed + i`` in the batch one process puts it in, and writes those image files itself: the files are byte for
byte those of one process, each written once. Rank 0 gathers the images for the grid and alone writes the grid and
the record (:mod:`ldm.pipelines.distributed`). The other modes are small: rank 0 runs them, the other ranks exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ldm.diffusion.samplers import SAMPLERS
from ldm.pipelines.precision import PRECISION_HELP, parse_precision
from ldm.tools.options import CKPT_ALIASES, GUIDANCE_SCALE, ToolParser
from ldm.tools.prompts import read_prompt_file

MODES = ("text", "variations", "interpolate", "text-diff", "img2img", "inpaint", "invert")
UNCLIP_MODES = ("variations", "interpolate", "text-diff")
IMAGES_NEEDED = {"variations": 1, "interpolate": 2, "text-diff": 1, "img2img": 1, "inpaint": 1, "invert": 1}


def _parser() -> ToolParser:
    p = ToolParser(prog="ldm sample", description="Sample or edit images with a trained latent-diffusion "
                                "or unCLIP-decoder run (its EMA weights where it kept an EMA, unless --weights raw). "
                                "--mode text on several GPUs: torchrun --nproc-per-node N --no-python -- ldm "
                                "sample ..., or srun ldm sample ... under SLURM; the same files as one process.")
    p.add_argument("--ckpt", aliases=CKPT_ALIASES, required=True,
                   help="latent-diffusion / decoder run folder (runs/<name>/<version>) or a "
                   ".ckpt in one")
    p.add_argument("--mode", default="text", choices=MODES, help="what to make: text -> image, or an edit of --image")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat the flag for several)")
    p.add_argument("--prompts", help="a prompt file, read by its extension: .txt (one prompt per line), .json (a list "
                   "of strings or of objects with a caption field), .jsonl (one string or object per line), .csv / "
                   ".tsv (a header with a caption column)")
    p.add_argument("--caption-column", aliases=("--prompt-column",),
                   help="the caption field or column of a --prompts .json/.jsonl/.csv/.tsv file "
                   "(default: the first of caption, text, prompt)")
    p.add_argument("--sampler", default="dpmpp_2m", choices=sorted(SAMPLERS), help="sampling method")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--guidance-scale", aliases=("--cfg",), type=float, default=GUIDANCE_SCALE,
                   help="classifier-free guidance scale (1 = off)")
    p.add_argument("--rescale", type=float, default=0.0, help="guidance rescale (Lin et al. 2024), 0 = off")
    p.add_argument("--eta", type=float, default=0.0, help="noise of ddim / euler_ancestral steps")
    p.add_argument("--spacing", default="leading", choices=["leading", "trailing", "linspace", "karras"],
                   help="where the steps fall on the noise schedule")
    p.add_argument("--negative-prompt", default="",
                   help="what guidance steers away from: the other branch of classifier-free guidance (default: none)")
    p.add_argument("--threshold", default="auto", choices=["auto", "none", "clip", "dynamic"],
                   help="x0 estimate at every step: clip to [-1, 1], Imagen's dynamic thresholding, or none; auto "
                        "clips pixel-space models and leaves latents alone")
    p.add_argument("--num-images", aliases=("--n",), type=int, default=1,
                   help="images per prompt (text, img2img, inpaint) or variations")
    p.add_argument("--seed", type=int, default=0, help="image i starts from the noise of seed + i")
    p.add_argument("--size", type=int, help="image size in pixels (default: the run's data.image_size)")
    p.add_argument("--height", type=int, help="--mode text: image height in pixels (default: --size), a multiple "
                                               "of the first stage's factor")
    p.add_argument("--width", type=int, help="--mode text: image width in pixels (default: --size)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--out", default="samples/grid.png", help="grid PNG; images and the JSON record go beside it")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available; each rank "
                   "of a torchrun / srun launch on cuda:LOCAL_RANK)")
    p.add_argument("--precision", default="32-true", type=_precision, help=PRECISION_HELP)
    p.add_argument("--weights", default="ema", choices=["ema", "raw"],
                   help="--ckpt's weights: ema (the EMA average where the run kept one, else its only weights) or "
                        "raw (the weights the optimizer trained); the --prior and --clip runs use their EMA weights")
    g = p.add_argument_group("unCLIP")
    g.add_argument("--prior", help="diffusion-prior run: prompts -> CLIP image embeddings for an unCLIP decoder "
                   "(without it the CLIP text embedding is used directly)")
    g.add_argument("--prior-best-of", type=int, help="prior draws per prompt, the best by text similarity kept")
    g.add_argument("--prior-steps", type=int, help="prior sampling steps (default: the prior's own)")
    g.add_argument("--prior-guidance-scale", aliases=("--prior-cfg",), type=float,
                   help="prior guidance scale (default: the prior's own)")
    g.add_argument("--frames", type=int, default=8, help="interpolate: frames in the strip")
    g.add_argument("--from-prompt", help="text-diff: a caption of the input image (the edit goes from it to --prompt)")
    g.add_argument("--amounts", default="0,0.1,0.2,0.3,0.4,0.5",
                   help="text-diff: slerp amounts toward the caption difference, comma-separated")
    g = p.add_argument_group("editing")
    g.add_argument("--image", action="append", default=[], help="input image file (repeat for interpolate)")
    g.add_argument("--strength", type=float, default=0.6, help="img2img: 0 keeps the input, 1 samples from noise")
    g.add_argument("--mask", help="inpaint: mask image drawn on the input (same size or aspect ratio), white (> 50%%) "
                   "= regenerate; cropped like the image")
    g.add_argument("--mask-box", help="inpaint: the box of the generated square to regenerate, as fractions "
                   "left,top,right,bottom (0.5,0,1,1)")
    g = p.add_argument_group("CLIP guidance (text, img2img, inpaint)")
    g.add_argument("--clip-guidance-scale", aliases=("--clip-guidance",), type=float, default=0.0,
                   help="CLIP guidance scale (0 = off)")
    g.add_argument("--clip", help="contrastive run that guides (default: the run's own text encoder's CLIP); for an "
                   "unCLIP decoder without a text encoder, also the CLIP that reads the prompts and images")
    g.add_argument("--noised-clip", action="store_true",
                   help="the CLIP was trained on noised images: score the noisy sample (pixel-space runs)")
    g.add_argument("--clip-through-denoiser", action="store_true",
                   help="plain CLIP: back-propagate through the U-Net too (slower)")
    p.add_argument("--attention-maps", action="store_true",
                   help="also write <out stem>_attention.png: the first prompt's cross-attention map per word")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _precision(value: str) -> str:
    try:
        return parse_precision(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "empty"


def image_file_names(captions: Sequence[str]) -> list[str]:
    """``NNNN-<slug>.png`` per caption, numbered in order with a width that fits them all (at least 4 digits):
    the names sort in generation order."""
    width = max(4, len(str(len(captions) - 1)))
    return [f"{i:0{width}d}-{slug(caption)}.png" for i, caption in enumerate(captions)]


def read_prompts(args, required: bool = True) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        if not Path(args.prompts).is_file():
            raise FileNotFoundError(f"--prompts {args.prompts}: no such file")
        try:
            prompts += read_prompt_file(args.prompts, column=args.caption_column)
        except ValueError as e:  # the message names the file and the line, row or item
            raise ValueError(f"--prompts {e}") from e
    elif args.caption_column:
        raise ValueError("--caption-column names the caption column of a --prompts file: give --prompts FILE")
    if not prompts and required:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def read_images(files: Sequence[str], size: int):
    """Image files as (B, 3, size, size) in [-1, 1] (shorter side resized, centre crop)."""
    import torch
    from PIL import Image, UnidentifiedImageError

    from ldm.data.transforms import ImageTransform

    out = []
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"--image {f}: no such file")
        try:
            out.append(ImageTransform(size)(Image.open(f)))
        except UnidentifiedImageError as e:
            raise ValueError(f"--image {f}: not an image file ({e})") from e
    return torch.stack(out)


def read_mask(args, image_files: Sequence[str], size: int):
    """The inpainting mask of each input image (len(image_files), 1, size, size), 1 = regenerate.

    ``--mask FILE`` is drawn on the input image (same size, or the same aspect ratio at another scale) and is
    resized and centre-cropped exactly like the image, so that it covers the same pixels; a mask of another aspect
    ratio is refused. ``--mask-box`` gives fractions of the generated (centre-cropped) square.
    """
    import torch
    from PIL import Image, UnidentifiedImageError

    from ldm.data.transforms import center_crop_mask, same_aspect_ratio

    if (args.mask is None) == (args.mask_box is None):
        raise ValueError("inpaint needs exactly one of --mask FILE or --mask-box left,top,right,bottom")
    if args.mask is not None:
        if not Path(args.mask).is_file():
            raise FileNotFoundError(f"--mask {args.mask}: no such file")
        try:
            with Image.open(args.mask) as opened:
                mask_image = opened.convert("L")
        except UnidentifiedImageError as e:
            raise ValueError(f"--mask {args.mask}: not an image file ({e})") from e
        masks = []
        for f in image_files:
            with Image.open(f) as im:
                image_size = im.size
            if not same_aspect_ratio(mask_image.size, image_size):
                raise ValueError(
                    f"--mask {args.mask} is {mask_image.size[0]}x{mask_image.size[1]} but --image {f} is "
                    f"{image_size[0]}x{image_size[1]}: the mask must be drawn on the image (the same size, or the "
                    "same aspect ratio at another scale), since both are resized and centre-cropped alike")
            cropped = center_crop_mask(mask_image, image_size, size)
            masks.append(torch.tensor(list(cropped.getdata()), dtype=torch.float32).reshape(1, size, size) / 255 > 0.5)
        mask = torch.stack(masks)  # (N, 1, size, size)
    else:
        try:
            left, top, right, bottom = (float(v) for v in args.mask_box.split(","))
        except ValueError as e:
            raise ValueError(f"--mask-box {args.mask_box!r}: give four fractions left,top,right,bottom") from e
        if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
            raise ValueError(f"--mask-box {args.mask_box!r}: need 0 <= left < right <= 1 and 0 <= top < bottom <= 1")
        mask = torch.zeros(1, 1, size, size, dtype=torch.bool)
        mask[..., round(top * size): round(bottom * size), round(left * size): round(right * size)] = True
        mask = mask.expand(len(image_files), -1, -1, -1)
    empty = [f for f, m in zip(image_files, mask) if not m.any()]
    if empty:
        raise ValueError(f"the inpainting mask is empty on {', '.join(empty)} (after the centre crop): nothing to "
                         "regenerate")
    return mask.float()


class Job:
    """The loaded run(s) and how prompts become the decoder's condition."""

    def __init__(self, args, settings, device: str):
        from ldm.contrastive import FrozenTextEncoder
        from ldm.pipelines import UnCLIP
        from ldm.systems import load_clip, load_prior
        from ldm.systems.loading import load_latent_diffusion

        system = load_latent_diffusion(args.ckpt, weights=args.weights).to(device)  # checks the kind of run
        self.args, self.settings = args, settings
        self.system = system
        self.unclip = None
        if system.conditioner.reads_embeddings:
            prior = load_prior(args.prior).to(device) if args.prior else None
            text_encoder = None
            if system.conditioner.text_encoder is None:  # an image-embedding-only decoder: prompts need the CLIP
                if not args.clip:
                    raise ValueError(f"{args.ckpt} has no text encoder to read prompts or embed images: give --clip, "
                                     "the contrastive run its embeddings came from")
                text_encoder = FrozenTextEncoder(checkpoint=args.clip).to(device)
            self.unclip = UnCLIP(self.system, prior, text_encoder=text_encoder, batch_size=args.batch_size,
                                 prior_best_of=args.prior_best_of, prior_cfg=args.prior_guidance_scale,
                                 prior_steps=args.prior_steps)
        elif args.mode in UNCLIP_MODES:
            raise ValueError(f"--mode {args.mode} needs a decoder conditioned on CLIP image embeddings "
                             f"(configs/unclip/); {args.ckpt} is conditioned on {system.conditioner.vector or 'text'}")
        elif args.prior:
            raise ValueError("--prior drives a decoder conditioned on CLIP image embeddings; this run reads text")
        self.clip = load_clip(args.clip) if args.clip else None

    def pipe(self):
        """The text -> image pipeline (unCLIP: prompts -> prior -> decoder), with CLIP guidance when asked."""
        from ldm.pipelines import TextToImage
        from ldm.pipelines.clip_guidance import ClipGuided

        unclip = {}
        if self.unclip is not None:  # prompts -> prior -> image embeddings -> decoder
            unclip = {"prior": self.unclip.prior, "clip_text": self.unclip.text_encoder,
                      "prior_options": self.unclip.pipe.prior_options}
        if self.args.clip_guidance_scale:
            return ClipGuided(self.system, self.clip, scale=self.args.clip_guidance_scale, noised=self.args.noised_clip,
                              through_denoiser=self.args.clip_through_denoiser, batch_size=self.args.batch_size,
                              **unclip)
        return TextToImage(self.system, batch_size=self.args.batch_size, **unclip)


def run_mode(job: Job, prompts: list[str], size: int, shape: tuple[int, int] | None = None,
             block: range | None = None) -> tuple:
    """(images (B, 3, H, W), captions, columns of the grid, extra record entries) of the chosen mode.

    ``block``: --mode text draws only the images of these global indices (a rank's share; default all); the
    captions are those of all images."""
    import torch

    from ldm.pipelines import img2img, inpaint, invert, reconstruct

    args, settings, progress = job.args, job.settings, not job.args.quiet
    images = read_images(args.image, size) if args.mode != "text" else None
    if images is not None and len(images) < IMAGES_NEEDED[args.mode]:
        raise ValueError(f"--mode {args.mode} needs {IMAGES_NEEDED[args.mode]} --image file(s), got {len(images)}")
    if args.mode == "text":
        expanded = [p for p in prompts for _ in range(args.num_images)]
        block = range(len(expanded)) if block is None else block
        if len(block):
            out = job.pipe()(expanded[block.start:block.stop], settings, image_size=shape or size, progress=progress,
                             index_offset=block.start)
        else:  # more ranks than batches
            out = torch.empty(0, 3, *(shape or (size, size)))
        return out, expanded, (args.num_images if len(prompts) > 1 and args.num_images > 1 else None), {}
    if args.mode == "variations":
        out = job.unclip.variations(images[:1], args.num_images, settings, image_size=size, progress=progress)
        return (torch.cat([images[:1], out]), ["input"] + [f"variation {i + 1}" for i in range(args.num_images)],
                None, {})
    if args.mode == "interpolate":
        if args.frames < 2:
            raise ValueError(f"--frames must be >= 2, got {args.frames}")
        strip = job.unclip.interpolate(images[:1], images[1:2], args.frames, settings, image_size=size,
                                       progress=progress)
        return strip, [f"t = {i / (args.frames - 1):.2f}" for i in range(args.frames)], args.frames, {}
    if args.mode == "text-diff":
        if not args.from_prompt or len(prompts) != 1:
            raise ValueError("text-diff needs --from-prompt (a caption of the image) and one --prompt (the target)")
        try:
            amounts = [float(a) for a in args.amounts.split(",")]
        except ValueError as e:
            raise ValueError(f"--amounts {args.amounts!r}: give comma-separated numbers") from e
        frames = job.unclip.text_diff(images[:1], args.from_prompt, prompts[0], amounts, settings, image_size=size,
                                      progress=progress)
        captions = [f"{a:.2f} toward '{prompts[0]}'" for a in amounts]
        return (torch.cat([images[:1], frames]), ["input"] + captions, len(amounts) + 1,
                {"from_prompt": args.from_prompt, "amounts": amounts})
    # editing modes: one input image per prompt (or the one image for every prompt)
    prompts = prompts or [""]
    pairs = [(i % len(images), p) for p in prompts for i in range(len(images)) for _ in range(args.num_images)]
    inputs = images[torch.tensor([i for i, _ in pairs])]
    expanded = [p for _, p in pairs]
    pipe = job.pipe()
    if args.mode == "img2img":
        out = img2img(pipe, inputs, expanded, settings, strength=args.strength, progress=progress)
        return out, expanded, None, {"strength": args.strength}
    if args.mode == "inpaint":
        mask = read_mask(args, args.image, size)[torch.tensor([i for i, _ in pairs])]  # (B, 1, size, size)
        out = inpaint(pipe, inputs, mask, expanded, settings, progress=progress)
        shown = inputs * (1 - mask) + mask * torch.tensor([1.0, -1.0, 1.0]).reshape(1, 3, 1, 1)  # magenta = masked
        return (torch.stack([x for pair in zip(shown, out) for x in pair]),
                [c for p in expanded for c in ("input + mask", p)], 2, {"mask": args.mask, "mask_box": args.mask_box})
    # invert: DDIM inversion, then deterministic DDIM back, per input
    noise = invert(pipe, inputs, expanded, settings, progress=progress)
    z = reconstruct(pipe, noise, expanded, settings, decode=False, progress=progress)
    z0 = job.system.first_stage.encode(inputs.to(job.system.device))
    errors = [float((a - b).norm() / b.norm()) for a, b in zip(z, z0)]
    recon = job.system.first_stage.decode(z).clamp(-1, 1).float().cpu()
    return (torch.stack([x for pair in zip(inputs, recon) for x in pair]),
            [c for e in errors for c in ("input", f"reconstruction (latent error {e:.3f})")], 2,
            {"latent_relative_error": errors})


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ldm.pipelines.distributed import Ranks, launch_environment, run_on_ranks

    if args.mode != "text":  # the other modes are small: rank 0 runs them alone, the other ranks exit
        launch = launch_environment()
        if launch is not None and launch.rank != 0:
            return 0
        return run_on_ranks(_main, args, Ranks(), level=logging.WARNING)
    return run_on_ranks(_main, args, level=logging.WARNING)


def _main(args, ranks) -> int:
    """``ranks``: the processes sharing the images of --mode text."""
    try:
        prompts = read_prompts(args, required=args.mode in ("text", "text-diff"))
        if args.num_images < 1:
            raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
        if args.mode != "text" and not args.image:
            raise ValueError(f"--mode {args.mode} needs --image FILE")
        if args.mode in ("variations", "interpolate") and args.clip_guidance_scale:
            raise ValueError(f"--clip-guidance-scale applies to the text, img2img and inpaint modes, not {args.mode}")
        import torch

        from ldm.data.preview import caption_grid
        from ldm.data.transforms import to_pil
        from ldm.pipelines import SamplerSettings
        from ldm.pipelines.precision import float32_images, sampling_precision
        from ldm.systems.loading import find_checkpoint, run_image_size

        settings = SamplerSettings(sampler=args.sampler, steps=args.steps, cfg=args.guidance_scale, seed=args.seed,
                                   eta=args.eta, rescale=args.rescale, spacing=args.spacing,
                                   threshold=args.threshold, negative_prompt=args.negative_prompt)
        device = ranks.device(args.device)
        job = Job(args, settings, device)
        size = args.size or run_image_size(args.ckpt)
        if not size:
            raise ValueError("cannot tell the image size from the run's config: pass --size")
        shape = (args.height or size, args.width or size)
        if shape != (size, size) and args.mode != "text":
            raise ValueError(f"--height / --width are for --mode text; --mode {args.mode} works on square "
                             "images: use --size")
        block = None
        if args.mode == "text":
            block = ranks.block(len(prompts) * args.num_images, args.batch_size)
        with sampling_precision(args.precision, job.system):
            images, captions, columns, extra = run_mode(job, prompts, size, shape, block)
        images = float32_images(images)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"ldm sample: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    folder = out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    names = image_file_names(captions)
    mine = block if block is not None else range(len(captions))
    for image, i in zip(to_pil(images), mine, strict=True):  # each rank writes the files of its own images
        image.save(folder / names[i])
    files = [{"file": str(folder / name), "caption": caption} for caption, name in zip(captions, names)]
    if ranks.world_size > 1:  # rank 0 gathers every rank's images (as the uint8 the files hold) for the grid
        from ldm.data.transforms import to_uint8

        parts = ranks.gather(to_uint8(images.cpu()))
        if not ranks.is_main:
            return 0
        images = torch.cat(parts).float() / 127.5 - 1
    caption_grid(list(zip(to_pil(images), captions)), cell=max(96, min(max(shape), 256)), columns=columns).save(out)
    if args.attention_maps:
        from ldm.pipelines.attention_maps import attention_maps, save_attention_figure

        try:
            if not prompts:
                raise ValueError("--attention-maps needs a --prompt")
            with sampling_precision(args.precision, job.system):
                image, maps, words = attention_maps(job.pipe(), prompts[0], settings, image_size=size)
            image, maps = float32_images(image), float32_images(maps)
        except ValueError as e:
            print(f"ldm sample: error: {e}", file=sys.stderr)
            return 2
        save_attention_figure(image, maps, words, out.with_name(out.stem + "_attention.png"), prompts[0])
    record = {"mode": args.mode, "checkpoint": str(find_checkpoint(args.ckpt)),
              "prior": str(find_checkpoint(args.prior)) if args.prior else None,
              "prompts_read_by": ("the run's text encoder" if job.unclip is None else
                                  "the diffusion prior" if args.prior else "the CLIP text embedding (no prior)"),
              "image_size": size if shape == (size, size) else list(shape),
              "prompts": prompts, "prompts_file": args.prompts, "prompt_column": args.caption_column,
              "n": args.num_images,
              "inputs": args.image, "settings": settings.to_dict(), "precision": args.precision,
              "weights": args.weights,
              "clip_guidance": {"scale": args.clip_guidance_scale, "clip": args.clip, "noised": args.noised_clip,
                                "through_denoiser": args.clip_through_denoiser} if args.clip_guidance_scale else None,
              **extra, "grid": str(out), "images": files}
    if args.mode == "text":
        for i, f in enumerate(files):
            f["seed"] = args.seed + i
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} ({len(files)} images in {folder}/, record in {out.with_suffix('.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
