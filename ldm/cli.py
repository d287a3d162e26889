"""The ``ldm`` command: LightningCLI for ``fit | validate | test`` plus tool subcommands.

Configs compose left to right (``-c a.yaml -c b.yaml``), dotted overrides follow
(``--trainer.max_steps=100``), ``--print_config`` shows the resolved result. Every
key and type is checked by jsonargparse against the constructors' signatures
before any model or data is built; a bad key exits with status 2 and names it.

Tool subcommands (``ldm shards ...``) are registered in :data:`TOOLS`; they are listed in ``ldm --help``.

This module is the console script and stays light: ``ldm --help`` and the tools import neither torch nor
Lightning from here. The LightningCLI (:class:`~ldm.cli_lightning.LDMCLI` and its helpers) lives in
:mod:`ldm.cli_lightning`, imported when a Lightning subcommand runs; ``from ldm.cli import LDMCLI`` still works.
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

DESCRIPTION = "Train and evaluate latent-diffusion stages."

#: Lightning subcommand -> its one-line description (``ldm --help`` and ``ldm SUBCOMMAND --help``);
#: :meth:`ldm.cli_lightning.LDMCLI.subcommands` registers exactly these
SUBCOMMANDS: dict[str, str] = {
    "fit": "Train a stage (resume with --ckpt_path).",
    "validate": "Run the stage's validation on data.val once, logged under val/.",
    "test": "Run the stage's validation on data.test once, logged under test/.",
}

#: tool subcommand -> (module with ``main(argv)``, one-line description)
TOOLS: dict[str, tuple[str, str]] = {
    "shards": ("ldm.tools.shards", "write WebDataset shards (synthetic scenes, image folders) and preview them"),
    "precompute": ("ldm.tools.precompute", "encode shards with a trained stage (autoencoder latents, CLIP embeddings)"),
    "sample": ("ldm.tools.sample", "sample images for prompts from a trained latent-diffusion run"),
    "eval": ("ldm.tools.evaluate", "FID / KID / IS, CLIP score, FD-CLIP, compositional accuracy of a latent-diffusion run"),
    "runs": ("ldm.tools.runs", "compare runs: final and best metrics, differing config keys, metric plots, an HTML "
             "dashboard"),
    "convert": ("ldm.tools.convert", "import Stable Diffusion weights (a diffusers folder, a single-file checkpoint) "
                "into runs, and export runs back"),
    "submit": ("ldm.tools.submit", "run ldm fit on SLURM: one run, a sweep (job array) or a recipe (dependent jobs)"),
}


def _epilog() -> str:
    tools = "\n".join(f"  ldm {name:<10} {desc}" for name, (_, desc) in TOOLS.items())
    return (
        "tool subcommands (each has --help):\n" + tools + "\n\n"
        "examples:\n"
        "  ldm fit -c configs/trainer/debug.yaml -c my_experiment.yaml --trainer.max_steps=100\n"
        "  ldm fit -c my_experiment.yaml --print_config\n"
        "  ldm shards synthetic --kind shapes --out data/shapes --train 10000 --val 1000 --size 64\n"
        "  ldm sample --ckpt runs/ldm-debug/version_0 --prompt 'a red circle' --num-images 4 --out grid.png\n"
        "  ldm sample -c my_sampling.yaml --seed 1    # tools read -c FILE and --print_config too"
    )


def _yaml_problem(args: Sequence[str]) -> str | None:
    """A config file given with ``-c``/``--config`` that is not valid YAML, named with the parser's position."""
    for i, arg in enumerate(args):
        path = args[i + 1] if arg in ("-c", "--config") and i + 1 < len(args) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if not path or not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            return f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}"
    return None


#: a type's "known subclasses" in the help are listed in full up to this many (optimizers, schedulers, callbacks
#: are); beyond, only ldm's exported classes and the user's own (see shorten_known_subclasses)
KNOWN_SUBCLASSES_SHOWN = 100
_KNOWN = ", known subclasses: "


def _library_module(top: str) -> bool:
    """Whether the top-level module ``top`` is an installed library or the standard library (not ``ldm`` and not
    the user's own modules in the working directory)."""
    if top == "ldm":
        return False
    module = sys.modules.get(top)
    path = getattr(module, "__file__", None) or ""
    return module is None or not path or "site-packages" in path or "dist-packages" in path or \
        path.startswith(os.path.dirname(os.__file__))


def shorten_known_subclasses(help_text: str, limit: int = KNOWN_SUBCLASSES_SHOWN) -> str:
    """A type help's ``known subclasses: a, b, ...`` shortened when it names more than ``limit`` classes.

    A parameter typed ``nn.Module`` (the systems' ``unet`` / ``prior``) would list every module class that
    torch, torchvision, timm, open_clip and ldm define: about 1,500 lines of ``ldm fit --model.help
    ldm.systems.LatentDiffusion``. Beyond ``limit``, only the classes that ldm's packages export
    (``ldm.diffusion.UNet``, not ``ldm.diffusion.unet.UNetBlock``) and the user's own modules are named; the rest
    are counted, with the libraries they come from. Any of them is still accepted as a ``class_path``.
    """
    start = help_text.find(_KNOWN)
    if start < 0 or " more from " in help_text:  # jsonargparse may format a help string twice
        return help_text
    begin = start + len(_KNOWN)
    end = help_text.find(")", begin)
    end = len(help_text) if end < 0 else end
    paths = help_text[begin:end].split(", ")
    if len(paths) <= limit:
        return help_text

    def named(path: str) -> bool:
        top = path.split(".")[0]
        return path.count(".") == 2 if top == "ldm" else not _library_module(top)

    shown = [p for p in paths if named(p)]
    libraries = sorted({p.split(".")[0] for p in paths if _library_module(p.split(".")[0])})
    rest = f"{len(paths) - len(shown):,} more from " + (", ".join(libraries) or "ldm")
    return help_text[:begin] + (", ".join(shown) + " and " if shown else "") + rest + help_text[end:]


def _formatter():
    from jsonargparse import DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter):
        def _fill_text(self, text: str, width: int, indent: str) -> str:
            return "".join(indent + line for line in text.splitlines(keepends=True))

        def _get_help_string(self, action) -> str:
            return shorten_known_subclasses(super()._get_help_string(action))

    return Formatter


def top_parser():
    """The parser of ``ldm`` without a subcommand: the same help as the LightningCLI's, built without torch."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(description=DESCRIPTION, epilog=_epilog(), formatter_class=_formatter())
    parser.add_argument("-c", "--config", action=ActionConfigFile,
                        help="Path to a configuration file in json or yaml format.")
    subcommands = parser.add_subcommands()
    for name, description in SUBCOMMANDS.items():
        subcommands.add_subcommand(name, ArgumentParser(description=description), help=description)
    return parser


def __getattr__(name: str) -> Any:
    """``from ldm.cli import LDMCLI`` (and the other names of :mod:`ldm.cli_lightning`), imported on first use."""
    if not name.startswith("__"):
        module = importlib.import_module("ldm.cli_lightning")
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'ldm.cli' has no attribute {name!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ldm`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    # like `python -m`, let configs name classes in the working directory (class_path: my_models.MyNet)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    if args and args[0] in TOOLS:
        module = importlib.import_module(TOOLS[args[0]][0])
        return int(module.main(args[1:]) or 0)
    if not args or args[0] in ("-h", "--help"):
        # the top-level help (or the missing subcommand) without building the Lightning parsers: no torch
        top_parser().parse_args(args)  # prints and exits
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # our train stream defines __len__ on purpose: every worker yields its exact share of the epoch
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    command = f"ldm {args[0]}" if args and not args[0].startswith("-") else "ldm"
    if problem := _yaml_problem(args):
        print(f"{command}: error: {problem}", file=sys.stderr)
        return 2
    from ldm.cli_lightning import DivergenceError, LDMCLI  # torch and Lightning: only for a Lightning subcommand

    try:
        LDMCLI(args=None if argv is None else args)
    except DivergenceError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 3
    except Exception as e:
        line = getattr(e, "ldm_start_failure", None)  # set by LDMCLI for a start that failed before training
        if line is None or os.environ.get("LDM_TRACEBACK"):
            raise
        print(f"{command}: error: {line}\n(the run did not start; LDM_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
