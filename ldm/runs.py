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

W&B as the dashboard (docs/runs.md): a run's ``job_type`` is its stage (:func:`stage_of`), its ``group`` the
recipe (``ldm submit --recipe`` passes ``--run.group``) or else ``run.name``. :class:`RunWandbLogger` logs the
resolved config as a ``config`` artifact, the checkpoints as ``model`` artifacts (``run.log_checkpoints``), the
checkpoints of the runs this run loads as its input artifacts (lineage), and min / max summaries of the
validation metrics (:data:`SUMMARIES`).
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
CheckpointPolicy = Literal["last", "best", "none"]

#: W&B summaries of the metrics runs are compared by: the best value, not the last one
SUMMARIES: dict[str, str] = {
    "val/loss": "min", "val/rec": "min", "val/rfid": "min",          # every stage / the autoencoder
    "eval/fid": "min", "eval/fd_clip": "min",                         # GenerationEvalCallback
    "val/i2t_R@1": "max", "val/t2i_R@1": "max",                       # contrastive retrieval
    "val/r1_prior": "max", "val/r1_text": "max",                      # the prior's retrieval of the true image
}


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
        log_checkpoints: which checkpoint ``ldm fit`` logs to W&B as a ``model`` artifact when it ends: ``last``
            (``checkpoints/last.ckpt``, alias ``latest``), ``best`` (the best by the stage's validation metric,
            aliases ``best`` and ``latest``) or ``none``.
        inputs: run folders (or checkpoints) this run builds on besides those its model config names (e.g. the
            CLIP whose embeddings a prior trains on; ``ldm submit --recipe`` fills it in): W&B input artifacts.
        monitors: add Lightning's ``LearningRateMonitor`` and a ``ThroughputMonitor`` (samples/s) to every run.
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
    log_checkpoints: CheckpointPolicy = "last"
    inputs: list[str] = field(default_factory=list)
    monitors: bool = True


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
    """WandbLogger that starts the W&B run when training (or evaluation) starts, not at setup, and records the
    run's artifacts and lineage.

    Lightning creates the W&B run in its setup hook and logs hyperparameters (our config saver the
    resolved config) before training, so a start that then fails (a missing checkpoint, a bad learning
    rate) would leave a W&B run behind. Until :meth:`allow_start` (called by ``ldm fit`` at the first
    training batch, or the first validation / test batch of ``ldm validate|test``) or the first logged
    metrics, ``experiment`` is a no-op stand-in and the hyperparameters, config, config artifact and input
    artifacts are queued.

    Artifacts: :meth:`log_config_file` (type ``config``, named ``config-<run id>``), :meth:`log_checkpoint` (type
    ``model``, named ``model-<run id>`` as Lightning's ``log_model`` names them, one entry ``model.ckpt``) and
    :meth:`use_runs`: the checkpoint each named run folder resolves to, as an input of this run under that run's
    artifact name, so W&B draws the lineage (see :func:`input_artifact`). When the run starts the metrics of
    :data:`SUMMARIES` get their min / max summaries.
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
            define_summaries(experiment)
            pending, self._pending = self._pending, []
            for kind, value in pending:
                self._send(experiment, kind, value)
        return experiment

    def _send(self, experiment: Any, kind: str, value: Any) -> None:
        if kind == "hparams":
            super().log_hyperparams(value)
        elif kind == "config":
            experiment.config.update(value, allow_val_change=True)
        elif kind == "config_file":
            artifact = _wandb().Artifact(f"config-{experiment.id}", type="config")
            artifact.add_file(str(value), name="config.yaml")
            experiment.log_artifact(artifact, aliases=["latest"])
        elif kind == "input":
            artifact = input_artifact(value)
            if artifact is not None:
                use_artifact(experiment, artifact)

    def _queue_or_send(self, kind: str, value: Any) -> None:
        if self._experiment is None:
            self._pending.append((kind, value))
        else:
            self._send(self._experiment, kind, value)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        self._queue_or_send("hparams", params)

    @rank_zero_only
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        self._may_start = True
        super().log_metrics(metrics, step)

    @rank_zero_only
    def update_config(self, config: dict[str, Any]) -> None:
        """Put the resolved config into the W&B run's config (now, or when the run starts)."""
        self._queue_or_send("config", config)

    @rank_zero_only
    def log_config_file(self, path: str | os.PathLike) -> None:
        """Log the run's resolved ``config.yaml`` as an artifact of type ``config`` (now, or when the run starts)."""
        self._queue_or_send("config_file", Path(path))

    @rank_zero_only
    def use_runs(self, paths: list[str | os.PathLike]) -> None:
        """Record the checkpoints of these run folders (or checkpoint files) as this run's input artifacts."""
        for path in dict.fromkeys(str(p) for p in paths):
            self._queue_or_send("input", path)

    @rank_zero_only
    def log_checkpoint(self, path: str | os.PathLike, aliases: list[str], metadata: dict[str, Any] | None = None
                       ) -> None:
        """Log one checkpoint as a ``model`` artifact. The file is uploaded from the run folder (not copied to
        W&B's staging folder first): an offline run's checkpoint must still be there at ``wandb sync``."""
        if not self._may_start:  # the run never started: nothing was trained
            return
        experiment = self.experiment
        artifact = _wandb().Artifact(f"model-{experiment.id}", type="model", metadata=metadata or {})
        artifact.add_file(str(path), name=CHECKPOINT_ENTRY, policy="immutable")
        experiment.log_artifact(artifact, aliases=aliases)

    @rank_zero_only
    def finish(self) -> None:
        """End the W&B run of a command that ran (started first if nothing was logged yet: a short run still records
        its config, artifacts and lineage), flushing its files."""
        if self._may_start:
            self.experiment.finish()


#: the name of the checkpoint inside a ``model`` artifact (Lightning's ``log_model`` uses the same)
CHECKPOINT_ENTRY = "model.ckpt"


def _wandb() -> Any:
    import wandb

    return wandb


def define_summaries(experiment: Any) -> None:
    """min / max summaries (:data:`SUMMARIES`) on the run, keeping Lightning's step axis for these metrics."""
    if getattr(experiment, "define_metric", None) is None:
        return
    for key, summary in SUMMARIES.items():
        experiment.define_metric(key, summary=summary, step_metric="trainer/global_step", step_sync=True)


def model_artifact_name(run_dir: str | os.PathLike) -> str:
    """The name of the ``model`` artifact a run folder's checkpoints are logged under: ``model-<W&B run id>``
    (the id in its ``wandb_id`` file), or ``model-<folder>`` for a run that had W&B disabled."""
    run_dir = Path(run_dir)
    id_file = run_dir / "wandb_id"
    if id_file.is_file() and id_file.read_text().strip():
        return f"model-{id_file.read_text().strip()}"
    return "model-" + re.sub(r"[^\w.-]+", "-", f"{run_dir.parent.name}-{run_dir.name}")


def input_artifact(path: str | os.PathLike) -> Any:
    """The checkpoint a run folder (or checkpoint file) resolves to, as a W&B reference artifact (``file://``)
    named as that run logged it (:func:`model_artifact_name`), or None when ``path`` holds no run.

    The reference's digest is the file's MD5, as is that of the uploaded file, so when this is the checkpoint the
    upstream run logged (``run.log_checkpoints: last`` and a downstream loading ``last.ckpt``: the default), W&B
    finds the same artifact version and draws the edge upstream run -> artifact -> this run."""
    from ldm.checkpoint_files import find_checkpoint, find_config

    try:
        ckpt = find_checkpoint(path).resolve()
        run_dir = find_config(ckpt).parent
    except (OSError, ValueError) as e:
        log.warning("W&B lineage: %s is not a run folder or checkpoint (%s); not recorded as an input", path, e)
        return None
    artifact = _wandb().Artifact(model_artifact_name(run_dir), type="model")
    artifact.add_reference(ckpt.as_uri(), name=CHECKPOINT_ENTRY)
    return artifact


def use_artifact(experiment: Any, artifact: Any) -> None:
    """``run.use_artifact(artifact)``, offline too. W&B refuses ``use_artifact`` offline; for a draft artifact it
    logs the artifact with ``use_after_commit`` (the artifact is committed, then used as the run's input), and that
    record is what an offline run keeps here, for ``wandb sync`` to replay."""
    if getattr(experiment, "offline", False):
        experiment._log_artifact(artifact, is_user_created=True, use_after_commit=True)
    else:
        experiment.use_artifact(artifact)


def checkpoint_to_log(policy: CheckpointPolicy, last: str | os.PathLike | None, best: str | os.PathLike | None
                      ) -> tuple[Path, list[str]] | None:
    """(the checkpoint to log, its aliases) under ``run.log_checkpoints``, or None.

    ``last``: ``last.ckpt`` (alias ``latest``); ``best``: the best checkpoint (aliases ``best``, ``latest``),
    ``last.ckpt`` for a stage without a validation metric; ``none``: nothing."""
    last = Path(last) if last and os.path.isfile(last) else None
    best = Path(best) if best and os.path.isfile(best) else None
    if policy == "none":
        return None
    if policy == "best" and best is not None:
        return best, ["best", "latest"]
    return (last, ["latest"]) if last is not None else None


#: keys of a config naming another run's checkpoint (the first stage, the text encoder, a CLIP, init_from)
_INPUT_KEY = re.compile(r"(^|_)checkpoint$|^init_from$")


def config_inputs(config: dict[str, Any]) -> list[str]:
    """The other runs a resolved config loads: string values of ``checkpoint`` / ``*_checkpoint`` /
    ``init_from`` keys under ``model`` and ``trainer.callbacks`` that exist on disk, then ``run.inputs``."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str) and _INPUT_KEY.search(str(key)) and os.path.exists(value):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(config.get("model"))
    walk((config.get("trainer") or {}).get("callbacks"))
    found += [str(p) for p in ((config.get("run") or {}).get("inputs") or [])]
    return list(dict.fromkeys(found))


def stage_of(model: Any) -> str:
    """The W&B ``job_type`` of a system: its ``stage`` (a class attribute; the snake-cased class name without
    one). A latent diffusion whose conditioner feeds a CLIP image embedding is unCLIP's ``decoder``."""
    stage = getattr(model, "stage", None) or snake_case(type(model).__name__)
    if stage == "latent_diffusion" and getattr(getattr(model, "conditioner", None), "vector", None) == "clip_image":
        return "decoder"
    return stage


def resolve_group(run: RunSettings, name: str) -> str:
    """The W&B group: ``run.group`` (the recipe, set by ``ldm submit --recipe``), else the experiment name."""
    return run.group or name


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


def build_loggers(run: RunSettings, name: str, version: str, job_type: str | None = None) -> list[Logger]:
    """CSV first (it defines ``trainer.log_dir`` and so the checkpoint and config folder), then W&B (its
    ``job_type`` the stage, :func:`stage_of`)."""
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
            project=run.project, name=f"{name}/{version}", group=resolve_group(run, name), job_type=job_type, tags=list(run.tags) or None,
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
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
        run_id = os.environ["WANDB_RUN_ID"]  # a run started by `wandb agent`: the sweep's id for it
        path.write_text(run_id + "\n")
        return run_id
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(6)
    path.write_text(run_id + "\n")
    return run_id
