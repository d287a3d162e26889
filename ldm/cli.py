"""The ``ldm`` command: LightningCLI for ``fit | validate | test | predict`` plus tool subcommands.

Configs compose left to right (``-c a.yaml -c b.yaml``), dotted overrides follow
(``--trainer.max_steps=100``), ``--print_config`` shows the resolved result. Every
key and type is checked by jsonargparse against the constructors' signatures
before any model or data is built; a bad key exits with status 2 and names it.

Tool subcommands (``ldm shards ...``) are plain argparse programs registered in
:data:`TOOLS`; they are listed in ``ldm --help``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import yaml
from pytorch_lightning import Trainer
from pytorch_lightning.cli import (
    LightningArgumentParser,
    LightningCLI,
    SaveConfigCallback,
)
from pytorch_lightning.loggers import WandbLogger

from ldm.callbacks import DataSkipMonitor
from ldm.config_errors import summarize
from ldm.data.urls import ShardPattern
from ldm.runs import (
    VERSION_ENV,
    RunSettings,
    build_loggers,
    resolve_version,
    snake_case,
)

#: tool subcommand -> (module with ``main(argv)``, one-line description)
TOOLS: dict[str, tuple[str, str]] = {
    "shards": ("ldm.tools.shards", "write WebDataset shards (synthetic scenes, image folders) and preview them"),
    "precompute": ("ldm.tools.precompute", "encode shards with a trained stage (autoencoder latents, CLIP embeddings)"),
    "sample": ("ldm.tools.sample", "sample images for prompts from a trained latent-diffusion run"),
    "eval": ("ldm.tools.evaluate", "FID / KID / IS, CLIP score, FD-CLIP, compositional accuracy of a latent-diffusion run"),
    "runs": ("ldm.tools.runs", "compare runs: final and best metrics, differing config keys, metric plots"),
}


def _epilog() -> str:
    tools = "\n".join(f"  ldm {name:<10} {desc}" for name, (_, desc) in TOOLS.items())
    return (
        "tool subcommands (each has --help):\n" + tools + "\n\n"
        "examples:\n"
        "  ldm fit -c configs/trainer/debug.yaml -c my_experiment.yaml --trainer.max_steps=100\n"
        "  ldm fit -c my_experiment.yaml --print_config\n"
        "  ldm shards synthetic --kind shapes --out data/shapes --train 10000 --val 1000 --size 64\n"
        "  ldm sample --ckpt runs/ldm-debug/version_0 --prompt 'a red circle' --n 4 --out grid.png"
    )


def model_tokenizer(model: Any) -> Any:
    """The tokenizer a model provides to the data module (``model.tokenizer``), or None."""
    return getattr(model, "tokenizer", None)


class ConfigSaver(SaveConfigCallback):
    """Saves ``config.yaml`` into the run folder and the same resolved config into W&B."""

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(config, allow_val_change=True)


class LDMArgumentParser(LightningArgumentParser):
    """Puts one ``dotted.key: problem`` line per error above jsonargparse's detailed report."""

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
        kwargs.setdefault("trainer_defaults", {"callbacks": [DataSkipMonitor()]})
        kwargs.setdefault("parser_kwargs", {"description": "Train and evaluate latent-diffusion stages.",
                                            "epilog": _epilog()})
        super().__init__(args=args, run=run, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("formatter_class", _formatter())
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunSettings, "run")
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

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("logger") in (None, True):
            run = self._run_settings()
            name = run.name or snake_case(type(self.model).__name__)
            version = resolve_version(run.root, name, run.version)
            os.environ[VERSION_ENV] = version  # processes spawned for DDP join the same folder
            self.run_dir = os.path.join(run.root, name, version)
            kwargs["logger"] = build_loggers(run, name, version)
            if trainer_cfg.get("default_root_dir") is None:
                # SLURM requeue checkpoints (hpc_ckpt_*.ckpt) go to, and are resumed from, the run folder
                kwargs["default_root_dir"] = self.run_dir
        return super().instantiate_trainer(**kwargs)

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
        trainer.save_checkpoint(os.path.join(folder, "last.ckpt"))

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        finally:
            os.environ.pop(VERSION_ENV, None)


def _formatter():
    from jsonargparse import DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter):
        def _fill_text(self, text: str, width: int, indent: str) -> str:
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return Formatter


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ldm`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    # like `python -m`, let configs name classes in the working directory (class_path: my_models.MyNet)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    if args and args[0] in TOOLS:
        module = importlib.import_module(TOOLS[args[0]][0])
        return int(module.main(args[1:]) or 0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # our train stream defines __len__ on purpose: every worker yields its exact share of the epoch
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    LDMCLI(args=None if argv is None else args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
