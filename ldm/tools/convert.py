"""``ldm convert``: pretrained weights in and out.

    ldm convert diffusers PIPELINE_FOLDER --out RUN [--size PX] [--overwrite]
    ldm convert single-file CHECKPOINT --out RUN [--version auto|sd1|sd2] [--prediction epsilon|v] [--size PX]
                            [--text-heads N] [--ema] [--overwrite]
    ldm convert to-diffusers --ckpt RUN --out PIPELINE_FOLDER [--overwrite]   # (RUN as a positional works too)

``diffusers`` imports a Stable-Diffusion-style diffusers pipeline folder (``StableDiffusionPipeline.save_pretrained``
or a downloaded model repository: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``) into an ldm run folder that every ``ldm`` command accepts (:mod:`ldm.interop.pipeline`).
``single-file`` imports an original CompVis / Stability Stable Diffusion 1.x or 2.x checkpoint (``.ckpt``, read
weights-only, or ``.safetensors``) into the same layout (:mod:`ldm.interop.single_file`): the architecture is read
from the tensor shapes, the version (``auto``: from the text-encoder keys) gives the rest, and ``--prediction v``
marks the SD 2.x 768-v models (a file does not say). SDXL and other models are refused, naming what the file holds.
``to-diffusers`` writes a run's U-Net, autoencoder and scheduler (and an imported text encoder) back in diffusers'
layout. Nothing is downloaded: the folder must be on disk (see docs/interop.md for where to get the weights).

Options in ``ldm fit``'s dialect (:mod:`ldm.tools.options`): ``-c FILE`` after the subcommand, ``--print_config``,
defaults in ``--help``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ldm.tools.options import CKPT_ALIASES, ToolParser


def _parser() -> ToolParser:
    p = ToolParser(prog="ldm convert", description="Import pretrained weights into ldm runs, and export "
                                "them back.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{diffusers,single-file,to-diffusers}")
    imp = sub.add_parser("diffusers", help="a diffusers Stable Diffusion pipeline folder -> an ldm run folder",
                         description="Import a diffusers text-to-image pipeline folder (U-Net, VAE, CLIP text "
                         "encoder, tokenizer, scheduler) into a latent-diffusion run folder with its autoencoder run.")
    imp.add_argument("pipeline", help="the pipeline folder (holds model_index.json)")
    imp.add_argument("--out", required=True, help="the run folder to write, e.g. runs/sd15")
    imp.add_argument("--size", type=int, help="the run's default image size (default: the U-Net's sample_size x 8)")
    imp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    one = sub.add_parser("single-file", help="a Stable Diffusion 1.x / 2.x .ckpt / .safetensors -> an ldm run folder",
                         description="Import an original CompVis / Stability single-file Stable Diffusion checkpoint "
                         "(U-Net, KL autoencoder, text encoder) into a latent-diffusion run folder with its "
                         "autoencoder run. .ckpt files are read weights-only.")
    one.add_argument("checkpoint", help="the .ckpt or .safetensors file")
    one.add_argument("--out", required=True, help="the run folder to write, e.g. runs/sd15")
    one.add_argument("--version", default="auto", choices=["auto", "sd1", "sd2"],
                     help="Stable Diffusion 1.x or 2.x; auto: detected from the text-encoder keys")
    one.add_argument("--prediction", choices=["epsilon", "v"],
                     help="what the U-Net predicts: v for the SD 2.x 768-v models, epsilon for the others "
                     "(default: epsilon)")
    one.add_argument("--size", type=int, help="the run's default image size (default: 512; 768 for SD 2.x v models)")
    one.add_argument("--text-heads", type=int, help="the text model's attention heads (default: its width / 64, as "
                     "in both released text encoders)")
    one.add_argument("--ema", action="store_true", help="import the U-Net's model_ema.* weights (files holding both)")
    one.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    exp = sub.add_parser("to-diffusers", help="an ldm latent-diffusion run -> a diffusers pipeline folder",
                         description="Write a latent-diffusion run's U-Net, autoencoder and scheduler (and its text "
                         "encoder when it is an imported text tower) in diffusers' layout.")
    exp.add_argument("--ckpt", aliases=CKPT_ALIASES, help="latent-diffusion run folder or a .ckpt in one (required)")
    exp.add_argument("run", nargs="?", metavar="RUN", help=argparse.SUPPRESS)  # the older spelling of --ckpt
    exp.add_argument("--out", required=True, help="the pipeline folder to write")
    exp.add_argument("--weights", default="ema", choices=["ema", "raw"], help="which of the run's weights")
    exp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options of ``argv``; to-diffusers' positional RUN (its older spelling) becomes ``--ckpt``."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "to-diffusers":
        run = args.__dict__.pop("run")
        if args.ckpt and run and args.ckpt != run:
            parser.error(f"to-diffusers: give the run once: --ckpt {args.ckpt} or RUN {run}, not both")
        args.ckpt = args.ckpt or run
        if not args.ckpt:
            parser.error("to-diffusers: the following arguments are required: --ckpt")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "diffusers":
            from ldm.interop.pipeline import import_diffusers

            out = import_diffusers(args.pipeline, args.out, overwrite=args.overwrite, image_size=args.size)
            print(f"imported {args.pipeline} -> {out} (autoencoder run: {out}/autoencoder); "
                  f"try: ldm sample --ckpt {out} --prompt 'a photograph of an astronaut riding a horse'")
        elif args.command == "single-file":
            from ldm.interop.single_file import import_single_file

            out = import_single_file(args.checkpoint, args.out, version=args.version, prediction=args.prediction,
                                     image_size=args.size, overwrite=args.overwrite, text_heads=args.text_heads,
                                     ema=args.ema)
            print(f"imported {args.checkpoint} -> {out} (autoencoder run: {out}/autoencoder); "
                  f"try: ldm sample --ckpt {out} --prompt 'a photograph of an astronaut riding a horse'")
        else:
            from ldm.interop.pipeline import export_diffusers

            out = export_diffusers(args.ckpt, args.out, overwrite=args.overwrite, weights=args.weights)
            print(f"exported {args.ckpt} -> {out}")
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, TypeError) as e:
        print(f"ldm convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
