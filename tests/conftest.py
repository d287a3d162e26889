"""Shared fixtures: small shapes shards, a clean W&B environment, a runner for the `ldm` command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ldm.data.synthetic import write_synthetic_shards

REPO = Path(__file__).resolve().parents[1]

#: the trained stage runs (autoencoder, CLIP, LDM) that the systems, pipelines and tools tests share
pytest_plugins = ["tests.stages"]


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


@pytest.fixture(scope="session")
def three_val_dir(tmp_path_factory) -> Path:
    """3 val scenes in one shard, at 32 px: split over 2 ranks with a batch of 1, rank 1's second batch is padding."""
    out = tmp_path_factory.mktemp("three-val")
    write_synthetic_shards(out, train=0, val=3, size=32, seed=5, progress=False)
    return out


def ldm_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LDM_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({"WANDB_MODE": "disabled", "WANDB_SILENT": "true"})
    env.update(extra)
    return env


def start_ldm(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """Start the real `ldm` console script in its own session (signal it, or its whole group, while it runs)."""
    ldm = Path(sys.executable).with_name("ldm")
    return subprocess.Popen([str(ldm), *args], cwd=cwd, env=ldm_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    """Wait for a process of :func:`start_ldm`; past ``timeout`` its whole session is killed first."""
    with proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(proc.args, timeout, out, err) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_ldm(args: list[str], cwd: Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """Run the real `ldm` console script in a subprocess.

    It runs in its own session, and running past ``timeout`` kills the whole session before
    ``TimeoutExpired`` is raised: DDP ranks > 0 are children of rank 0, and a hung rank would
    otherwise outlive the test (and hold the CPUs of the next ones).
    """
    return finish(start_ldm(args, cwd, **env), timeout)


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    """torch-fidelity's Inception-v3 feature extractor with random weights, saved like the real file (the real
    one cannot be downloaded here): loaded through the real path, its FIDs are not meaningful."""
    from ldm.metrics.generation import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception-random.pth")
