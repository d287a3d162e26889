"""``ldm sample``: images for prompts from a trained latent-diffusion run.

    ldm sample --ckpt RUN_OR_CKPT --prompt "a red circle" [--prompt ...] [--prompts FILE]
               [--sampler dpmpp_2m] [--steps 20] [--cfg 5.0] [--n 4] [--seed 0] [--out samples/grid.png]

Writes the captioned grid (``--out``), every image on its own (``<out stem>/NNN-<prompt>.png``)
and the settings (``<out stem>.json``: checkpoint, prompts, seeds, sampler settings, files).
Image ``i`` (prompt-major, ``--n`` per prompt) starts from the noise of seed ``seed + i``,
so the same command gives the same images.
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm sample", description="Sample images for prompts from a trained "
                                "latent-diffusion run (EMA weights when the run used EMA).")
    p.add_argument("--ckpt", required=True, help="latent-diffusion run folder (runs/<name>/<version>) or a .ckpt in one")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat the flag for several)")
    p.add_argument("--prompts", help="a text file with one prompt per line")
    p.add_argument("--sampler", default="dpmpp_2m", choices=sorted(SAMPLERS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--rescale", type=float, default=0.0, help="guidance rescale (Lin et al. 2024), 0 = off")
    p.add_argument("--eta", type=float, default=0.0, help="noise of ddim / euler_ancestral steps")
    p.add_argument("--spacing", default="leading", choices=["leading", "trailing", "linspace", "karras"])
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, help="image size in pixels (default: the run's data.image_size)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="samples/grid.png", help="grid PNG; images and settings go beside it")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--attention-maps", action="store_true",
                   help="also write <out stem>_attention.png: the first prompt's cross-attention map per word")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "empty"


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {path}: no such file")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        prompts = read_prompts(args)
        if args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        import torch

        from ldm.data.preview import caption_grid
        from ldm.data.transforms import to_pil
        from ldm.pipelines import SamplerSettings, TextToImage
        from ldm.systems.loading import find_checkpoint, run_image_size

        settings = SamplerSettings(sampler=args.sampler, steps=args.steps, cfg=args.cfg, seed=args.seed,
                                   eta=args.eta, rescale=args.rescale, spacing=args.spacing)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = TextToImage.from_checkpoint(args.ckpt, device=device, batch_size=args.batch_size)
        size = args.size or run_image_size(args.ckpt)
        if not size:
            raise ValueError("cannot tell the image size from the run's config: pass --size")
        expanded = [p for p in prompts for _ in range(args.n)]
        images = pipe(expanded, settings, image_size=size, progress=not args.quiet)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"ldm sample: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    folder = out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (image, prompt) in enumerate(zip(to_pil(images), expanded)):
        path = folder / f"{i:03d}-{slug(prompt)}.png"
        image.save(path)
        files.append({"file": str(path), "prompt": prompt, "seed": args.seed + i})
    columns = args.n if len(prompts) > 1 and args.n > 1 else None
    caption_grid(list(zip(to_pil(images), expanded)), cell=max(96, min(size, 256)), columns=columns).save(out)
    if args.attention_maps:
        from ldm.pipelines.attention_maps import attention_maps, save_attention_figure

        try:
            image, maps, words = attention_maps(pipe, prompts[0], settings, image_size=size)
        except ValueError as e:
            print(f"ldm sample: error: {e}", file=sys.stderr)
            return 2
        save_attention_figure(image, maps, words, out.with_name(out.stem + "_attention.png"), prompts[0])
    record = {"checkpoint": str(find_checkpoint(args.ckpt)), "image_size": size, "prompts": prompts, "n": args.n,
              "settings": settings.to_dict(), "grid": str(out), "images": files}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} ({len(files)} images in {folder}/, settings in {out.with_suffix('.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
