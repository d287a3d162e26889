"""`make demo`: the end-to-end demo on embedded defaults (synthetic data, CPU, W&B offline).

It renders captioned synthetic shape scenes into WebDataset shards, reads them back
through the training DataModule, trains the debug KL autoencoder on them with the real
``ldm fit`` command for a short CPU budget, and writes under ``runs/demo/``:

    shards/               train/val shards + stats.json
    preview.png           a captioned grid of validation samples
    attributes.png        how often each shape, colour, object count and relation occurs
    autoencoder/          the autoencoder's run folder (config.yaml, checkpoints/, metrics.csv, wandb/)
    reconstructions.png   validation images (top) and their reconstructions (bottom)
    autoencoder_curves.png  training loss and validation PSNR / SSIM over steps
    clip/                 the CLIP debug run folder (stage 2), retrieval and zero-shot in metrics.json
    embeddings/           the shards with the CLIP's text / image embeddings added (``ldm precompute embeddings``)
    latents/              those shards encoded by the autoencoder (``ldm precompute latents``)
    ldm/                  the debug latent-diffusion run folder (stage 4), trained on those latents
    ldm_curves.png        its training loss and fixed-noise validation loss over steps
    ldm_samples.png       a grid sampled with ``ldm sample`` for shapes prompts (+ ldm_samples/, ldm_samples.json)
    ldm_samples_attention.png  the first prompt's cross-attention map per word
    eval/                 ``ldm eval`` of that run on validation captions: report.md / .html / .json, samples.png,
                          cfg_sweep.png (FD-CLIP, CLIP score and compositional accuracy; FID needs Inception weights)
    prior/                the debug diffusion-prior run folder (stage 3), trained on the embeddings
    decoder/              the debug unCLIP decoder run folder, trained on the latents + image embeddings
    unclip_samples.png    text -> prior -> decoder samples with ``ldm sample --prior``
    interpolation.png     ``ldm sample --mode interpolate`` between two validation images (inputs/)
    metrics.json          counts, loader throughput, PSNR / SSIM, retrieval, diffusion losses, prior vs no prior
    report.md             what was made, with the figures above
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

from ldm.data import shapes  # noqa: E402
from ldm.data.datamodule import ShardDataModule  # noqa: E402
from ldm.data.preview import write_preview  # noqa: E402
from ldm.data.synthetic import write_synthetic_shards  # noqa: E402
from ldm.data.urls import expand_urls  # noqa: E402
from ldm.metrics.compositional import CompositionalAccuracy  # noqa: E402


def attribute_counts(pattern: str) -> dict[str, Counter]:
    counts = {"objects per scene": Counter(), "shape": Counter(), "colour": Counter(), "relation": Counter()}
    for sample in wds.tarfile_to_samples()([{"url": u} for u in expand_urls(pattern)]):
        meta = json.loads(sample["json"])
        counts["objects per scene"][str(len(meta["objects"]))] += 1
        for obj in meta["objects"]:
            counts["shape"][obj["shape"]] += 1
            counts["colour"][obj["color"]] += 1
        rels = meta["relations"]
        if len(rels) == 1:
            counts["relation"][rels[0]["relation"].replace("_", " ")] += 1
        elif rels:
            counts["relation"]["row of 3" if rels[0]["relation"] == "left_of" else "column of 3"] += 1
    return counts


def plot_attributes(counts: dict[str, Counter], out: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (title, counter) in zip(axes, counts.items()):
        keys = sorted(counter) if title == "objects per scene" else [k for k, _ in counter.most_common()]
        colors = [tuple(c / 255 for c in shapes.COLORS[k]) if title == "colour" else "0.45" for k in keys]
        ax.bar(keys, [counter[k] for k in keys], color=colors)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle("training split: attribute frequencies")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


REPO = Path(__file__).resolve().parents[1]


def ldm_command() -> str:
    return str(Path(sys.executable).with_name("ldm"))


def run_ldm(*args: str) -> None:
    """Run an ``ldm`` command as a user would, echoing it."""
    print("  $ ldm " + " ".join(args))
    subprocess.run([ldm_command(), *args], check=True)


#: the W&B group of the demo's stages (one recipe: they sit together, job_type = the stage)
DEMO_GROUP = "shapes-demo"


def fit_stage(out: Path, name: str, config: str, steps: int, *args: str) -> Path:
    """``ldm fit -c configs/trainer/debug.yaml -c configs/<config> ARGS`` for ``steps`` steps into a fresh
    ``<out>/<name>/demo``; returns that run folder."""
    run = out / name / "demo"
    shutil.rmtree(run, ignore_errors=True)
    run_ldm("fit", "-c", str(REPO / "configs/trainer/debug.yaml"), "-c", str(REPO / "configs" / config), *args,
            f"--trainer.max_steps={steps}", "--trainer.max_epochs=-1", "--trainer.enable_progress_bar=false",
            f"--run.root={out}", f"--run.name={name}", "--run.version=demo", "--run.tags=[demo]",
            f"--run.group={DEMO_GROUP}")
    return run


def last_validation(run: Path, keys: list[str]) -> dict:
    """The run's last validation row, the given ``val/`` keys without their prefix, rounded."""
    last = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get(keys[0])][-1]
    return {k.removeprefix("val/"): round(float(last[k]), 4) for k in keys}


def validation_losses(run: Path) -> list[tuple[int, float]]:
    """(step, val/loss) of every validation of a run."""
    return [(int(r["step"]), float(r["val/loss"])) for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val/loss")]


def train_autoencoder(out: Path, train_pattern: str, val_pattern: str, size: int, steps: int) -> Path:
    """Run `ldm fit` on the debug KL autoencoder preset, as a user would; returns the run folder."""
    return fit_stage(out, "autoencoder", "autoencoder/kl-f4-debug.yaml", steps,
                     f"--data.train={train_pattern}", f"--data.val={val_pattern}", f"--data.image_size={size}",
                     "--data.batch_size=16", "--trainer.val_check_interval=100", "--trainer.limit_val_batches=4",
                     "--model.init_args.loss.init_args.disc_weight=0")  # no GAN in a 2-minute run: it needs thousands


#: the demo's CLIP reads 4 px patches (64 tokens of its 32 px input) instead of the preset's 8 px (16 tokens): at 310
#: steps image->text R@1 0.31 -> 0.46, zero-shot colour 0.86 -> 0.96, shape 0.18 -> 0.23 (docs/unclip.md); the preset
#: keeps 8 px patches for the tests' speed
CLIP_PATCH = "--model.init_args.model.init_args.vision.patch_size=4"


def train_clip(out: Path, train_pattern: str, val_pattern: str, steps: int) -> dict:
    """Run `ldm fit` on the CLIP debug preset with 4 px patches; returns the last validation metrics."""
    run = fit_stage(out, "clip", "contrastive/clip-debug.yaml", steps, CLIP_PATCH, f"--data.train={train_pattern}",
                    f"--data.val={val_pattern}", "--trainer.val_check_interval=1.0", "--trainer.limit_val_batches=1.0")
    keys = ["val/i2t_R@1", "val/i2t_R@10", "val/t2i_R@1", "val/t2i_R@10", "val/zero_shot/colour", "val/zero_shot/shape"]
    return {"run": str(run), "steps": steps, **last_validation(run, keys)}


LDM_PROMPTS = ["a red circle", "a large blue square", "a green triangle", "a yellow star to the left of a purple cross"]


def eval_table(report: dict) -> str:
    """The report's metrics per guidance scale as a Markdown table (after the opening sentence)."""
    keys = ["fd_clip", "clip_score", "compositional/count", "compositional/color", "compositional/shape",
            "compositional/relation", "compositional/all_correct", "fid"]
    keys = [k for k in keys if k in report["results"][0]["metrics"]]
    lines = ["images at 64 px):", "", "| cfg | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in report["results"]:
        lines.append(f"| {r['settings']['cfg']:g} | " + " | ".join(f"{r['metrics'][k]:.4g}" for k in keys) + " |")
    return "\n".join(lines)


def rate(report: dict, cfg: float, attribute: str) -> float:
    """The compositional checker's rate of ``attribute`` in an ``ldm eval`` report at guidance ``cfg``."""
    return next(r["metrics"][f"compositional/{attribute}"] for r in report["results"] if r["settings"]["cfg"] == cfg)


def precompute_latents(out: Path, ae_run: Path, shards: Path) -> Path:
    """`ldm precompute latents` over both splits: the diffusion stage then trains without the encoder."""
    latents = out / "latents"
    shutil.rmtree(latents, ignore_errors=True)
    run_ldm("precompute", "latents", "--ckpt", str(ae_run), "--shards", f"{shards}/*-*.tar", "--out", str(latents),
            "--quiet")
    return latents


def train_ldm(out: Path, latents: Path, ae_run: Path, clip_run: Path, size: int, steps: int) -> dict:
    """`ldm fit` on the debug LDM preset over the precomputed latents, conditioned by the demo CLIP's text."""
    run = fit_stage(out, "ldm", "ldm/debug.yaml", steps, f"--data.train={latents}/train-*.tar",
                    f"--data.val={latents}/val-*.tar", "--data.decode_images=false", f"--data.image_size={size}",
                    f"--model.init_args.first_stage.init_args.checkpoint={ae_run}",
                    f"--model.init_args.conditioner.init_args.text_encoder.init_args.checkpoint={clip_run}", "--trainer.val_check_interval=125",
                    "--trainer.limit_val_batches=4", "--trainer.callbacks.init_args.every_n_steps=250")
    val = validation_losses(run)
    train = [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(open(run / "metrics.csv"))
             if r.get("train/loss")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    axes[0].plot(*zip(*train))
    axes[0].set_title("train/loss (random noise levels)")
    axes[1].plot(*zip(*val), marker="o")
    axes[1].set_title("val/loss (fixed noise levels and noise)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
    fig.suptitle("debug latent diffusion on the demo latents")
    fig.tight_layout()
    fig.savefig(out / "ldm_curves.png", dpi=100)
    plt.close(fig)
    return {"run": str(run), "steps": steps, **validation_ends(val)}


def sample_ldm(out: Path, run: str) -> Path:
    """`ldm sample` for the shapes prompts, as a user would, with the first prompt's attention maps per word."""
    grid = out / "ldm_samples.png"
    run_ldm("sample", "--ckpt", run, "--num-images", "4", "--sampler", "euler", "--steps", "20", "--guidance-scale", "3",
            "--seed", "0",
            "--out", str(grid), "--quiet", "--attention-maps", *[a for p in LDM_PROMPTS for a in ("--prompt", p)])
    return grid


def evaluate_ldm(out: Path, run: str, val_pattern: str, n: int) -> dict:
    """`ldm eval` with a small guidance sweep; FID / KID / IS only where Inception weights are configured.

    The run trained on latent shards, so the real images to compare with are the image shards (--shards)."""
    run_ldm("eval", "--ckpt", run, "--shards", val_pattern, "--num-images", str(n), "--sampler", "euler", "--steps", "20",
            "--guidance-sweep", "1,3", "--out", str(out / "eval"), "--quiet")
    return json.loads((out / "eval" / "report.json").read_text())


#: the three ways ``ldm eval`` reads an unCLIP decoder: through the prior, through the CLIP text embedding itself (the
#: "no prior" baseline), and variations of the validation images (each one's own CLIP image embedding)
UNCLIP_EVALS = {"prior": "text -> prior -> decoder", "no_prior": "text embedding -> decoder (no prior)",
                "variations": "image embedding -> decoder (variations)"}


def evaluate_unclip(out: Path, decoder: str, prior: str, val_pattern: str, n: int) -> dict:
    """``ldm eval`` of the decoder three ways (``UNCLIP_EVALS``) on the first ``n`` validation scenes, guidance 3."""
    reports = {}
    for name in UNCLIP_EVALS:
        extra = {"prior": ["--prior", prior], "no_prior": [], "variations": ["--variations"]}[name]
        run_ldm("eval", "--ckpt", decoder, *extra, "--shards", val_pattern, "--num-images", str(n), "--sampler", "euler",
                "--steps", "20", "--guidance-scale", "3", "--out", str(out / f"eval_unclip_{name}"), "--quiet")
        metrics = json.loads((out / f"eval_unclip_{name}" / "report.json").read_text())["results"][0]["metrics"]
        reports[name] = {k: round(metrics[k], 4) for k in ("fd_clip", "clip_score", "compositional/color",
                                                           "compositional/shape", "compositional/count")}
    return reports


def unclip_table(reports: dict) -> str:
    keys = ["compositional/color", "compositional/shape", "compositional/count", "fd_clip", "clip_score"]
    rows = ["| decoder input | colour | shape | count | FD-CLIP | CLIP score |", "|---|---:|---:|---:|---:|---:|"]
    rows += [f"| {UNCLIP_EVALS[name]} (`eval_unclip_{name}/`) | " + " | ".join(f"{r[k]:g}" for k in keys) + " |"
             for name, r in reports.items()]
    return "\n".join(rows)


def precompute_embeddings(out: Path, clip_run: str, shards: Path) -> Path:
    """`ldm precompute embeddings`: CLIP text / image embeddings and text-token features for the prior and decoder."""
    emb = out / "embeddings"
    shutil.rmtree(emb, ignore_errors=True)
    run_ldm("precompute", "embeddings", "--ckpt", clip_run, "--shards", f"{shards}/*-*.tar", "--out", str(emb), "--quiet")
    return emb


def train_prior(out: Path, emb: Path, steps: int, clip_run: str | None = None) -> dict:
    """`ldm fit` on the debug prior over the embedding shards; its last validation metrics against the baseline.
    ``clip_run``: the CLIP the embeddings came from, recorded as the run's input (W&B lineage CLIP -> prior)."""
    inputs = [f"--run.inputs=[{clip_run}]"] if clip_run else []
    run = fit_stage(out, "prior", "prior/debug.yaml", steps, *inputs, f"--data.train={emb}/train-*.tar",
                    f"--data.val={emb}/val-*.tar", "--data.batch_size=32", "--trainer.val_check_interval=1.0",
                    "--trainer.check_val_every_n_epoch=2", "--trainer.limit_val_batches=8")
    keys = ["val/cos_prior", "val/loss", "val/cos_text", "val/r1_prior", "val/r1_text"]
    return {"run": str(run), "steps": steps, **last_validation(run, keys)}


def train_decoder(out: Path, latents: Path, ae_run: Path, clip_run: str, size: int, steps: int) -> dict:
    """`ldm fit` on the debug unCLIP decoder over the latent shards, conditioned on the CLIP image embedding alone
    (``text_context=false``: seed 004's setting; with the caption's tokens too, so short a run learns to read the
    caption and ignores the embedding, and interpolations do not move)."""
    run = fit_stage(out, "decoder", "unclip/debug.yaml", steps, f"--data.train={latents}/train-*.tar",
                    f"--data.val={latents}/val-*.tar", f"--data.image_size={size}",
                    f"--model.init_args.first_stage.init_args.checkpoint={ae_run}",
                    f"--model.init_args.conditioner.init_args.text_encoder.init_args.checkpoint={clip_run}",
                    "--model.init_args.conditioner.init_args.text_context=false", "--trainer.val_check_interval=100",
                    "--trainer.check_val_every_n_epoch=null",
                    "--trainer.limit_val_batches=4")
    return {"run": str(run), "steps": steps, **validation_ends(validation_losses(run))}


def validation_ends(val: list[tuple[int, float]]) -> dict:
    """The first and the last validation loss of a run, with the steps they were measured at."""
    return {"val_loss_first": round(val[0][1], 4), "val_step_first": val[0][0],
            "val_loss_last": round(val[-1][1], 4), "val_step_last": val[-1][0]}


def sample_unclip(out: Path, decoder: str, prior: str, val_pattern: str, size: int) -> dict:
    """`ldm sample` through the prior and the decoder, and an interpolation strip between two validation images."""
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    batch = next(iter(ShardDataModule(val=val_pattern, image_size=size, batch_size=8, num_workers=0).val_dataloader()))
    pair = [inputs / "a.png", inputs / "b.png"]
    for image, path in zip(batch["image"][[0, 5]], pair):
        save_image((image + 1) / 2, path)
    common = ["sample", "--ckpt", decoder, "--sampler", "euler", "--steps", "20", "--quiet"]
    runs = {
        "unclip_samples": [*common, "--prior", prior, "--num-images", "4", "--guidance-scale", "3",
                           "--out", str(out / "unclip_samples.png"),
                           *[a for p in LDM_PROMPTS for a in ("--prompt", p)]],
        "interpolation": [*common, "--mode", "interpolate", "--image", str(pair[0]), "--image", str(pair[1]),
                          "--frames", "8", "--guidance-scale", "3",
                          "--out", str(out / "interpolation.png")],
    }
    for args in runs.values():
        run_ldm(*args)
    return {**{name: str(out / f"{name}.png") for name in runs}, "inputs": [str(p) for p in pair],
            "input_captions": [batch["text"][0], batch["text"][5]], **frame_changes(out)}


def frame_changes(out: Path) -> dict:
    """How far the decoder's output moves along the interpolation (first to last frame), next to how far it moves
    between two seeds of one prompt: mean absolute pixel difference in 0-255 units."""
    import numpy as np
    from PIL import Image

    def read(name: str) -> list:
        # the images this run wrote, in order, from ldm sample's record (a folder may hold an older run's files)
        record = json.loads((out / f"{name}.json").read_text())
        return [np.asarray(Image.open(image["file"]), dtype=np.float64) for image in record["images"]]

    frames, samples = read("interpolation"), read("unclip_samples")
    return {"interpolation_first_to_last": round(float(np.abs(frames[-1] - frames[0]).mean()), 2),
            "seed_to_seed": round(float(np.abs(samples[1] - samples[0]).mean()), 2)}


def plot_curves(run: Path, path: Path) -> None:
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    series = {k: [(int(r["step"]), float(r[k])) for r in rows if r.get(k)] for k in ("train/rec", "val/psnr", "val/ssim")}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (name, points) in zip(axes, series.items()):
        if points:
            ax.plot(*zip(*points), marker="o" if name.startswith("val") else None)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
    fig.suptitle("debug KL autoencoder (f = 4) on the demo shapes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def evaluate_autoencoder(run: Path, val_pattern: str, size: int, out: Path) -> dict:
    from ldm.systems import load_autoencoder

    ae = load_autoencoder(run)
    psnr, ssim = PeakSignalNoiseRatio(data_range=1.0), StructuralSimilarityIndexMeasure(data_range=1.0)
    checker = CompositionalAccuracy()  # the first stage's ceiling: the latent model draws no better than this
    dm = ShardDataModule(val=val_pattern, image_size=size, batch_size=50, num_workers=0)
    first = None
    for batch in dm.val_dataloader():
        valid = batch["valid"]
        x = batch["image"][valid]
        recon = ae.decode(ae.encode(x)).clamp(-1, 1)
        psnr.update((recon + 1) / 2, (x + 1) / 2)
        ssim.update((recon + 1) / 2, (x + 1) / 2)
        checker.update(recon, [m for m, ok in zip(batch["meta"], valid.tolist()) if ok])
        if first is None:
            first = torch.cat([x[:8], recon[:8]])
    save_image(make_grid((first + 1) / 2, nrow=8, padding=2), out / "reconstructions.png")
    ceiling = {f"reconstruction_{k}": round(float(v), 3) for k, v in checker.compute().items()}
    return {"psnr": round(float(psnr.compute()), 2), "ssim": round(float(ssim.compute()), 4), **ceiling,
            "scale_factor": round(float(ae.scale_factor), 4), "latent_shape": list(ae.encode(first[:1]).shape[1:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ae-steps", type=int, default=350, help="autoencoder training steps (about 0.26 s each on CPU)")
    p.add_argument("--clip-steps", type=int, default=310, help="CLIP training steps (5 epochs of 62; about 0.1 s each)")
    p.add_argument("--ldm-steps", type=int, default=500, help="latent-diffusion training steps (about 0.3 s each)")
    p.add_argument("--eval-n", type=int, default=64, help="validation captions generated for ldm eval")
    p.add_argument("--prior-steps", type=int, default=250, help="diffusion-prior training steps at batch 32 (about "
                   "0.07 s each; validated once at the end, which must be an even number of epochs of 125 steps)")
    p.add_argument("--decoder-steps", type=int, default=200, help="unCLIP decoder training steps (about 0.4 s each)")
    args = p.parse_args()
    out = Path(args.out)
    shards = out / "shards"
    t0 = time.time()
    timeline: dict[str, float] = {}

    def phase(message: str) -> None:
        """Print a step with the time since the start; metrics.json keeps when each step began."""
        timeline[message.split("]")[0] + "]"] = round(time.time() - t0, 1)
        print(f"{message}  [{time.time() - t0:.0f} s]", flush=True)


    phase(f"[1/16] rendering {args.train} + {args.val} captioned scenes into {shards}/ "
          f"(ldm shards synthetic --kind shapes --out {shards} --train {args.train} --val {args.val} --size {args.size})")
    stats = write_synthetic_shards(shards, train=args.train, val=args.val, size=args.size, seed=args.seed,
                                   shard_size=1000, overwrite=True)
    train_pattern, val_pattern = stats["splits"]["train"]["pattern"], stats["splits"]["val"]["pattern"]

    phase(f"[2/16] preview grid of validation samples -> {out / 'preview.png'}")
    write_preview(val_pattern, out / "preview.png", n=16)

    phase(f"[3/16] attribute frequencies -> {out / 'attributes.png'}")
    counts = attribute_counts(train_pattern)
    plot_attributes(counts, out / "attributes.png")

    phase("[4/16] one training epoch and one validation pass through ShardDataModule (2 workers)")
    dm = ShardDataModule(train=train_pattern, val=val_pattern, image_size=args.size, batch_size=64, num_workers=2)
    start = time.perf_counter()
    n_train = sum(len(b["key"]) for b in dm.train_dataloader())
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    n_val = sum(int(b["valid"].sum()) for b in dm.val_dataloader())
    val_s = time.perf_counter() - start

    phase(f"[5/16] training the debug KL autoencoder for {args.ae_steps} steps -> {out / 'autoencoder'}")
    run = train_autoencoder(out, train_pattern, val_pattern, args.size, args.ae_steps)
    plot_curves(run, out / "autoencoder_curves.png")
    phase(f"[6/16] reconstructing the validation split -> {out / 'reconstructions.png'}")
    ae_metrics = evaluate_autoencoder(run, val_pattern, args.size, out)
    phase(f"[7/16] training the debug CLIP for {args.clip_steps} steps -> {out / 'clip'}")
    clip_metrics = train_clip(out, train_pattern, val_pattern, args.clip_steps)
    phase(f"[8/16] CLIP embeddings of the shards (for the prior and the decoder) -> {out / 'embeddings'}")
    emb = precompute_embeddings(out, clip_metrics["run"], shards)
    phase(f"[9/16] encoding those shards with the autoencoder -> {out / 'latents'}")
    latents = precompute_latents(out, run, emb)
    phase(f"[10/16] training the debug latent diffusion for {args.ldm_steps} steps -> {out / 'ldm'}")
    ldm_metrics = train_ldm(out, latents, run, Path(clip_metrics["run"]), args.size, args.ldm_steps)
    phase(f"[11/16] sampling {len(LDM_PROMPTS)} prompts x 4 with ldm sample -> {out / 'ldm_samples.png'}, "
          f"{out / 'ldm_samples_attention.png'}")
    sample_ldm(out, ldm_metrics["run"])
    phase(f"[12/16] evaluating the latent diffusion on {args.eval_n} validation captions -> {out / 'eval'}")
    evaluation = evaluate_ldm(out, ldm_metrics["run"], val_pattern, args.eval_n)

    phase(f"[13/16] training the debug diffusion prior for {args.prior_steps} steps -> {out / 'prior'}")
    prior_metrics = train_prior(out, emb, args.prior_steps, clip_metrics["run"])
    phase(f"[14/16] training the debug unCLIP decoder for {args.decoder_steps} steps -> {out / 'decoder'}")
    decoder_metrics = train_decoder(out, latents, run, clip_metrics["run"], args.size, args.decoder_steps)
    phase(f"[15/16] text -> prior -> decoder samples and an interpolation strip -> {out / 'unclip_samples.png'}, "
          f"{out / 'interpolation.png'}")
    unclip = sample_unclip(out, decoder_metrics["run"], prior_metrics["run"], val_pattern, args.size)
    phase(f"[16/16] evaluating the decoder on {args.eval_n} validation scenes through the prior, through the text "
          f"embedding and as variations of the images -> {out / 'eval_unclip_*'}")
    unclip_eval = evaluate_unclip(out, decoder_metrics["run"], prior_metrics["run"], val_pattern, args.eval_n)

    metrics = {
        "train_samples": stats["splits"]["train"]["samples"],
        "val_samples": stats["splits"]["val"]["samples"],
        "train_shards": len(stats["splits"]["train"]["shards"]),
        "image_size": args.size,
        "loader_train_samples_per_epoch": n_train,
        "loader_train_samples_per_s": round(n_train / train_s, 1),
        "loader_val_samples": n_val,
        "loader_val_samples_per_s": round(n_val / val_s, 1),
        "skipped_train": dm.skips["train"].count,
        "skipped_val": dm.skips["val"].count,
        "attributes": {k: dict(v) for k, v in counts.items()},
        "autoencoder": {"run": str(run), "steps": args.ae_steps, **ae_metrics},
        "clip": clip_metrics,
        "ldm": ldm_metrics,
        "ldm_eval": evaluation,
        "prior": prior_metrics,
        "decoder": decoder_metrics,
        "unclip": unclip,
        "unclip_eval": unclip_eval,
        "seconds": round(time.time() - t0, 1),
        "step_started_at_s": timeline,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    report = f"""# ldm demo

Synthetic captioned scenes (1-3 coloured shapes with spatial relations, exact metadata in each sample's `json`).

| | |
|---|---|
| training samples / shards | {metrics['train_samples']} / {metrics['train_shards']} (`{train_pattern}`) |
| validation samples | {metrics['val_samples']} (`{val_pattern}`) |
| image size | {args.size} px |
| loader, one training epoch (2 workers, batch 64) | {n_train} samples, {metrics['loader_train_samples_per_s']} samples/s |
| loader, validation pass | {n_val} samples (each exactly once), {metrics['loader_val_samples_per_s']} samples/s |
| skipped bad samples (train / val) | {metrics['skipped_train']} / {metrics['skipped_val']} |
| wall time | {metrics['seconds']} s |

## Validation samples

![preview](preview.png)

## Attribute frequencies (training split)

![attributes](attributes.png)

## Stage 1: the debug KL autoencoder (f = 4)

Trained with `ldm fit -c configs/trainer/debug.yaml -c configs/autoencoder/kl-f4-debug.yaml` for
{args.ae_steps} steps on CPU (no GAN term in so short a run); run folder `{run}`.

| | |
|---|---|
| latent shape per image | {ae_metrics['latent_shape']} |
| latent scale factor (1 / std) | {ae_metrics['scale_factor']} |
| PSNR on all {n_val} validation images | {ae_metrics['psnr']} dB |
| SSIM on all {n_val} validation images | {ae_metrics['ssim']} |
| compositional checker on the reconstructions: colour / shape / count | {ae_metrics['reconstruction_color']} / {ae_metrics['reconstruction_shape']} / {ae_metrics['reconstruction_count']} |

![reconstructions](reconstructions.png)

Top: validation images; bottom: their reconstructions. The compositional checker's rates on the reconstructions
(1.0 on the real images) bound what the latent diffusion below can reach: it draws in this autoencoder's latent
space, so a colour or shape the decoder does not reproduce, the diffusion model cannot draw either.

![curves](autoencoder_curves.png)

## Stage 2: the debug CLIP

Trained with `ldm fit -c configs/trainer/debug.yaml -c configs/contrastive/clip-debug.yaml {CLIP_PATCH}` for
{args.clip_steps} steps on CPU (32 px in 4 px patches, 2-layer towers); run folder `{clip_metrics['run']}`. Retrieval
over all {n_val} validation scenes (chance: R@1 {1 / n_val:.3f}, R@10 {10 / n_val:.3f}) and zero-shot
accuracy on the single-object scenes (chance: colour 0.111, shape 0.167):

| image->text R@1 | R@10 | text->image R@1 | R@10 | zero-shot colour | zero-shot shape |
|---:|---:|---:|---:|---:|---:|
| {clip_metrics['i2t_R@1']} | {clip_metrics['i2t_R@10']} | {clip_metrics['t2i_R@1']} | {clip_metrics['t2i_R@10']} | {clip_metrics['zero_shot/colour']} | {clip_metrics['zero_shot/shape']} |

## Stage 4: the debug latent diffusion

The shards encoded by the autoencoder (`ldm precompute latents --ckpt {run} --shards '{shards}/*-*.tar'
--out {latents}`, 4 x 16 x 16 latents), then `ldm fit -c configs/trainer/debug.yaml -c configs/ldm/debug.yaml`
for {args.ldm_steps} steps on CPU: a 1.1M-parameter U-Net with cross-attention to the demo CLIP's text
tokens, trained as a rectified flow (velocity prediction, SD3's logit-normal times: the recipe study's choice,
`docs/recipes.md`), 10 % condition dropout, EMA; run folder `{ldm_metrics['run']}`.
Validation loss at fixed noise levels with fixed noise: {ldm_metrics['val_loss_first']} at step
{ldm_metrics['val_step_first']}, {ldm_metrics['val_loss_last']} at step {ldm_metrics['val_step_last']}.

![ldm curves](ldm_curves.png)

Sampled with `ldm sample --ckpt {ldm_metrics['run']} --num-images 4 --sampler euler --steps 20 --guidance-scale 3 --prompt ...`
(the flow Euler sampler, EMA weights, seeds 0-15). After a few CPU minutes the samples are blobs on the
scene background; the compositional checker below finds {rate(evaluation, 3, 'color'):.0%} of the described objects in
their colour and {rate(evaluation, 3, 'shape'):.0%} in their shape at guidance 3 (chance: about 11 % and 17 %; the
autoencoder's reconstructions above bound both). `docs/recipes.md` has the recipe study and the quality of
this recipe against training steps; shapes, counts and relations need a GPU run of `configs/ldm/shapes-kl-f4.yaml`.

![ldm samples](ldm_samples.png)

Cross-attention maps of the first prompt, one per word (`--attention-maps`: the U-Net's cross-attention
probabilities summed over layers, heads and sampling steps, upsampled and overlaid):

![attention maps](ldm_samples_attention.png)

## Evaluation

`ldm eval --ckpt {ldm_metrics['run']} --shards '{val_pattern}' --num-images {args.eval_n} --sampler euler --steps 20 --guidance-sweep 1,3` on the first
{args.eval_n} validation captions ({eval_table(evaluation)}

CLIP scorer: {evaluation['clip_scorer']}. Inception weights: {evaluation['inception_weights']}
(this machine cannot download them; `--inception FILE` or `LDM_INCEPTION_WEIGHTS` turns FID / KID / IS on).
The compositional rates come from the deterministic checker of `ldm/metrics/compositional.py`
(1.0 on the renderer's own 64 px images). Full report: `eval/report.md`.

![eval samples](eval/samples.png)

## Stage 3 and unCLIP: the diffusion prior and the CLIP-image-embedding decoder

The shards' CLIP embeddings (`ldm precompute embeddings --ckpt {clip_metrics['run']}`; the latents above were
encoded from these shards, so they carry the embeddings too). The debug prior (`configs/prior/debug.yaml`,
a 4-layer causal transformer over [caption tokens, text embedding, time, noised image embedding, query],
x0 prediction) trained {prior_metrics['steps']} steps at batch 32; on the first 256 validation scenes (8 batches),
its sampled image embedding against the true one, next to the "no prior" baseline that uses the text embedding
itself (chance R@1 {1 / 256:.3f}):

| | cosine with the true image embedding | R@1 of the true image |
|---|---:|---:|
| prior (best of 2 draws) | {prior_metrics['cos_prior']} | {prior_metrics['r1_prior']} |
| no prior (text embedding) | {prior_metrics['cos_text']} | {prior_metrics['r1_text']} |

The unCLIP decoder (`configs/unclip/debug.yaml` with `--model.init_args.conditioner.init_args.text_context=false`: the debug U-Net
conditioned on the CLIP image embedding alone, added to the timestep embedding and as 4 context tokens; no
caption tokens, seed 004's setting; a rectified flow as the latent diffusion above) trained {decoder_metrics['steps']} steps on the latent shards; fixed-noise validation loss
{decoder_metrics['val_loss_first']} at step {decoder_metrics['val_step_first']}, {decoder_metrics['val_loss_last']} at step
{decoder_metrics['val_step_last']}.

Text -> prior -> decoder (`ldm sample --ckpt {decoder_metrics['run']} --prior {prior_metrics['run']} --num-images 4 --sampler euler --guidance-scale 3 --prompt ...`):

![unclip samples](unclip_samples.png)

Interpolation between two validation images (`ldm sample --mode interpolate --image inputs/a.png
--image inputs/b.png --frames 8`): slerp between their CLIP image embeddings, one shared decoder noise.
The inputs' captions: "{unclip['input_captions'][0]}" and "{unclip['input_captions'][1]}".

![interpolation](interpolation.png)

How much the decoder uses the embedding after {decoder_metrics['steps']} CPU steps: from the first to the last frame the
image changes by {unclip['interpolation_first_to_last']} (mean absolute pixel difference, 0-255), while two seeds of
one prompt differ by {unclip['seed_to_seed']} (the goal of issue 16: at least half as much).

The decoder evaluated on the first {args.eval_n} validation scenes (`ldm eval --ckpt {decoder_metrics['run']}
[--prior {prior_metrics['run']} | --variations] --sampler euler --guidance-scale 3`): prompts read through the prior,
through the CLIP text embedding itself, and variations (each validation image's own CLIP image embedding decoded,
checked against that image's objects). The compositional rates compare across the rows; FD-CLIP and CLIP score use the
demo's own CLIP:

{unclip_table(unclip_eval)}

The decoder can only keep what the CLIP image embedding holds: the CLIP above separates the colours (zero-shot
{clip_metrics['zero_shot/colour']}) far better than the shapes ({clip_metrics['zero_shot/shape']}, chance 0.167).
"""
    (out / "report.md").write_text(report)
    print(f"done in {metrics['seconds']} s: {out / 'report.md'}, {out / 'preview.png'}, {out / 'attributes.png'}, "
          f"{out / 'metrics.json'}")


if __name__ == "__main__":
    main()
