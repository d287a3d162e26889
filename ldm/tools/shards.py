"""``ldm shards``: write WebDataset shards and look at them.

    ldm shards synthetic --kind shapes --out DIR --train N --val M --size PX --seed S
    ldm shards from-folder --images DIR [--captions FILE] --out DIR [--size PX] [--shard-size N]
    ldm shards preview --shards PATTERN --out grid.png [--num-images 16]

Options in ``ldm fit``'s dialect (:mod:`ldm.tools.options`): ``ldm shards synthetic -c shards.yaml``,
``--print_config``, defaults in ``--help``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from ldm.data import shapes
from ldm.data.synthetic import KINDS
from ldm.tools.options import ToolParser


def _parser() -> ToolParser:
    p = ToolParser(prog="ldm shards", description="Write WebDataset shards (png/jpg, txt, json) "
                                "and a stats.json beside them; preview shards as a captioned grid.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{synthetic,from-folder,preview}")

    s = sub.add_parser("synthetic", help="captioned synthetic scenes with exact metadata",
                       description="Render captioned scenes of 1-3 coloured shapes with spatial relations into "
                       f"train/val shards. Shapes: {', '.join(shapes.SHAPES)}; colours: {', '.join(shapes.COLORS)}; "
                       f"sizes: {', '.join(shapes.SIZES)}. Deterministic for a seed.")
    s.add_argument("--kind", choices=KINDS, default="shapes", help="dataset kind")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--train", type=int, default=10000, help="training samples")
    s.add_argument("--val", type=int, default=1000, help="validation samples")
    s.add_argument("--size", type=int, default=64, help=f"image side in px, {shapes.MIN_SIZE}-{shapes.MAX_SIZE}")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--max-objects", type=int, default=3, choices=(1, 2, 3), help="objects per scene, at most")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    s.add_argument("--format", dest="image_format", choices=("png", "jpg"), default="png", help="image encoding")
    s.add_argument("--overwrite", action="store_true", help="replace existing shards of the same splits")
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    f = sub.add_parser("from-folder", help="an image folder (+ captions) into shards",
                       description="Turn a folder of images into shards. Captions come from sidecar .txt files "
                       "(cat.jpg + cat.txt) or from --captions, a CSV / JSONL / parquet table with a file column "
                       "and a caption column. Unreadable or uncaptioned images are skipped and counted. "
                       "(Shards written by img2dataset are already readable by ldm: point data.train at them.)")
    f.add_argument("--images", required=True, help="folder of images (searched recursively)")
    f.add_argument("--captions", help="caption table (.csv, .jsonl, .parquet); default: sidecar .txt files")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--size", type=int, help="resize the shorter side to PX and centre-crop a square (default: keep)")
    f.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    f.add_argument("--split", default="train", help="split name, the shard file prefix: letters, digits, _ and -")
    f.add_argument("--format", dest="image_format", choices=("jpg", "png"), default="jpg", help="image encoding")
    f.add_argument("--file-column", help="caption table column with the image file name")
    f.add_argument("--caption-column", help="caption table column with the caption")
    f.add_argument("--overwrite", action="store_true", help="replace existing shards of the same split")
    f.add_argument("--quiet", action="store_true", help="no progress bar")

    v = sub.add_parser("preview", help="a captioned grid PNG of the first samples",
                       description="Save the first N samples of a shard pattern as a captioned image grid.")
    v.add_argument("--shards", required=True, help="shard pattern, e.g. 'data/shapes/val-{000000..000001}.tar'")
    v.add_argument("--out", required=True, help="output PNG")
    v.add_argument("--num-images", aliases=("--n",), type=int, default=16, help="number of samples")
    v.add_argument("--cell", type=int, default=160, help="pixel size of each image in the grid")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "synthetic":
            from ldm.data.synthetic import write_synthetic_shards

            stats = write_synthetic_shards(args.out, kind=args.kind, train=args.train, val=args.val, size=args.size,
                                           seed=args.seed, shard_size=args.shard_size, max_objects=args.max_objects,
                                           image_format=args.image_format, overwrite=args.overwrite,
                                           progress=not args.quiet)
            for split, s in stats["splits"].items():
                print(f"{split}: {s['samples']} samples in {len(s['shards'])} shards: {s['pattern']}")
        elif args.command == "from-folder":
            from ldm.data.folder import folder_to_shards

            report = folder_to_shards(args.images, args.out, captions=args.captions, size=args.size,
                                      shard_size=args.shard_size, image_format=args.image_format, split=args.split,
                                      file_column=args.file_column, caption_column=args.caption_column,
                                      overwrite=args.overwrite, progress=not args.quiet)
            print(report.summary())
            s = report.stats["splits"][args.split]
            print(f"{args.split}: {s['samples']} samples in {len(s['shards'])} shards: {s['pattern']}")
        else:
            from ldm.data.preview import write_preview

            print(f"wrote {write_preview(args.shards, args.out, n=args.num_images, cell=args.cell)}")
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"ldm shards {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
