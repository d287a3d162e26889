"""Recipe study on the shapes scenes: which text-to-image recipe buys the most quality per CPU minute (issues 16, 20).

    python experiments/recipes/study.py [--demo runs/demo] [--out runs/study] [--steps 400] [--seeds 0 1]
        [--arms unet-eps unet-v ...] [--eval-n 64] [--guidance 3,5]
    python experiments/recipes/study.py --curve ARM [--curve-steps 250 500 1000 2000]

Every arm is the real ``ldm fit`` of ``configs/ldm/debug.yaml`` (plus the arm's overlay configs and arguments) on the
latent shards, autoencoder and CLIP of a finished ``make demo`` (``runs/demo``), for the same number of steps at the
same batch size, followed by ``ldm eval`` of its EMA weights on the first ``--eval-n`` validation captions: FD-CLIP,
CLIP score and the compositional checker's colour / shape / count / relation rates. Wall time of each fit is
recorded (it depends on what else runs on the machine: compare it within one study run).

Results are appended to ``<out>/results.csv`` as each run finishes (a re-run skips the runs already there), and
``<out>/study.md`` and ``<out>/study.png`` summarise them: the mean and the two seeds' values per arm. ``--curve``
trains one arm longer and evaluates it at several step counts (``curve-<arm>.csv`` / ``.png``): where a goal is out
of reach in the demo's budget, the curve says where it would be reached.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: arm -> (what it changes, extra ldm fit arguments). All start from configs/ldm/debug.yaml (the demo's U-Net, lr 1e-3,
#: batch 32, EMA 0.99): since the study it trains a rectified flow; the eps arms add configs/ldm/debug-eps.yaml (eps
#: prediction on SD's scaled-linear schedule, uniform timesteps: the preset's recipe before the study).
EPS = ["-c", "configs/ldm/debug-eps.yaml"]
ARMS: dict[str, tuple[str, list[str]]] = {
    "unet-eps": ("U-Net, eps prediction, uniform timesteps (the demo's recipe before the study)", EPS),
    "unet-v": ("U-Net, v prediction", [*EPS, "--model.init_args.precond.class_path=ldm.diffusion.VPrecond"]),
    "unet-eps-minsnr": ("U-Net, eps prediction, min-SNR-5 weighting",
                        [*EPS, "--model.init_args.loss=ldm.diffusion.DenoisingLoss",
                         "--model.init_args.loss.init_args.weighting=ldm.diffusion.MinSNRWeighting"]),
    "unet-flow": ("U-Net, rectified flow, logit-normal times (configs/ldm/debug.yaml since the study)", []),
    "dit-flow": ("DiT (2 blocks, width 64, patch 2), rectified flow, logit-normal times",
                 ["-c", "configs/dit/debug.yaml"]),
    "dit-flow-repa": ("DiT + REPA to the demo CLIP's image tokens (weight 0.5), no masking",
                      ["-c", "configs/dit/debug.yaml", "-c", "configs/dit/debug-repa.yaml",
                       "--model.init_args.unet.init_args.mask_ratio=0.0", "--model.init_args.unmask_after_steps=null"]),
    "dits2-flow": ("DiT-S/2 (12 blocks, width 384, 33M parameters), rectified flow, logit-normal times, the arms' lr 1e-3",
                   ["-c", "configs/dit/debug.yaml", "--model.init_args.unet.init_args.preset=S/2"]),
    "dits2-flow-repa": ("DiT-S/2 + REPA at block 4 to the demo CLIP's image tokens (weight 0.5), no masking",
                        ["-c", "configs/dit/debug.yaml", "-c", "configs/dit/debug-repa.yaml",
                         "--model.init_args.unet.init_args.preset=S/2", "--model.init_args.repa.init_args.depth=4",
                         "--model.init_args.unet.init_args.mask_ratio=0.0", "--model.init_args.unmask_after_steps=null"]),
    "unet-eps-vec": ("U-Net, eps, plus the pooled text embedding added to the timestep embedding (vector: text)",
                     [*EPS, "--model.init_args.unet.init_args.y_dim=64",
                      "--model.init_args.conditioner.init_args.vector=text"]),
    "diffusers-example": ("diffusers' examples/text_to_image/train_text_to_image.py recipe with its defaults on diffusers' "
                          "UNet2DConditionModel of the same architecture: eps, uniform timesteps, lr 1e-4, weight decay "
                          "1e-2, no EMA, no caption dropout (experiments/recipes/diffusers_example.py)",
                          [*EPS, "--model.init_args.conditioner.init_args.null=empty_prompt"]),
    "diffusers-example-lr1e-3": ("the same with the study's lr 1e-3 (the example's --learning_rate=1e-3)",
                                 [*EPS, "--model.init_args.conditioner.init_args.null=empty_prompt"]),
    "unet-eps-lr3e-3": ("U-Net, eps, lr 3e-3", [*EPS, "--model.init_args.optimizer.init_args.lr=3e-3"]),
    "unet-eps-b64": ("U-Net, eps, batch 64 (twice the images per step)", [*EPS, "--data.batch_size=64"]),
    # the budget study (issue 16): the demo's recipe varied one knob at a time, each arm at about the CPU time of the
    # demo's own latent-diffusion fit (--steps 500); STEP_FACTOR below scales the steps of the arms whose step costs
    # more or less
    "unet-flow-lr2e-3": ("U-Net, rectified flow, lr 2e-3", ["--model.init_args.optimizer.init_args.lr=2e-3"]),
    "unet-flow-lr4e-3": ("U-Net, rectified flow, lr 4e-3", ["--model.init_args.optimizer.init_args.lr=4e-3"]),
    "unet-flow-b16": ("U-Net, rectified flow, batch 16 for twice the steps", ["--data.batch_size=16"]),
    "unet-flow-b64": ("U-Net, rectified flow, batch 64 for half the steps", ["--data.batch_size=64"]),
    "unet-flow-w16": ("U-Net of width 16 (0.28M parameters), rectified flow, 1.5x the steps",
                      ["--model.init_args.unet.init_args.channels=16"]),
    "unet-flow-w48": ("U-Net of width 48 (2.4M parameters), rectified flow, 0.6x the steps",
                      ["--model.init_args.unet.init_args.channels=48"]),
    "unet-flow-drop0.2": ("U-Net, rectified flow, condition dropout 0.2 (the preset: 0.1)",
                          ["--model.init_args.cond_drop=0.2"]),
    "unet-flow-emawarmup": ("U-Net, rectified flow, EMA with diffusers' warmup to 0.999 (the preset: a fixed 0.99)",
                            ["-c", "experiments/recipes/ema-warmup.yaml"]),
}

#: arm -> its steps as a multiple of --steps, so that the budget study's arms train for about the same CPU time. The
#: factors: the batch arms by their images per step; the width arms by the bare U-Net's training step at batch 32 on
#: the 2-core development machine (width 16 / 32 / 48: 0.64 / 1 / 1.7 of width 32's time). A fit's fixed per-step work
#: (data, text encoder, EMA) moves the real ratios towards 1: docs/recipes.md gives each fit's seconds.
STEP_FACTOR = {"unet-flow-b16": 2.0, "unet-flow-b64": 0.5, "unet-flow-w16": 1.5, "unet-flow-w48": 0.6}

#: arms trained by diffusers' own model and loop (experiments/recipes/diffusers_example.py) -> its extra arguments;
#: their ldm fit is a one-step template (config, frozen stages, checkpoint layout) whose U-Net weights are replaced
DIFFUSERS_ARMS = {"diffusers-example": [], "diffusers-example-lr1e-3": ["--lr", "1e-3"]}

METRICS = ["fd_clip", "clip_score", "compositional/color", "compositional/shape", "compositional/count",
           "compositional/relation", "compositional/all_correct"]


def ldm(*args: str) -> None:
    cmd = [str(Path(sys.executable).with_name("ldm")), *args]
    print("  $ ldm " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def arm_steps(arm: str, args: argparse.Namespace) -> int:
    return round(args.steps * STEP_FACTOR.get(arm, 1.0))


def fit(arm: str, seed: int, args: argparse.Namespace, steps: int | None = None, version: str | None = None,
        extra_args: tuple[str, ...] = ()) -> tuple[Path, float]:
    demo, steps = args.demo, steps or arm_steps(arm, args)
    version = version or f"seed{seed}"
    run = args.out / arm / version
    extra = [a if not a.startswith("configs/") else str(REPO / a) for a in ARMS[arm][1]]
    repa = any("debug-repa" in a for a in extra)
    if run.exists():  # an earlier study run stopped before this arm's results were written: start it again
        print(f"  removing {run}: left by an interrupted run (its results are not in results.csv)", flush=True)
        shutil.rmtree(run)
    start = time.perf_counter()
    ldm("fit", "-c", str(REPO / "configs/trainer/debug.yaml"), "-c", str(REPO / "configs/ldm/debug.yaml"), *extra,
        f"--data.train={demo}/latents/train-*.tar", f"--data.val={demo}/latents/val-*.tar",
        "--data.decode_images=false", "--data.image_size=64",
        f"--model.init_args.first_stage.init_args.checkpoint={demo}/autoencoder/demo",
        f"--model.init_args.conditioner.init_args.text_encoder.init_args.checkpoint={demo}/clip/demo",
        *([f"--model.init_args.repa.init_args.encoder.init_args.checkpoint={demo}/clip/demo"] if repa else []),
        f"--trainer.max_steps={steps}", "--trainer.max_epochs=-1", "--trainer.enable_progress_bar=false",
        f"--trainer.val_check_interval={steps}", "--trainer.check_val_every_n_epoch=null",
        "--trainer.limit_val_batches=2",
        "--trainer.callbacks.init_args.every_n_steps=100000",
        *extra_args, f"--seed_everything={seed}", f"--run.root={args.out}", f"--run.name={arm}",
        f"--run.version={version}", "--run.tags=[study]", "--run.monitors=false")
    return run, time.perf_counter() - start


def fit_diffusers(arm: str, seed: int, args: argparse.Namespace) -> tuple[Path, float]:
    """A diffusers-recipe arm: a one-step ``ldm fit`` template of the same U-Net (eps, the empty prompt as the null
    condition), then ``diffusers_example.py`` trains diffusers' U-Net from scratch on the same shards and writes a run
    folder ``ldm eval`` reads. The seconds are the diffusers training loop's own."""
    template, _ = fit(arm, seed, args, steps=1, version=f"seed{seed}-template")
    run = args.out / arm / f"seed{seed}"
    cmd = [sys.executable, str(Path(__file__).with_name("diffusers_example.py")), "--template", str(template),
           "--out", str(run), "--steps", str(args.steps), "--seed", str(seed), *DIFFUSERS_ARMS[arm]]
    print("  $ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return run, json.loads((run / "fit.json").read_text())["seconds"]


def evaluate(run: Path, args: argparse.Namespace, ckpt: Path | None = None, name: str = "eval") -> dict:
    """``ldm eval`` of a run (its last checkpoint, or ``ckpt``) into ``<run>/<name>``; returns its report."""
    sampler = ["--sampler", "euler"] if "flow" in run.parent.name else []
    ldm("eval", "--ckpt", str(ckpt or run), "--shards", f"{args.demo}/shards/val-*.tar", "--num-images",
        str(args.eval_n), "--steps", "20", *sampler, "--guidance-sweep", args.guidance, "--out", str(run / name),
        "--quiet")
    return json.loads((run / name / "report.json").read_text())


def curve(arm: str, args: argparse.Namespace) -> None:
    """One fit of ``arm`` (seed 0) for the largest of ``--curve-steps``, checkpointed at each, every checkpoint
    evaluated: quality against training steps and CPU minutes (``curve.csv``, ``curve.png``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    marks = sorted(args.curve_steps)
    every = marks[0]
    if any(m % every for m in marks):
        sys.exit(f"--curve-steps {marks}: each must be a multiple of the first")
    keep = ["--trainer.callbacks+=pytorch_lightning.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.every_n_train_steps={every}", "--trainer.callbacks.save_top_k=-1",
            "--trainer.callbacks.filename=at-{step}"]
    run, seconds = fit(arm, 0, args, steps=marks[-1], version="curve", extra_args=tuple(keep))
    rows = []
    for m in marks:
        report = evaluate(run, args, ckpt=run / "checkpoints" / f"at-step={m}.ckpt", name=f"eval-{m}")
        for r in report["results"]:
            rows.append({"steps": m, "cpu_min": round(seconds / 60 * m / marks[-1], 2), "cfg": f"{r['settings']['cfg']:g}",
                         **{k: r["metrics"].get(k, float("nan")) for k in METRICS}})
    with open(args.out / f"curve-{arm}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    shown = ["compositional/color", "compositional/shape", "compositional/count", "fd_clip"]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.4))
    for ax, k in zip(axes, shown):
        for j, cfg in enumerate(sorted({r["cfg"] for r in rows}, key=float)):
            pts = [(r["steps"], r[k]) for r in rows if r["cfg"] == cfg]
            ax.plot(*zip(*pts), marker="o", color=f"C{j}", label=f"cfg {cfg}")
        ax.set_xscale("log")
        ax.set_xlabel(f"training steps ({seconds / 60:.1f} CPU min for {marks[-1]})")
        ax.set_title(k.split("/")[-1] + (" (lower is better)" if k == "fd_clip" else ""))
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{arm}: quality against training steps (seed 0, {args.eval_n} captions)")
    fig.tight_layout()
    fig.savefig(args.out / f"curve-{arm}.png", dpi=100)
    plt.close(fig)
    print((args.out / f"curve-{arm}.csv").read_text())


def done(path: Path) -> set[tuple[str, int]]:
    if not path.is_file():
        return set()
    return {(r["arm"], int(r["seed"])) for r in csv.DictReader(open(path))}


def summarise(path: Path, out: Path, args: argparse.Namespace) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(path)))
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    cfgs = sorted({r["cfg"] for r in rows}, key=float)
    lines = [f"{args.steps} steps at the arm's batch size, `ldm eval` on {args.eval_n} validation captions, 20 sampler "
             "steps; each cell: mean of the seeds (the seeds' values).", ""]
    for cfg in cfgs:
        lines += [f"**guidance {cfg}**", "", "| arm | fit s | " + " | ".join(m.split("/")[-1] for m in METRICS) + " |",
                  "|---" * (len(METRICS) + 2) + "|"]
        for arm in arms:
            sel = [r for r in rows if r["arm"] == arm and r["cfg"] == cfg]
            cells = [f"{statistics.mean(float(r['fit_s']) for r in sel):.0f}"]
            for m in METRICS:
                vals = [float(r[m]) for r in sel]
                cells.append(f"{statistics.mean(vals):.3f} ({', '.join(f'{v:.3f}' for v in vals)})")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Arms:", ""] + [f"- `{a}`: {ARMS[a][0]}" for a in arms]
    (out / "study.md").write_text("\n".join(lines) + "\n")

    shown = ["compositional/color", "compositional/shape", "compositional/count", "fd_clip"]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.6))
    for ax, m in zip(axes, shown):
        for j, cfg in enumerate(cfgs):
            for i, arm in enumerate(arms):
                vals = [float(r[m]) for r in rows if r["arm"] == arm and r["cfg"] == cfg]
                x = i + (j - (len(cfgs) - 1) / 2) * 0.35
                ax.bar(x, statistics.mean(vals), width=0.33, color=f"C{j}", label=f"cfg {cfg}" if i == 0 else None)
                ax.plot([x] * len(vals), vals, "k.", markersize=4)
        ax.set_xticks(range(len(arms)), arms, rotation=60, ha="right", fontsize=7)
        ax.set_title(m.split("/")[-1] + (" (lower is better)" if m == "fd_clip" else ""))
    axes[0].legend(fontsize=7)
    fig.suptitle(f"shapes recipe study: {args.steps} steps each, dots = seeds")
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", type=Path, default=REPO / "runs/demo", help="a finished make demo folder")
    p.add_argument("--out", type=Path, default=REPO / "runs/study")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--eval-n", type=int, default=64)
    p.add_argument("--guidance", default="3,5", help="guidance scales of ldm eval's sweep")
    p.add_argument("--curve", choices=list(ARMS), help="instead of the study: one longer fit of this arm, evaluated "
                   "at each of --curve-steps (quality against CPU minutes)")
    p.add_argument("--curve-steps", type=int, nargs="+", default=[250, 500, 1000, 2000])
    args = p.parse_args()
    args.demo, args.out = args.demo.resolve(), args.out.resolve()
    for need in ("latents", "autoencoder/demo", "clip/demo", "shards"):
        if not (args.demo / need).exists():
            sys.exit(f"{args.demo / need} is missing: run make demo first (the study uses its data, autoencoder and CLIP)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.curve:
        return curve(args.curve, args)
    results = args.out / "results.csv"
    for seed in args.seeds:
        for arm in args.arms:
            if (arm, seed) in done(results):
                continue
            print(f"[study] {arm} seed {seed}: {ARMS[arm][0]}", flush=True)
            run, seconds = fit_diffusers(arm, seed, args) if arm in DIFFUSERS_ARMS else fit(arm, seed, args)
            report = evaluate(run, args)
            new = not results.is_file()
            with open(results, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["arm", "seed", "steps", "fit_s", "cfg", *METRICS])
                for r in report["results"]:
                    w.writerow([arm, seed, arm_steps(arm, args), f"{seconds:.1f}", f"{r['settings']['cfg']:g}",
                                *[f"{r['metrics'].get(m, float('nan')):.4f}" for m in METRICS]])
            summarise(results, args.out, args)
    summarise(results, args.out, args)
    print((args.out / "study.md").read_text())


if __name__ == "__main__":
    main()
