"""``LDMCLI``: the LightningCLI behind ``ldm fit | validate | test`` (run folders, loggers, checkpoints).

Imported by :func:`ldm.cli.main` only when a Lightning subcommand runs, so that ``ldm --help`` and the tool
subcommands start without torch and Lightning; ``from ldm.cli import LDMCLI`` still works (a lazy export).
"""

from __future__ import annotations

import logging
import os
import shutil
from datetime import timedelta
from collections.abc import Sequence
from typing import Any

import yaml
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from pytorch_lightning.cli import (
    LightningArgumentParser,
    LightningCLI,
    SaveConfigCallback,
)
from pytorch_lightning.loggers import WandbLogger

from ldm.callbacks import DataSkipMonitor, StepSeed
from ldm.callbacks.divergence import DivergenceError, DivergenceGuard
from ldm.callbacks.folders import log_folder
from ldm.callbacks.metrics_file import MetricsFileLedger
from ldm.callbacks.preemption import Preemption
from ldm.callbacks.progress import LoggingStepProgressBar
from ldm.callbacks.speed import Speedups
from ldm.callbacks.throughput import SampleThroughput
from ldm.cli import DESCRIPTION, SUBCOMMANDS, _epilog, _formatter
from ldm.config_errors import describe_failure, summarize
from ldm.data.urls import ShardPattern
from ldm.runs import (
    VERSION_ENV,
    RunSettings,
    RunWandbLogger,
    build_loggers,
    checkpoint_to_log,
    config_inputs,
    is_rank_zero,
    resolve_version,
    slurm_job_id,
    snake_case,
    stage_of,
)



def model_tokenizer(model: Any) -> Any:
    """The tokenizer a model provides to the data module (``model.tokenizer``), or None."""
    return getattr(model, "tokenizer", None)


class ConfigSaver(SaveConfigCallback):
    """Saves ``config.yaml`` into the run folder and the same resolved config into W&B: as the run's config, as a
    ``config`` artifact, and the runs it loads (:func:`~ldm.runs.config_inputs`) as input artifacts."""

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            if isinstance(logger, RunWandbLogger):
                # all sent when the W&B run starts, at the first training batch or logged metrics
                logger.update_config(config)
                path = os.path.join(log_folder(trainer), self.config_filename)  # rank 0 only: no collective
                if os.path.isfile(path):
                    logger.log_config_file(path)
                logger.use_runs(config_inputs(config))
            elif isinstance(logger, WandbLogger):
                logger.experiment.config.update(config, allow_val_change=True)


class LDMArgumentParser(LightningArgumentParser):
    """Puts one ``dotted.key: problem`` line per error above jsonargparse's detailed report, and formats every
    help (also the ``--model.help CLASS`` parsers jsonargparse makes of this class) with :func:`ldm.cli._formatter`:
    long ``known subclasses`` lists shortened."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _formatter())
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        lines = summarize(str(message)) if self.exit_on_error else []  # nested parsers raise to the top one
        if lines:
            message = "invalid config:\n" + "\n".join(f"  {line}" for line in lines) + "\n\ndetails: " + str(message)
        return super().error(message, ex)


class LDMCLI(LightningCLI):
    """LightningCLI with run folders, default loggers and the model -> data tokenizer link."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any):
        kwargs.setdefault("parser_class", LDMArgumentParser)
        kwargs.setdefault("save_config_callback", ConfigSaver)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        import ldm.systems  # noqa: F401  (the systems by name: --model.help LatentDiffusion, class_path: LatentDiffusion)
        from ldm.checkpoints import AtomicCheckpointGuard

        # checkpoints written atomically and read with weights_only=True (ldm.checkpoints); the guard keeps that
        # when a config's trainer.plugins replaces the default list. StepSeed and DivergenceGuard make a run a
        # transaction: exact resume, no non-finite step or checkpoint. Preemption checkpoints at the current step on
        # SLURM's warning signal (and SIGTERM) and requeues; MetricsFileLedger keeps each step once in metrics.csv.
        kwargs.setdefault("trainer_defaults", {
            "callbacks": [DataSkipMonitor(), StepSeed(), DivergenceGuard(), AtomicCheckpointGuard(), Preemption(),
                          MetricsFileLedger()],
            "plugins": [{"class_path": "ldm.checkpoints.AtomicCheckpointIO"}]})
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION, "epilog": _epilog(),
                                            **{name: {"description": text} for name, text in SUBCOMMANDS.items()}})
        # every system takes its own optimizer and lr_scheduler (model.init_args.optimizer, ldm.systems.optim):
        # no second, top-level --optimizer / --lr_scheduler beside them
        kwargs.setdefault("auto_configure_optimizers", False)
        self._started = _TrainingStarted()
        self._created: str | None = None  # the first folder of the run's path that this start created
        try:
            super().__init__(args=args, run=run, **kwargs)
        except (SystemExit, KeyboardInterrupt, DivergenceError):
            raise
        except Exception as exn:
            if self._started.started:
                raise
            self._discard_failed_start()
            # raised as it is (in-process callers catch what they expect); main() prints this one line instead
            exn.ldm_start_failure = describe_failure(exn, self._plain_config())
            raise

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test (:data:`ldm.cli.SUBCOMMANDS`); no ``predict``: sampling is ``ldm sample``."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in SUBCOMMANDS}

    def _plain_config(self) -> dict:
        config = getattr(self, "config", None)
        if config is None:
            return {}
        section = config.get(self.subcommand) if getattr(self, "subcommand", None) else config
        try:
            return section.clone().as_dict() if section is not None else {}
        except Exception:  # a partly parsed config: name no key rather than fail while reporting
            return {}

    def _discard_failed_start(self) -> None:
        """A start that failed before its first training step leaves nothing behind: its run folder (with the
        W&B files, config and any checkpoint) is removed, unless it existed before (a resume)."""
        trainer = getattr(self, "trainer", None)
        for logger in (trainer.loggers if trainer is not None else []):
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger._experiment.finish(exit_code=2)
        if self._created and is_rank_zero() and os.path.isdir(self._created):
            shutil.rmtree(self._created, ignore_errors=True)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("formatter_class", _formatter())
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunSettings, "run")
        # GPU speed options (configs/trainer/gpu.yaml): a section of their own, so they compose with any stage config
        parser.add_class_arguments(Speedups, "speed")
        parser.set_defaults({"data": {"class_path": "ldm.data.ShardDataModule"}})
        parser.link_arguments("model", "data.init_args.tokenizer", compute_fn=model_tokenizer, apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Check what the types cannot: that local shard files named anywhere in the config exist."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        problems = []
        for key, value in config.items():
            if isinstance(value, ShardPattern):
                try:
                    value.check()
                except ValueError as e:
                    problems.append(f"  {key}: {e}")
        if problems:
            self.parser.error("invalid config:\n" + "\n".join(problems))

    def _run_settings(self) -> RunSettings:
        run = self._get(self.config_init, "run")
        return run if isinstance(run, RunSettings) else RunSettings(**dict(run or {}))

    def _speedups(self) -> Speedups:
        speed = self._get(self.config_init, "speed")
        return speed if isinstance(speed, Speedups) else Speedups(**dict(speed or {}))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("logger") in (None, True):
            run = self._run_settings()
            name = run.name or snake_case(type(self.model).__name__)
            version = resolve_version(run.root, name, run.version)
            os.environ[VERSION_ENV] = version  # processes spawned for DDP join the same folder
            self.run_dir = os.path.join(run.root, name, version)
            # decided once, by every rank, before rank 0 marks the folder at the first training step
            self._slurm_restart = slurm_restart(self.run_dir)
            self._started.run_dir = self.run_dir
            if self.subcommand == "fit" and is_rank_zero():
                self._refuse_foreign_run_folder()
            self._created = _first_missing(self.run_dir)
            kwargs["logger"] = build_loggers(run, name, version, job_type=stage_of(self.model))
            if trainer_cfg.get("default_root_dir") is None:
                # SLURM requeue checkpoints (hpc_ckpt_*.ckpt) go to, and are resumed from, the run folder
                kwargs["default_root_dir"] = self.run_dir
        strategy = ddp_strategy_for(self.model, trainer_cfg.get("strategy"))
        if strategy != trainer_cfg.get("strategy"):
            kwargs["strategy"] = strategy
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        configured = list(config.get("callbacks") or []) + list(callbacks)
        if config.get("enable_checkpointing", True) is not False:
            minutes = self._run_settings().checkpoint_minutes if self.subcommand in (None, "fit") else None
            mine = [c for c in configured if isinstance(c, ModelCheckpoint)]
            if not mine:
                callbacks = [*callbacks, *default_checkpointing(self.model, minutes)]
            elif minutes and not any(c._train_time_interval for c in mine):
                callbacks = [*callbacks, timed_checkpoint(minutes, mine[0].dirpath)]  # a preset's own checkpoints
        if self._run_settings().monitors and config.get("logger") not in (False, []):  # they log: need a logger
            callbacks = [*callbacks, *default_monitors(configured)]
        speed = self._speedups()
        if speed.active and not any(isinstance(c, Speedups) for c in configured):
            callbacks = [*callbacks, speed]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in configured):
            callbacks = [*callbacks, LoggingStepProgressBar()]  # reads the metrics on logging steps only
        # a default callback configured by the user (e.g. DivergenceGuard with another patience) replaces ours
        defaults = self.trainer_defaults.get("callbacks", [])
        kept = [d for d in defaults if not any(type(c) is type(d) for c in configured)]
        self.trainer_defaults["callbacks"] = kept
        try:
            return super()._instantiate_trainer(config, [*callbacks, self._started])
        finally:
            self.trainer_defaults["callbacks"] = defaults

    def _refuse_foreign_run_folder(self) -> None:
        """Two runs never share a folder (e.g. two ``ldm fit`` in one SLURM job): a folder that holds a run's
        config is only entered to resume it (``--ckpt_path``, or a SLURM requeue with its hpc checkpoint)."""
        if not os.path.isfile(os.path.join(self.run_dir, "config.yaml")):
            return
        if self.config[self.subcommand].get("ckpt_path") is not None:
            return
        if self._slurm_restart:
            return
        raise StartError(f"the run folder {self.run_dir} already holds another run (its config.yaml); resume it "
                         "with --ckpt_path, or start a new run with another --run.version or --run.name")

    def before_fit(self) -> None:
        """Pick the checkpoint to resume from when the run continues in its own folder: ``--ckpt_path=newest``,
        or a SLURM job starting again in its run folder (requeued after a preemption signal, a node failure or
        ``scontrol requeue``). Both take the newest complete checkpoint of the folder by training step (hpc,
        last, best or periodic), never Lightning's choice of the ``hpc_ckpt`` alone, which may be far older."""
        config = self.config_init[self.subcommand]
        run_dir = getattr(self, "run_dir", None) or self.trainer.default_root_dir
        asked = config.get("ckpt_path")
        if asked == "newest" or (asked is None and getattr(self, "_slurm_restart", False)):
            from ldm.checkpoints import newest_checkpoint

            newest = newest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
            if newest is None and asked == "newest":
                raise StartError(f"--ckpt_path=newest: the run folder {run_dir} holds no complete checkpoint")
            if newest is not None:
                logging.getLogger("ldm").warning("resuming from %s, the newest complete checkpoint of %s", newest,
                                                 run_dir)
            config["ckpt_path"] = str(newest) if newest is not None else None

    def after_fit(self) -> None:
        """Write ``checkpoints/last.ckpt`` with the weights of the last step. Lightning's default checkpoint
        is written at epoch and validation ends, so a run stopped by ``max_steps`` mid-epoch would otherwise
        leave ``ldm sample`` / ``load_system`` (which prefer ``last.ckpt``) an older checkpoint."""
        trainer = self.trainer
        callback = trainer.checkpoint_callback
        if callback is None or trainer.global_step == 0:  # checkpointing off, or nothing trained
            return
        folder = getattr(callback, "dirpath", None) or os.path.join(getattr(self, "run_dir", trainer.default_root_dir),
                                                                    "checkpoints")
        last = os.path.join(folder, "last.ckpt")
        trainer.save_checkpoint(last, weights_only=False)
        self._log_checkpoint_artifact(callback, last)

    def _log_checkpoint_artifact(self, callback: Any, last: str) -> None:
        """The checkpoint ``run.log_checkpoints`` asks for, as a W&B ``model`` artifact."""
        loggers = [logger for logger in self.trainer.loggers if isinstance(logger, RunWandbLogger)]
        chosen = checkpoint_to_log(self._run_settings().log_checkpoints, last, getattr(callback, "best_model_path", None))
        if not loggers or chosen is None or not self.trainer.is_global_zero:
            return
        path, aliases = chosen
        score = getattr(callback, "best_model_score", None)
        metadata = {"step": self.trainer.global_step, "file": os.path.basename(path),
                    "monitor": getattr(callback, "monitor", None),
                    "best_score": float(score) if score is not None else None}
        for logger in loggers:
            logger.log_checkpoint(path, aliases, metadata)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
            # the W&B run ends with the command (its artifacts flushed), not at the exit of the process: a second
            # command in the same process (a test, a notebook) gets its own W&B run, not this one
            for logger in self.trainer.loggers:
                if isinstance(logger, RunWandbLogger):
                    logger.finish()
        finally:
            os.environ.pop(VERSION_ENV, None)


#: in a run folder: the SLURM job and attempt (``<job id>:<restart count>``) that last trained in it
SLURM_ATTEMPT_FILE = ".slurm_attempt"


def slurm_attempt() -> str | None:
    job = slurm_job_id()
    return f"{job}:{int(os.environ.get('SLURM_RESTART_COUNT', '0') or 0)}" if job else None


def slurm_restart(run_dir: str) -> bool:
    """Whether this SLURM job continues the run of its folder: requeued (``SLURM_RESTART_COUNT`` > 0), or
    another job (a resubmitted ``submit.sbatch``) entering a folder that holds checkpoints. A second ``ldm fit``
    of the same job attempt (the folder's ``.slurm_attempt`` names it) is not: two runs never share a folder."""
    attempt = slurm_attempt()
    if attempt is None or not os.path.isdir(run_dir):
        return False
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        return True
    marker = os.path.join(run_dir, SLURM_ATTEMPT_FILE)
    if os.path.isfile(marker) and open(marker).read().strip() == attempt:
        return False
    folder = os.path.join(run_dir, "checkpoints")
    return any(f.startswith("hpc_ckpt_") for f in os.listdir(run_dir)) or (
        os.path.isdir(folder) and any(f.endswith(".ckpt") for f in os.listdir(folder)))


class StartError(ValueError):
    """A run that may not start (its folder belongs to another run): one line, exit status 2."""


class _TrainingStarted(Callback):
    """Marks the first training batch: errors before it are start failures (one line, exit 2, cleaned up)."""

    def __init__(self) -> None:
        self.started = False
        self.run_dir: str | None = None

    def _start(self, trainer: Trainer) -> None:
        if not self.started and trainer.state.fn == "fit" and self.run_dir and slurm_attempt() and is_rank_zero():
            with open(os.path.join(self.run_dir, SLURM_ATTEMPT_FILE), "w") as f:  # see slurm_restart
                f.write(slurm_attempt() + "\n")
        self.started = True
        for logger in trainer.loggers:
            if isinstance(logger, RunWandbLogger):
                logger.allow_start()

    def on_train_batch_start(self, trainer: Trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self._start(trainer)

    def on_validation_batch_start(self, trainer: Trainer, pl_module, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if not trainer.training and trainer.state.fn != "fit":  # ldm validate; the sanity check is not a start
            self._start(trainer)

    def on_test_batch_start(self, trainer: Trainer, pl_module, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._start(trainer)


def ddp_strategy_for(model: Any, strategy: Any) -> Any:
    """``strategy``, with DDP's unused-parameter detection on for a system that declares it needs it.

    A system with ``ddp_find_unused_parameters = True`` (the autoencoder: generator and discriminator each sit
    out one of its two backward passes) crashes under plain ``ddp`` at its second step; a strategy name such as
    ``ddp`` (what slurm/fit.sbatch passes) becomes Lightning's registered ``ddp_find_unused_parameters_true``.
    Anything else (an explicit ``*_find_unused_parameters_false``, a strategy object) is left as given.
    """
    from pytorch_lightning.strategies import StrategyRegistry

    if isinstance(strategy, str) and getattr(model, "ddp_find_unused_parameters", False):
        detecting = f"{strategy}_find_unused_parameters_true"
        if detecting in StrategyRegistry:
            return detecting
    return strategy


def default_checkpointing(model: Any, minutes: float | None = None) -> list[ModelCheckpoint]:
    """The best checkpoint by the stage's validation metric (the system's ``checkpoint_monitor``, e.g.
    ``("val/loss", "min")``) and ``last.ckpt`` at every validation; ``ldm fit`` also writes ``last.ckpt`` at the
    end. A system without ``checkpoint_monitor`` keeps Lightning's default: the newest checkpoint of each epoch.
    With ``minutes``, ``last.ckpt`` is also written every ``minutes`` of training (``run.checkpoint_minutes``):
    what a job killed without warning loses is bounded by it."""
    monitor, mode = getattr(model, "checkpoint_monitor", (None, "min"))
    if monitor is None:
        checkpoints = [ModelCheckpoint(save_last=True)]
    else:
        checkpoints = [ModelCheckpoint(monitor=monitor, mode=mode, save_top_k=1, save_last=True,
                                       filename="best-{epoch}-{step}")]
    if minutes:
        checkpoints.append(timed_checkpoint(minutes))
    return checkpoints


def default_monitors(configured: Sequence[Callback] = ()) -> list[Callback]:
    """The monitors every run logs (``run.monitors``): the learning rate of each optimizer at every step
    (``lr-<Optimizer>``, Lightning's ``LearningRateMonitor``) and samples / batches per second
    (``train/device/samples_per_sec``, :class:`~ldm.callbacks.throughput.SampleThroughput`), unless configured already.
    Gradient norms (``train/grad_norm``) come from :class:`~ldm.callbacks.divergence.DivergenceGuard`."""
    monitors: list[Callback] = []
    if not any(isinstance(c, LearningRateMonitor) for c in configured):
        monitors.append(LearningRateMonitor(logging_interval="step"))
    if not any(isinstance(c, SampleThroughput) for c in configured):
        monitors.append(SampleThroughput())
    return monitors


def timed_checkpoint(minutes: float, dirpath: str | None = None) -> ModelCheckpoint:
    """``last.ckpt`` every ``minutes`` of training (``run.checkpoint_minutes``), also beside a config's own
    ModelCheckpoints: what a job killed without warning loses is bounded by it."""
    return ModelCheckpoint(dirpath=dirpath, train_time_interval=timedelta(minutes=minutes), save_top_k=0,
                           save_last=True)


def _first_missing(path: str) -> str | None:
    """The outermost folder of ``path`` that does not exist yet (what a failed start must remove), or None."""
    missing = None
    current = os.path.abspath(path)
    while not os.path.exists(current):
        missing = current
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return missing
