"""``ldm eval``'s report in Weights & Biases: a ``job_type=eval`` run beside the run it evaluated.

The eval run sits in the evaluated run's project and group (so a recipe's four stages and their evaluations are
one experiment), records the evaluated checkpoint as its input artifact (the lineage edge run -> model -> eval), and
holds: the metrics of the report's main guidance scale as its summary (``eval/fid``, ``eval/clip_score``, ...), the
guidance sweep as a table (``eval/guidance_sweep``, one row per scale) and as the report's plot, the sample grid,
and the report files themselves as an ``eval_report`` artifact. Its mode follows the evaluated run: the
``run.wandb_mode`` of its config (``WANDB_MODE`` in the environment wins), so an evaluation logs where its training
logged; offline runs are written under ``<out>/wandb`` for ``wandb sync``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def eval_wandb_mode(run_config: dict[str, Any], requested: str = "auto") -> str:
    """``requested`` (``ldm eval --wandb``) unless ``auto``; then as the evaluated run logged: its ``run.wandb_mode``,
    resolved as ``ldm fit`` resolves it (``WANDB_MODE`` / ``WANDB_DISABLED`` win, credentials pick online)."""
    from ldm.runs import resolve_wandb_mode

    if requested != "auto":
        return requested
    return resolve_wandb_mode((run_config.get("run") or {}).get("wandb_mode") or "auto")


def log_eval_report(out: Path, record: dict[str, Any], run_config: dict[str, Any], mode: str) -> Path | None:
    """Log the report written to ``out`` (``record`` = report.json's content) as a ``job_type=eval`` W&B run;
    returns the offline run folder (or None online / disabled)."""
    if mode == "disabled":
        return None
    import wandb

    from ldm.runs import input_artifact, use_artifact

    run = run_config.get("run") or {}
    checkpoint = Path(record["checkpoint"])
    evaluated = checkpoint.parent.parent  # <root>/<name>/<version>/checkpoints/<file>
    name = run.get("name") or evaluated.parent.name
    settings = record["results"][0]["settings"]
    config = {k: v for k, v in record.items() if k != "results"} | {
        "sampler": settings.get("sampler"), "steps": settings.get("steps"), "seed": settings.get("seed"),
        "guidance_scales": [r["settings"]["cfg"] for r in record["results"]]}
    (out / "wandb").mkdir(parents=True, exist_ok=True)
    experiment = wandb.init(project=run.get("project") or "ldm", entity=run.get("entity"),
                            group=run.get("group") or name, job_type="eval", name=f"{name}/{evaluated.name}/eval",
                            config=config, dir=str(out), mode=mode, reinit="create_new")
    try:
        artifact = input_artifact(checkpoint)
        if artifact is not None:
            use_artifact(experiment, artifact)
        main = next(r for r in record["results"] if r["settings"]["cfg"] == record["grid_cfg"])
        for key, value in main["metrics"].items():
            experiment.summary[f"eval/{key}"] = value
        keys = sorted({k for r in record["results"] for k in r["metrics"]})
        table = wandb.Table(columns=["guidance_scale", *keys],
                            data=[[r["settings"]["cfg"], *[r["metrics"].get(k) for k in keys]] for r in record["results"]])
        images = {"eval/samples": wandb.Image(str(out / "samples.png"), caption=f"guidance {record['grid_cfg']:g}")}
        if (out / "cfg_sweep.png").is_file():
            images["eval/guidance_sweep_plot"] = wandb.Image(str(out / "cfg_sweep.png"))
        experiment.log({"eval/guidance_sweep": table, **images})
        report = wandb.Artifact(f"eval-report-{experiment.id}", type="eval_report", metadata=main["metrics"])
        for file in ("report.json", "report.md", "report.html", "samples.png", "cfg_sweep.png"):
            if (out / file).is_file():
                report.add_file(str(out / file))
        experiment.log_artifact(report)
    finally:
        experiment.finish()
    if mode == "offline":
        folders = sorted((out / "wandb").glob("offline-run-*"), key=os.path.getmtime)
        if folders:
            log.warning("W&B eval run logged offline to %s; upload with: wandb sync %s", folders[-1], folders[-1])
            return folders[-1]
    return None
