"""Shared fixtures: small shapes shards, a clean W&B environment, a runner for the `ldm` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.data.synthetic import write_synthetic_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    # tests that exercise W&B set WANDB_MODE themselves
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("LDM_RUN_VERSION", raising=False)
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_PROCID", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """120 train scenes in shards of 50 (50, 50, 20) and 30 val scenes in shards of 50, at 32 px."""
    out = tmp_path_factory.mktemp("shapes")
    write_synthetic_shards(out, train=120, val=30, size=32, seed=3, shard_size=50, progress=False)
    return out


def ldm_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LDM_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({"WANDB_MODE": "disabled", "WANDB_SILENT": "true"})
    env.update(extra)
    return env


def run_ldm(args: list[str], cwd: Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """Run the real `ldm` console script in a subprocess."""
    ldm = Path(sys.executable).with_name("ldm")
    return subprocess.run([str(ldm), *args], cwd=cwd, env=ldm_env(**env), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    """torch-fidelity's Inception-v3 feature extractor with random weights, saved like the real file.

    The module is built with its weight loading stubbed out (the real file cannot be
    downloaded here); the system then loads this file through the real rFID path. FID values
    computed with it are not meaningful.
    """
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    folder = tmp_path_factory.mktemp("inception")
    stub = folder / "empty.pth"
    torch.save({}, stub)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None):
        torch.manual_seed(0)
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(stub))
    path = folder / "inception-random.pth"
    torch.save(model.state_dict(), path)
    return path
