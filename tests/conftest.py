"""Shared fixtures: small shapes shards, a clean W&B environment, a runner for the `ldm` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    """torch-fidelity's Inception-v3 feature extractor with random weights, saved like the real file (the real
    one cannot be downloaded here): loaded through the real path, its FIDs are not meaningful."""
    from ldm.metrics.generation import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception-random.pth")
