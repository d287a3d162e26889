"""Run directories and loggers: ``runs/<experiment>/<version>/`` with CSV metrics and W&B files.

Every ``ldm fit|validate|test`` writes into one folder::

    runs/<name>/<version>/
        config.yaml          the fully resolved config (LightningCLI)
        metrics.csv          CSVLogger
        hparams.yaml
        checkpoints/         ModelCheckpoint
        wandb/               W&B run files (offline runs are uploaded later with `wandb sync`)

The version is ``version_<N>`` (the next free number), or ``slurm_<jobid>`` under
SLURM so that a requeued job resumes into the same folder and all ranks agree.
Rank 0 hands its choice to the processes it spawns through ``LDM_RUN_VERSION``.

W&B mode: ``WANDB_MODE`` from the environment wins; else ``run.wandb_mode``; with
``auto`` (the default) runs are online when an API key is configured
(``WANDB_API_KEY`` or ``wandb login``) and offline otherwise.
"""

from __future__ import annotations

import csv
import logging
import netrc
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import DummyExperiment, rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger("ldm")

VERSION_ENV = "LDM_RUN_VERSION"
WandbMode = Literal["auto", "online", "offline", "disabled"]


@dataclass
class RunSettings:
    """Where a run writes and how it is grouped in Weights & Biases.

    Args:
        name: experiment name: the folder ``<root>/<name>/`` and the default W&B group
            (default: the model class in snake case).
        version: sub-folder of this run (default: ``slurm_<jobid>`` under SLURM, else ``version_<N>``).
        root: folder holding all experiments.
        project: W&B project.
        entity: W&B entity (team or user); default: the account's default.
        group: W&B group (default: ``name``), so runs of one experiment sit together.
        tags: W&B tags.
        notes: W&B notes.
        wandb_mode: ``auto`` (online with credentials, offline without), ``online``, ``offline``
            or ``disabled``. ``WANDB_MODE`` in the environment overrides it.
        csv: also log metrics to ``metrics.csv`` in the run folder.
        checkpoint_minutes: ``ldm fit`` also writes ``checkpoints/last.ckpt`` every this many minutes of
            training (bounding what a job killed without warning loses); ``null``: only at validation.
    """

    name: str | None = None
    version: str | None = None
    root: str = "runs"
    project: str = "ldm"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    wandb_mode: WandbMode = "auto"
    csv: bool = True
    checkpoint_minutes: float | None = 30.0


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv``; a resumed run must append to it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class RunCSVLogger(CSVLogger):
    """CSVLogger that keeps the metrics of earlier attempts (SLURM requeue, ``ckpt_path`` resume)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class RunWandbLogger(WandbLogger):
    """WandbLogger that starts the W&B run when training (or evaluation) starts, not at setup.

    Lightning creates the W&B run in its setup hook and logs hyperparameters (our config saver the
    resolved config) before training, so a start that then fails (a missing checkpoint, a bad learning
    rate) would leave a W&B run behind. Until :meth:`allow_start` (called by ``ldm fit`` at the first
    training batch, or the first validation / test batch of ``ldm validate|test``) or the first logged
    metrics, ``experiment`` is a no-op stand-in and the hyperparameters and config are queued.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._pending: list[tuple[str, Any]] = []
        self._may_start = False

    def allow_start(self) -> None:
        self._may_start = True

    @property
    def experiment(self) -> Any:
        if not self._may_start and self._experiment is None:
            return DummyExperiment()
        starting = self._experiment is None
        experiment = WandbLogger.experiment.fget(self)  # rank-zero only: a dummy on other ranks
        if starting and self._experiment is not None:
            pending, self._pending = self._pending, []
            for kind, value in pending:
                if kind == "hparams":
                    super().log_hyperparams(value)
                else:
                    experiment.config.update(value, allow_val_change=True)
        return experiment

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if self._experiment is None:
            self._pending.append(("hparams", params))
        else:
            super().log_hyperparams(params)

    @rank_zero_only
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        self._may_start = True
        super().log_metrics(metrics, step)

    @rank_zero_only
    def update_config(self, config: dict[str, Any]) -> None:
        """Put the resolved config into the W&B run's config (now, or when the run starts)."""
        if self._experiment is None:
            self._pending.append(("config", config))
        else:
            self.experiment.config.update(config, allow_val_change=True)


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _next_version(folder: Path) -> str:
    numbers = [int(m.group(1)) for p in folder.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return f"version_{max(numbers) + 1 if numbers else 0}"


def slurm_job_id() -> str | None:
    """This SLURM job's id as ``scontrol`` takes it: ``<array job>_<task>`` in a job array, else the job id."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


def resolve_version(root: str | os.PathLike, name: str, version: str | None) -> str:
    if version:
        return version
    if os.environ.get(VERSION_ENV):
        return os.environ[VERSION_ENV]
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm_{job}" + (f"_{task}" if task and os.environ.get("SLURM_ARRAY_JOB_ID") else "")
    return _next_version(Path(root) / name)


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(configured: WandbMode) -> str:
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    if configured != "auto":
        return configured
    return "online" if has_wandb_credentials() else "offline"


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (from the launcher's environment: torchrun, Lightning, srun)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "0") != "0":
            return False
    return True


_announced: set[str] = set()


def build_loggers(run: RunSettings, name: str, version: str) -> list[Logger]:
    """CSV first (it defines ``trainer.log_dir`` and so the checkpoint and config folder), then W&B."""
    run_dir = Path(run.root) / name / version
    loggers: list[Logger] = []
    if run.csv:
        loggers.append(RunCSVLogger(save_dir=run.root, name=name, version=version))
    mode = resolve_wandb_mode(run.wandb_mode)
    if mode != "disabled":
        if is_rank_zero():
            run_dir.mkdir(parents=True, exist_ok=True)
        if mode == "offline" and str(run_dir) not in _announced and is_rank_zero():
            _announced.add(str(run_dir))
            log.warning(
                "W&B is logging offline (no API key found, or WANDB_MODE=offline) to %s/wandb. "
                "Upload later with: wandb sync %s/wandb/offline-run-*", run_dir, run_dir,
            )
        loggers.append(RunWandbLogger(
            project=run.project, name=f"{name}/{version}", group=run.group or name, tags=list(run.tags) or None,
            notes=run.notes, entity=run.entity, save_dir=str(run_dir), offline=mode == "offline",
            mode=mode, id=_wandb_id(run_dir), resume="allow", log_model=False,
        ))
    if not loggers:
        log.warning("run.csv is false and W&B is disabled: this run logs no metrics")
    return loggers


def _wandb_id(run_dir: Path) -> str | None:
    """A W&B run id kept in the run folder, so a requeued job continues the same W&B run."""
    if not is_rank_zero():
        return None
    path = run_dir / "wandb_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(6)
    path.write_text(run_id + "\n")
    return run_id
