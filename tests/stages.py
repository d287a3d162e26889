"""Stage runs the latent-diffusion tests build on (tests/systems, tests/pipelines, tests/tools): a tiny trained
autoencoder and CLIP, and the debug LDM on them, in run folders; session fixtures, loaded by tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldm.cli import LDMCLI
from tests.conftest import REPO

DEBUG = [str(REPO / "configs/trainer/debug.yaml")]
LDM_DEBUG = str(REPO / "configs/ldm/debug.yaml")


def fit(args: list[str]) -> LDMCLI:
    return LDMCLI(args=["fit", *args, "--trainer.enable_progress_bar=false", "--run.wandb_mode=disabled"])


@pytest.fixture(scope="session")
def stage_runs(shapes_dir, tmp_path_factory) -> dict[str, Path]:
    """{'ae': KL-f4 debug autoencoder run, 'clip': debug CLIP run}, a few steps each, on the 32 px shapes."""
    root = tmp_path_factory.mktemp("stages")
    data = [f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar", "--data.num_workers=0",
            "--data.image_size=32", "--trainer.limit_val_batches=0", f"--run.root={root}", "--run.version=v"]
    ae = fit(["-c", *DEBUG, "-c", str(REPO / "configs/autoencoder/kl-f4-debug.yaml"), *data,
              "--data.batch_size=8", "--trainer.max_steps=6", "--model.init_args.loss.init_args.disc_weight=0"])
    clip = fit(["-c", *DEBUG, "-c", str(REPO / "configs/contrastive/clip-debug.yaml"), *data,
                "--data.batch_size=16", "--trainer.max_steps=3"])
    return {"ae": Path(ae.run_dir), "clip": Path(clip.run_dir)}


def stage_args(stage_runs: dict[str, Path]) -> list[str]:
    """Overrides pointing an LDM config's first stage and text encoder at the test's stage runs."""
    return [f"--model.init_args.first_stage.init_args.checkpoint={stage_runs['ae']}",
            f"--model.init_args.conditioner.init_args.text_encoder.init_args.checkpoint={stage_runs['clip']}"]


@pytest.fixture(scope="session")
def ldm_run(shapes_dir, stage_runs, tmp_path_factory):
    """The debug LDM trained for 56 steps (8 epochs of 7 batches), validated after every epoch, with EMA."""
    root = tmp_path_factory.mktemp("ldm")
    cli = fit(["-c", *DEBUG, "-c", LDM_DEBUG, *stage_args(stage_runs), f"--data.train={shapes_dir}/train-*.tar",
               f"--data.val={shapes_dir}/val-*.tar", "--data.num_workers=0", "--data.batch_size=16",
               "--trainer.max_steps=56", "--trainer.max_epochs=-1", "--trainer.val_check_interval=1.0",
               "--trainer.limit_val_batches=2", f"--run.root={root}", "--run.version=v"])
    return cli
