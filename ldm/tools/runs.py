"""``ldm runs compare``: compare run folders offline, from their config.yaml and metrics.csv.

    ldm runs compare runs/<experiment>/* [--metrics val/loss,eval/fid] [--out DIR]

Prints (and writes to ``DIR/compare.md``) a table with, per run, the final and the best value
of each metric and the config keys whose values differ between the runs, and writes
``DIR/compare.png`` with the metrics over steps, one panel per metric, one line per run, and
``DIR/dashboard.html``: one self-contained page (curves of any metric, the final table, the differing
config keys, the runs' newest sample grids side by side; :mod:`ldm.tools.dashboard`) for people without W&B.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ldm.tools.dashboard import write_dashboard
from ldm.tools.options import ToolParser

#: metrics where lower is better; every other metric is taken as higher-is-better
LOWER_IS_BETTER = ("loss", "fid", "kid", "fd_clip", "rec", "lpips", "kl", "rfid", "skipped")
IGNORED_KEYS = ("run.version", "trainer.logger", "ckpt_path")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts / lists -> {dotted.key: leaf value}."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list) and any(isinstance(v, (dict, list)) for v in tree):
        out = {}
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def read_metrics(run: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from a run's metrics.csv (empty cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    path = run / "metrics.csv"
    if not path.is_file():
        return series
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                try:
                    series.setdefault(key, []).append((step, float(value)))
                except ValueError:
                    continue
    return series


def lower_is_better(metric: str) -> bool:
    leaf = metric.rsplit("/", 1)[-1].lower()
    return any(leaf.startswith(k) or leaf.endswith(k) for k in LOWER_IS_BETTER)


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    keys = sorted(set().union(*configs))
    return [k for k in keys if not k.startswith(IGNORED_KEYS) and len({repr(c.get(k)) for c in configs}) > 1]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def compare(runs: list[Path], metrics: list[str] | None, out: Path) -> str:
    runs = [r for r in runs if (r / "config.yaml").is_file() or (r / "metrics.csv").is_file()]
    if len(runs) < 1:
        raise ValueError("no run folders (with config.yaml or metrics.csv) among the paths given")
    configs = [flatten(yaml.safe_load((r / "config.yaml").read_text()) or {}) if (r / "config.yaml").is_file() else {}
               for r in runs]
    series = [read_metrics(r) for r in runs]
    if metrics is None:  # what every run logged at validation / evaluation
        common = set.intersection(*(set(s) for s in series)) if series else set()
        metrics = sorted(m for m in common if m.startswith(("val/", "eval/")))
    missing = [m for m in metrics if not any(m in s for s in series)]
    if missing:
        raise ValueError(f"no run logged {', '.join(missing)}; logged: {', '.join(sorted(set().union(*series)))}")
    diff = differing_keys(configs)
    names = [str(r) for r in runs]
    header = ["run"] + [f"{m} (final / best)" for m in metrics] + diff
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, s, cfg in zip(names, series, configs, strict=True):
        cells = [name]
        for m in metrics:
            values = [v for _, v in s.get(m, [])]
            finite = [v for v in values if math.isfinite(v)]  # a NaN must not decide min / max
            if not values:
                cells.append("")
                continue
            best = (min(finite) if lower_is_better(m) else max(finite)) if finite else math.nan
            cells.append(f"{_fmt(values[-1])} / {_fmt(best)}")
        cells += [_fmt(cfg.get(k)) for k in diff]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    _plot(out / "compare.png", names, series, metrics)
    write_dashboard(out / "dashboard.html", runs, series, configs, diff, metrics, lower_is_better)
    note = f"Config keys that differ: {', '.join(diff) if diff else 'none'}."
    (out / "compare.md").write_text(f"# Run comparison\n\n{table}\n\n{note}\n\n![metrics](compare.png)\n\n"
                                   "Curves of every metric, sample grids: [dashboard.html](dashboard.html)\n")
    return table + "\n\n" + note


def _plot(path: Path, names: list[str], series: list[dict], metrics: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, max(1, len(metrics)))
    rows = math.ceil(max(1, len(metrics)) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.3 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for name, s in zip(names, series, strict=True):
            points = s.get(metric, [])
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=name)
        ax.set_title(metric)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parser() -> ToolParser:
    p = ToolParser(prog="ldm runs", description="Work with run folders offline.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{compare}")
    c = sub.add_parser("compare", help="final / best metrics, differing config keys, metric plots and an HTML "
                       "dashboard of runs")
    c.add_argument("runs", nargs="+", help="run folders, e.g. runs/ldm-debug/*")
    c.add_argument("--metrics", help="comma-separated metrics (default: every val/ and eval/ metric all runs logged)")
    c.add_argument("--out", help="folder for compare.md, compare.png and dashboard.html "
                   "(default: <parent of the first run>/compare)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    runs = [Path(r) for r in args.runs if Path(r).is_dir()]
    try:
        if not runs:
            raise ValueError(f"none of {' '.join(args.runs)} is a folder")
        common = Path(*Path(runs[0]).resolve().parts[: len(Path(runs[0]).resolve().parts) - 1])
        out = Path(args.out) if args.out else common / "compare"
        metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
        print(compare(runs, metrics, out))
        print(f"\nwrote {out / 'compare.md'}, {out / 'compare.png'} and {out / 'dashboard.html'}")
    except ValueError as e:
        print(f"ldm runs compare: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
