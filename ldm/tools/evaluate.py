"""``ldm eval``: FID / KID / IS, CLIP score, FD-CLIP and compositional accuracy of a latent-diffusion run.

    ldm eval --ckpt RUN_OR_CKPT [--shards PATTERN] [--num-images 1000] [--sampler dpmpp_2m] [--steps 20]
             [--guidance-scale 5] [--guidance-sweep 1,2,3,5,7] [--inception FILE|download] [--clip RUN_OR_CKPT]
             [--out DIR] [--precision bf16-mixed] [--weights ema|raw]
    ldm eval -c eval.yaml [--num-images 50000]    # options from a YAML file; --print_config writes one
    ldm eval --ckpt DECODER_RUN [--prior PRIOR_RUN | --variations] ...   # an unCLIP decoder

Options in ``ldm fit``'s dialect (:mod:`ldm.tools.options`); the older names ``--n``, ``--cfg``, ``--cfg-sweep``
and ``--data`` still work as aliases of ``--num-images``, ``--guidance-scale``, ``--guidance-sweep`` and
``--shards``. The default guidance scale is ``ldm sample``'s (5).

Generates one image per validation caption (the first ``--num-images`` samples of ``--shards``, default the
run's ``data.val``), with a fixed seed, and writes into ``--out``: ``report.json`` (every number
and setting), ``report.md`` and ``report.html`` (tables, the sample grid, the sweep plot),
``samples.png`` (the first images with caption, CLIP score and compositional verdict) and, for
``--guidance-sweep``, ``cfg_sweep.png`` (FID, or FD-CLIP without Inception weights, against CLIP score).
The report is also logged to W&B as a ``job_type=eval`` run in the evaluated run's group, the checkpoint its input
artifact (``--wandb``; by default as the evaluated run logged, :mod:`ldm.tools.eval_wandb`).
``--precision`` runs the generating networks under autocast (``bf16-mixed`` on a GPU); the Inception
and CLIP scoring stay float32. ``--weights raw`` evaluates the weights the optimizer trained instead of
the EMA average; both are recorded in the report.

On several GPUs, launch the same command once per GPU; the numbers are those of one process:

    torchrun --nproc-per-node 8 --no-python -- ldm eval --ckpt RUN --num-images 50000 ...   # one node
    srun --ntasks-per-node 8 --gpus-per-task 1 ldm eval --ckpt RUN --num-images 50000 ...   # SLURM, any nodes

Each rank (on ``cuda:LOCAL_RANK``) generates and featurises a contiguous block of whole batches, image ``i``
from seed ``seed + i`` as in one process; the Inception / CLIP features, per-image CLIP scores and compositional
verdicts are gathered to rank 0 in order, which computes the metrics and alone writes the report
(:mod:`ldm.pipelines.distributed`).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ldm.diffusion.samplers import SAMPLERS
from ldm.pipelines.precision import PRECISION_HELP, parse_precision
from ldm.tools.options import CKPT_ALIASES, GUIDANCE_SCALE, ToolParser

OFFICIAL_INCEPTION = "weights-inception-2015-12-05-6726825d.pth"


def _parser() -> ToolParser:
    p = ToolParser(prog="ldm eval", description="Evaluate a latent-diffusion run on validation captions. "
                                "On several GPUs: torchrun --nproc-per-node N --no-python -- ldm eval ..., or "
                                "srun ldm eval ... under SLURM; the numbers equal one process's.")
    p.add_argument("--ckpt", aliases=CKPT_ALIASES, required=True, help="latent-diffusion run folder or a .ckpt in one")
    p.add_argument("--shards", aliases=("--data",), help="validation shard pattern (default: the run's data.val)")
    p.add_argument("--prior", help="diffusion-prior run, for an unCLIP decoder: prompts -> prior -> decoder "
                   "(without it a decoder reads the CLIP text embedding directly)")
    p.add_argument("--variations", action="store_true",
                   help="for an unCLIP decoder: decode each validation image's own CLIP image embedding (DALL-E 2's "
                        "image variations) instead of its caption's; the compositional checker then says whether the "
                        "variations keep the images' colours, shapes and counts")
    p.add_argument("--num-images", aliases=("--n",), type=int, default=1000,
                   help="number of captions / generated images")
    p.add_argument("--prompt-set", choices=["val", "binding"], default="val",
                   help="val: the validation captions of --shards; binding: rendered two-object attribute-binding "
                        "scenes "
                        "('a red square on top of a blue square'), real images rendered at the run's size")
    p.add_argument("--sampler", default="dpmpp_2m", choices=sorted(SAMPLERS), help="sampling method")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--guidance-scale", aliases=("--cfg",), type=float, default=GUIDANCE_SCALE,
                   help="classifier-free guidance scale (1 = off)")
    p.add_argument("--guidance-sweep", aliases=("--cfg-sweep",),
                   help="comma-separated guidance scales to evaluate instead of --guidance-scale, e.g. 1,2,3,5,7")
    p.add_argument("--seed", type=int, default=0, help="image i starts from the noise of seed + i")
    p.add_argument("--size", type=int, help="image size (default: the run's data.image_size)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--inception", default=os.environ.get("LDM_INCEPTION_WEIGHTS"),
                   help="torch-fidelity Inception weights file, or 'download' when online "
                        "(default: $LDM_INCEPTION_WEIGHTS; without it FID / KID / IS are skipped)")
    p.add_argument("--clip", help="contrastive run (or .ckpt) scoring CLIP score / FD-CLIP "
                                  "(default: the CLIP of the model's own text encoder)")
    p.add_argument("--no-clip", action="store_true", help="no CLIP score / FD-CLIP")
    p.add_argument("--no-cache", action="store_true", help="recompute the real-image reference features")
    p.add_argument("--out", help="output folder (default: <run folder>/eval)")
    p.add_argument("--grid", type=int, default=16, help="images in samples.png")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; each rank of a "
                   "torchrun / srun launch on cuda:LOCAL_RANK)")
    p.add_argument("--precision", default="32-true", type=_precision, help=PRECISION_HELP + " (the Inception and "
                   "CLIP scoring always run in float32)")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"],
                   help="--ckpt's weights: ema (the EMA average where the run kept one, else its only weights) or "
                        "raw (the weights the optimizer trained); a --prior run uses its EMA weights")
    p.add_argument("--wandb", default="auto", choices=["auto", "online", "offline", "disabled"],
                   help="log the report to W&B as a job_type=eval run in the evaluated run's project and group, with "
                        "the checkpoint as its input artifact; auto: as the evaluated run logged (its run.wandb_mode; "
                        "WANDB_MODE wins); offline runs go to <out>/wandb")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _precision(value: str) -> str:
    try:
        return parse_precision(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _scorer(args, system):
    """(OpenCLIP scorer, where it came from, a note for the report)."""
    if args.no_clip:
        return None, None, "off"
    from ldm.systems import load_clip

    if args.clip:
        return load_clip(args.clip), args.clip, f"the contrastive run {args.clip}"
    encoder = system.conditioner.text_encoder
    if encoder is None:
        return None, None, "off (the model has no text encoder; pass --clip)"
    if not encoder.has_image_tower:
        return None, None, "off (the model's text encoder is a text tower alone, e.g. an imported one; pass --clip)"
    return encoder.model, None, ("the model's own text encoder CLIP: it conditions the model, so the score favours "
                                 "it; not comparable with published CLIP scores")


def _weights_note(weights: str | None) -> str:
    if not weights:
        return "none: FID / KID / IS skipped"
    if weights == "download":
        return "torch-fidelity's released weights (downloaded)"
    if Path(weights).name != OFFICIAL_INCEPTION:
        return (f"{weights} (not torch-fidelity's released file name {OFFICIAL_INCEPTION}: FID / KID / IS are only "
                "comparable with published numbers if these are those weights)")
    return weights


def _through_prior(pipe, prior_run: str, device: str):
    """The decoder's pipeline with prompts conditioned through the diffusion prior of ``prior_run``."""
    from ldm.pipelines import TextToImage
    from ldm.systems import load_prior

    return TextToImage(pipe.system, batch_size=pipe.batch_size, prior=load_prior(prior_run).to(device))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ldm.pipelines.distributed import run_on_ranks

    return run_on_ranks(_main, args, level=logging.WARNING)


def _main(args, ranks) -> int:
    quiet = args.quiet or not ranks.is_main
    try:
        from ldm.pipelines import SamplerSettings, TextToImage
        from ldm.pipelines.evaluate import (
            GenerationEvaluator,
            binding_eval_set,
            load_eval_set,
        )
        from ldm.pipelines.precision import PrecisionPipe
        from ldm.systems.loading import find_checkpoint, load_latent_diffusion, run_config, run_image_size

        try:
            cfgs = ([float(c) for c in args.guidance_sweep.split(",")] if args.guidance_sweep else
                    [args.guidance_scale])
        except ValueError as e:
            raise ValueError(f"--guidance-sweep {args.guidance_sweep!r}: give comma-separated numbers") from e
        if args.variations and (args.prior or args.prompt_set != "val"):
            raise ValueError("--variations decodes the validation images' own embeddings: it takes no --prior and "
                             "needs --prompt-set val")
        device = ranks.device(args.device)
        pipe = TextToImage(load_latent_diffusion(args.ckpt, weights=args.weights).to(device),
                           batch_size=args.batch_size)
        if args.prior:
            pipe = _through_prior(pipe, args.prior, device)
        size = args.size or run_image_size(args.ckpt)
        data_cfg = (run_config(args.ckpt).get("data") or {}).get("init_args") or {}
        if args.prompt_set == "val" and not args.shards and data_cfg.get("decode_images") is False:
            raise ValueError("the run trained on precomputed latents (data.decode_images: false), which hold no "
                             "images to compare with: pass --shards with the validation image shards")
        data = args.shards or data_cfg.get("val")
        if not size or (args.prompt_set == "val" and not data):
            raise ValueError("cannot tell the image size / validation data from the run's config: pass --size / "
                             "--shards")
        scorer, clip_id, scorer_note = _scorer(args, pipe.system)
        evaluator = GenerationEvaluator(args.inception, scorer, clip_id, batch_size=args.batch_size,
                                        cache=not args.no_cache, device=device)
        if args.prompt_set == "binding":
            evalset, data = binding_eval_set(args.num_images, size, args.seed), "binding scenes"
        else:
            evalset = load_eval_set(str(data), args.num_images, size)
        if args.variations:
            from ldm.pipelines import UnCLIP

            pipe = UnCLIP(pipe.system, batch_size=args.batch_size).variations_of(evalset.images.to(device))
        results = []
        for cfg in cfgs:
            settings = SamplerSettings(sampler=args.sampler, steps=args.steps, cfg=cfg, seed=args.seed)
            result = evaluator.evaluate(PrecisionPipe(pipe, args.precision), evalset, settings, rank=ranks.rank,
                                        world=ranks.world_size, progress=not quiet, keep_images=args.grid)
            results.append((settings, result))
            if not quiet:
                print(f"cfg {cfg:g}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()), flush=True)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"ldm eval: error: {e}", file=sys.stderr)
        return 2
    if not ranks.is_main:
        return 0
    out = Path(args.out) if args.out else find_checkpoint(args.ckpt).parent.parent / "eval"
    record = write_report(out, args, str(find_checkpoint(args.ckpt)), str(data), evalset, results, scorer_note,
                          _weights_note(args.inception), processes=ranks.world_size)
    print(f"wrote {out / 'report.md'}, {out / 'report.html'}, {out / 'report.json'}")
    from ldm.tools.eval_wandb import eval_wandb_mode, log_eval_report

    log_eval_report(out, record, run_config(args.ckpt), eval_wandb_mode(run_config(args.ckpt), args.wandb))
    return 0


def write_report(out: Path, args, checkpoint: str, data: str, evalset, results, scorer_note: str, weights_note: str,
                 processes: int = 1):
    from ldm.data.preview import caption_grid
    from ldm.data.transforms import to_pil

    out.mkdir(parents=True, exist_ok=True)
    main_settings, main = results[len(results) // 2]
    k = min(args.grid, len(main.images))
    grid = list(zip(to_pil(main.images[:k]), main.labels(evalset, k), strict=True))
    caption_grid(grid, cell=128, caption_lines=7).save(out / "samples.png")
    variations = getattr(args, "variations", False)
    record = {"checkpoint": checkpoint, "weights": args.weights, "precision": args.precision, "prior": args.prior,
              "variations": variations,
              "data": data, "n": len(evalset),
              "image_size": evalset.image_size,
              "inception_weights": weights_note, "clip_scorer": scorer_note, "grid_cfg": main_settings.cfg,
              "processes": processes,
              "results": [{"settings": s.to_dict(), "metrics": r.metrics} for s, r in results]}
    (out / "report.json").write_text(json.dumps(record, indent=2) + "\n")
    sweep = len(results) > 1
    if sweep:
        _plot_sweep(out / "cfg_sweep.png", results)
    keys = sorted({key for _, r in results for key in r.metrics if key != "n"})
    rows = [[f"{s.cfg:g}"] + [f"{r.metrics[key]:.4g}" if key in r.metrics else "" for key in keys] for s, r in results]
    s = main_settings
    what = (f"variations of the first {len(evalset)} images of `{data}` (each decoded from its own CLIP image "
            "embedding; scored against its caption and metadata)" if variations else
            f"{len(evalset)} captions of `{data}`" + (f" through the prior `{args.prior}`" if args.prior else ""))
    intro = (f"Checkpoint `{checkpoint}`, {what} at {evalset.image_size} px; "
             f"{s.sampler}, {s.steps} steps, seed {s.seed}; {args.weights.upper()} weights, {args.precision}. "
             f"Inception weights: {weights_note}. "
             f"CLIP scorer: {scorer_note}.")
    md = ["# Evaluation", "", intro, "", "| cfg | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    md += ["", "![samples](samples.png)", "", f"First {k} images at cfg {s.cfg:g} (caption | CLIP score | "
           "compositional verdict)."]
    if sweep:
        md += ["", "![cfg sweep](cfg_sweep.png)"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    table = "<table><tr><th>cfg</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows) + "</table>"
    page = (f"<html><head><meta charset='utf-8'><title>ldm eval</title></head><body><h1>Evaluation</h1>"
            f"<p>{html.escape(intro)}</p>{table}<h2>Samples</h2><img src='samples.png'>"
            + ("<h2>Guidance sweep</h2><img src='cfg_sweep.png'>" if sweep else "") + "</body></html>")
    (out / "report.html").write_text(page)
    return record


def _plot_sweep(path: Path, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    distance = "fid" if "fid" in results[0][1].metrics else "fd_clip"
    points = [(r.metrics.get("clip_score"), r.metrics.get(distance), s.cfg) for s, r in results]
    fig, ax = plt.subplots(figsize=(5, 4))
    if all(p[0] is not None and p[1] is not None for p in points):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        for x, y, cfg in points:
            ax.annotate(f"cfg {cfg:g}", (x, y), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("CLIP score")
    else:
        ax.plot([p[2] for p in points], [p[1] for p in points], marker="o")
        ax.set_xlabel("guidance scale")
    ax.set_ylabel(distance.upper().replace("_", "-"))
    ax.set_title(f"{distance.upper().replace('_', '-')} vs CLIP score over guidance scales")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
