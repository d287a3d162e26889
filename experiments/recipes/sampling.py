"""Sampling study (issue 16): what the sampler, its step count, the guidance scale and the EMA buy on trained models.

    python experiments/recipes/sampling.py --runs runs/study-budget/unet-flow/seed0 runs/study-budget/unet-flow/seed1
        [--demo runs/demo] [--out runs/study-budget/sampling] [--eval-n 64]

No training: every setting is one ``ldm eval`` of the same runs on the first ``--eval-n`` validation captions of the
demo (the same captions and the same starting noise per image for every setting), scored by FD-CLIP, CLIP score and the
compositional checker. The settings (``SETTINGS``): Euler at 5 / 10 / 20 / 50 steps, Heun at 10 steps (19 network
evaluations), DPM-Solver++(2M) at 20, the raw (not EMA) weights at Euler 20, each at guidance 3 (the demo's), and
Euler 20 at guidance 1 / 2 / 3 / 5 / 7. Each eval's wall time is recorded. Writes ``sampling.csv``, ``sampling.md``
(the mean of the runs, then each run's value) and ``sampling.png`` (quality against steps and against guidance).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from study import METRICS, REPO, ldm  # noqa: E402

#: name -> ldm eval arguments
SETTINGS: dict[str, list[str]] = {
    "euler-5": ["--sampler", "euler", "--steps", "5", "--guidance-sweep", "3"],
    "euler-10": ["--sampler", "euler", "--steps", "10", "--guidance-sweep", "3"],
    "euler-20": ["--sampler", "euler", "--steps", "20", "--guidance-sweep", "1,2,3,5,7"],
    "euler-50": ["--sampler", "euler", "--steps", "50", "--guidance-sweep", "3"],
    "heun-10": ["--sampler", "heun", "--steps", "10", "--guidance-sweep", "3"],
    "dpmpp_2m-20": ["--sampler", "dpmpp_2m", "--steps", "20", "--guidance-sweep", "3"],
    "euler-20-raw": ["--sampler", "euler", "--steps", "20", "--guidance-sweep", "3", "--weights", "raw"],
}
#: network evaluations per image and guidance branch of each sampler at n steps
NFE = {"euler": lambda n: n, "heun": lambda n: 2 * n - 1, "dpmpp_2m": lambda n: n}


def run_settings(runs: list[Path], args: argparse.Namespace) -> list[dict]:
    rows, done = [], set()
    table = args.out / "sampling.csv"
    if table.is_file():
        rows = list(csv.DictReader(open(table)))
        done = {(r["run"], r["setting"]) for r in rows}
    for run in runs:
        for name, extra in SETTINGS.items():
            if (str(run), name) in done:
                continue
            out = args.out / run.parent.name / run.name / name
            start = time.perf_counter()
            ldm("eval", "--ckpt", str(run), "--shards", f"{args.demo}/shards/val-*.tar", "--num-images",
                str(args.eval_n), *extra, "--out", str(out), "--quiet")
            seconds = time.perf_counter() - start
            report = json.loads((out / "report.json").read_text())
            for r in report["results"]:
                s = r["settings"]
                rows.append({"run": str(run), "setting": name, "sampler": s["sampler"], "steps": s["steps"],
                             "nfe": NFE[s["sampler"]](s["steps"]), "weights": report["weights"],
                             "cfg": f"{s['cfg']:g}", "eval_s": f"{seconds:.1f}",
                             **{m: f"{r['metrics'].get(m, float('nan')):.4f}" for m in METRICS}})
            with open(table, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    return rows


def summarise(rows: list[dict], args: argparse.Namespace) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted({r["run"] for r in rows})
    keys = sorted({(r["setting"], r["cfg"]) for r in rows},
                  key=lambda k: (list(SETTINGS).index(k[0]), float(k[1])))
    lines = [f"`ldm eval` of {', '.join(f'`{Path(r).parent.name}/{Path(r).name}`' for r in runs)} on {args.eval_n} "
             "validation captions; each cell: the mean of the runs (each run's value).", "",
             "| setting | weights | guidance | NFE per image | eval s | " + " | ".join(m.split("/")[-1] for m in METRICS)
             + " |", "|---" * (len(METRICS) + 5) + "|"]
    for setting, cfg in keys:
        sel = [r for r in rows if r["setting"] == setting and r["cfg"] == cfg]
        nfe = int(sel[0]["nfe"]) * (2 if float(cfg) != 1 else 1)
        cells = [sel[0]["weights"], cfg, str(nfe), f"{statistics.mean(float(r['eval_s']) for r in sel):.0f}"]
        for m in METRICS:
            vals = [float(r[m]) for r in sel]
            cells.append(f"{statistics.mean(vals):.3f} ({', '.join(f'{v:.3f}' for v in vals)})")
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    (args.out / "sampling.md").write_text("\n".join(lines) + "\n")

    shown = ["compositional/color", "compositional/shape", "compositional/count", "fd_clip"]
    fig, axes = plt.subplots(2, len(shown), figsize=(4 * len(shown), 6.4))
    euler = [(int(r["steps"]), r) for r in rows if r["sampler"] == "euler" and r["weights"] == "ema" and r["cfg"] == "3"]
    guided = [(float(r["cfg"]), r) for r in rows if r["setting"] == "euler-20"]
    for col, m in enumerate(shown):
        for ax, pts, xlabel in ((axes[0, col], euler, "Euler steps (guidance 3)"),
                                (axes[1, col], guided, "guidance scale (Euler, 20 steps)")):
            xs = sorted({x for x, _ in pts})
            for i, run in enumerate(runs):
                ax.plot(xs, [next(float(r[m]) for x2, r in pts if x2 == x and r["run"] == run) for x in xs],
                        marker="o", color=f"C{i}", label=f"{Path(run).parent.name}/{Path(run).name}")
            ax.set_xlabel(xlabel)
            ax.set_title(m.split("/")[-1] + (" (lower is better)" if m == "fd_clip" else ""))
        axes[0, col].set_xscale("log")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"sampling study: {args.eval_n} validation captions")
    fig.tight_layout()
    fig.savefig(args.out / "sampling.png", dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="trained latent-diffusion run folders")
    p.add_argument("--demo", type=Path, default=REPO / "runs/demo", help="the make demo folder whose shards to use")
    p.add_argument("--out", type=Path, default=REPO / "runs/study-budget/sampling")
    p.add_argument("--eval-n", type=int, default=64)
    args = p.parse_args()
    args.demo, args.out = args.demo.resolve(), args.out.resolve()
    runs = [r.resolve() for r in args.runs]
    for run in runs:
        if not (run / "checkpoints").is_dir():
            sys.exit(f"{run}: not a run folder with checkpoints/ (train it first, e.g. with study.py)")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run_settings(runs, args)
    summarise(rows, args)
    print((args.out / "sampling.md").read_text())


if __name__ == "__main__":
    main()
