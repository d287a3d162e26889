"""``ldm precompute``: add model outputs to shards for the later stages.

    ldm precompute latents --ckpt RUN_OR_CKPT --shards PATTERN --out DIR [--size PX] [--std]
    ldm precompute embeddings --ckpt RUN_OR_CKPT --shards PATTERN --out DIR [--no-tokens]
    ldm precompute embeddings --model-name ViT-H-14 --pretrained FILE --shards PATTERN --out DIR

On several GPUs, launch the same command once per GPU (each rank on ``cuda:LOCAL_RANK``):

    torchrun --nproc-per-node 8 --no-python -- ldm precompute latents --ckpt RUN --shards 'train-*.tar' --out DIR
    srun --ntasks-per-node 8 --gpus-per-task 1 ldm precompute latents --ckpt RUN --shards ... --out DIR

Options in ``ldm fit``'s dialect (:mod:`ldm.tools.options`): ``-c FILE`` after the subcommand, ``--print_config``,
defaults in ``--help``; ``--ckpt_path`` is an alias of ``--ckpt``.

Each rank encodes every ``world_size``-th input shard into the output shard of the same name (so none is written
twice, and the output is that of one process); rank 0 gathers the counts and writes ``stats.json``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from ldm.tools.options import CKPT_ALIASES, ToolParser


def _parser() -> ToolParser:
    p = ToolParser(prog="ldm precompute", description="Encode shards with a trained stage, for the "
                                "next stage to train on precomputed inputs. On several GPUs: torchrun "
                                "--nproc-per-node N --no-python -- ldm precompute ..., or srun ldm precompute ... "
                                "under SLURM; each rank encodes its share of the input shards.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{latents,embeddings}")
    lat = sub.add_parser("latents", help="autoencoder latents (latent.npy) for the diffusion stages",
                         description="Encode every image of the shards with a trained autoencoder into new shards "
                         "holding latent.npy (scaled by the autoencoder's scale factor) beside txt and json. "
                         "Resumable: finished output shards are skipped.")
    lat.add_argument("--ckpt", aliases=CKPT_ALIASES, required=True,
                     help="autoencoder run folder (runs/<name>/<version>) or a .ckpt in one")
    lat.add_argument("--shards", required=True, help="input shard pattern, e.g. 'data/shapes/train-*.tar'")
    lat.add_argument("--out", required=True, help="output folder")
    lat.add_argument("--size", type=int, help="image size to encode at (default: the run's data.image_size)")
    lat.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    lat.add_argument("--std", action="store_true", help="also write the KL posterior std (latent_std.npy)")
    lat.add_argument("--keep-images", action="store_true", help="copy the images into the output shards too")
    lat.add_argument("--device", help="cpu or cuda (default: cuda when available; each rank of a torchrun / srun "
                     "launch on cuda:LOCAL_RANK)")
    lat.add_argument("--quiet", action="store_true", help="no progress bar")

    emb = sub.add_parser("embeddings", help="CLIP embeddings (clip_text/clip_image/clip_tokens.npy)",
                         description="Add the CLIP text embedding (pooled, normalised), the image embedding and the "
                         "text tower's per-token features (+ mask) to every sample, keeping everything already there "
                         "(run it before `latents`, which keeps them too). Resumable per shard.")
    emb.add_argument("--ckpt", aliases=CKPT_ALIASES,
                     help="contrastive run folder (runs/<name>/<version>) or a .ckpt in one")
    emb.add_argument("--model-name", help="an open_clip model name, with --pretrained, instead of --ckpt")
    emb.add_argument("--pretrained", help="local open_clip checkpoint file for --model-name")
    emb.add_argument("--shards", required=True, help="input shard pattern")
    emb.add_argument("--out", required=True, help="output folder")
    emb.add_argument("--batch-size", type=int, default=64, help="samples per forward pass")
    emb.add_argument("--no-tokens", action="store_true", help="skip the per-token text features")
    emb.add_argument("--device", help="cpu or cuda (default: cuda when available; each rank of a torchrun / srun "
                     "launch on cuda:LOCAL_RANK)")
    emb.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ldm.pipelines.distributed import init, run_on_ranks

    ranks = init()
    args.device = ranks.device(args.device)
    return run_on_ranks(_main, args, ranks, level=logging.INFO)


def _main(args, ranks) -> int:
    try:
        if args.command == "embeddings":
            return _embeddings(args, ranks)
        from ldm.data.precompute import precompute_latents
        from ldm.systems.loading import load_autoencoder, run_image_size

        size = args.size or run_image_size(args.ckpt)
        if not size:
            raise ValueError("cannot tell the image size from the run's config: pass --size")
        stats = precompute_latents(load_autoencoder(args.ckpt), args.shards, args.out, size=size,
                                   batch_size=args.batch_size, with_std=args.std, keep_images=args.keep_images,
                                   device=args.device, progress=not args.quiet, ranks=ranks)
        if stats is None:  # not rank 0
            return 0
        for split, s in stats["splits"].items():
            print(f"{split}: {s['samples']} latents in {len(s['shards'])} shards: {s['pattern']}")
        print(f"scale factor {stats['scale_factor']:.4f}; {stats['skipped']} unreadable images skipped")
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"ldm precompute {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _embeddings(args, ranks) -> int:
    from ldm.contrastive import FrozenTextEncoder
    from ldm.data.precompute import precompute_embeddings

    encoder = FrozenTextEncoder(checkpoint=args.ckpt, model_name=args.model_name, pretrained=args.pretrained)
    stats = precompute_embeddings(encoder, args.shards, args.out, batch_size=args.batch_size,
                                  with_tokens=not args.no_tokens, device=args.device, progress=not args.quiet,
                                  ranks=ranks)
    if stats is None:  # not rank 0
        return 0
    for split, s in stats["splits"].items():
        print(f"{split}: {s['samples']} samples with embeddings in {len(s['shards'])} shards: {s['pattern']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
