"""Preemption and requeue lose nothing (issue 14), without a Slurm cluster: the job's environment is set as
SLURM sets it and ``scontrol`` is a recording stand-in (``make test-slurm`` runs the same on a real cluster).

- USR1 sent to the whole process group (trainer and its DataLoader workers, as SLURM signals a job step)
  in the middle of training: a checkpoint at the current step, the job requeued once (by the trainer, not the
  workers), and the requeued job resumes from it and trains what the uninterrupted run trained;
- a job requeued without warning resumes from the newest complete checkpoint of its folder, not from an
  older ``hpc_ckpt``; ``metrics.csv`` then holds every step once;
- SIGTERM: a checkpoint at the current step, exit status 143, nothing requeued.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from ldm.checkpoints import checkpoint_step, newest_checkpoint
from tests.conftest import REPO, finish, run_ldm, start_ldm
from tests.training.test_resume import DEBUG, assert_same_second_half, checkpoint_every

SLURM = {"SLURM_JOB_ID": "777", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "ldm",
         "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


def _args(shapes_dir: Path, tmp_path: Path, steps: int, *extra: str) -> list[str]:
    return ["fit", "-c", DEBUG, "-c", str(REPO / "tests/configs/toy.yaml"), f"--data.train={shapes_dir}/train-*.tar",
            f"--data.val={shapes_dir}/val-*.tar", "--data.samples_per_epoch=48", "--data.num_workers=2",
            "--data.crop=random", "--data.shuffle_buffer=20", "--trainer.val_check_interval=4",
            "--trainer.limit_val_batches=1", "--seed_everything=7", f"--trainer.max_steps={steps}",
            "--trainer.max_epochs=-1", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
            f"--run.root={tmp_path}/runs", "--run.name=r", *extra]


def _rows(run: Path) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(open(run / "metrics.csv"))
            if r.get("train/loss")]


def _scontrol(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A recording ``scontrol`` first on PATH: (environment, the file its calls are appended to)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$$ $*" >> {calls}\n')
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, calls


def _wait_for(path: Path, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.slow  # three fits (about 46 s); make test-slurm sends USR1 on a real cluster, SIGTERM is tested below
@pytest.mark.timeout(400)
def test_usr1_checkpoints_the_current_step_requeues_once_and_the_requeued_job_resumes_exactly(shapes_dir, tmp_path):
    env, calls = _scontrol(tmp_path)
    slow = ["--model.init_args.step_seconds=0.15", *checkpoint_every(10)]
    straight = run_ldm(_args(shapes_dir, tmp_path, 30, *slow, "--run.version=straight"), cwd=tmp_path, timeout=200)
    assert straight.returncode == 0, straight.stderr[-3000:]

    args = _args(shapes_dir, tmp_path, 30, *slow)
    run = tmp_path / "runs/r/slurm_777"
    proc = start_ldm(args, cwd=tmp_path, **SLURM, **env, WANDB_MODE="offline")
    _wait_for(run / "checkpoints/at-step=10.ckpt", proc)
    os.killpg(proc.pid, signal.SIGUSR1)  # trainer and workers, as SLURM signals every process of the step
    first = finish(proc, timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    hpc = sorted(run.glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1, hpc  # one checkpoint: the workers wrote none
    stopped_at = checkpoint_step(hpc[0])
    assert 10 <= stopped_at < 20, stopped_at  # the step the signal found, not an older one
    assert calls.read_text().split()[1:] == ["requeue", "777"]  # requeued once
    assert max(s for s, _ in _rows(run)) == stopped_at - 1  # logged up to the checkpoint, flushed

    second = run_ldm(args, cwd=tmp_path, timeout=200, **SLURM, **env, SLURM_RESTART_COUNT="1", WANDB_MODE="offline")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {hpc[0]}" in second.stderr
    wandb_id = (run / "wandb_id").read_text().strip()
    attempts = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(a.endswith(f"-{wandb_id}") for a in attempts), attempts  # one W&B run
    rows = _rows(run)
    assert [s for s, _ in rows] == list(range(30))  # every step once across both attempts
    assert_same_second_half(dict(_rows(tmp_path / "runs/r/straight")), dict(rows), at=0)
    assert len(calls.read_text().splitlines()) == 1


@pytest.mark.timeout(300)
def test_a_job_requeued_without_warning_resumes_from_the_newest_checkpoint_not_an_old_hpc_one(shapes_dir, tmp_path):
    """Finding: ``scontrol requeue`` at step 268 resumed from the hpc_ckpt of step 150 although a step-250
    checkpoint existed. Here: an old hpc checkpoint (step 5), periodic ones up to step 15, the newer ones lost
    (a hard kill at step 17): the requeued job resumes from step 15 and metrics.csv ends with each step once."""
    args = _args(shapes_dir, tmp_path, 20, *checkpoint_every(5))
    first = run_ldm(args, cwd=tmp_path, timeout=200, **SLURM)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs/r/slurm_777"
    reference = dict(_rows(run))
    shutil.copy(run / "checkpoints/at-step=5.ckpt", run / "hpc_ckpt_1.ckpt")  # an earlier preemption's
    for late in ["at-step=20.ckpt", "last.ckpt", *[p.name for p in (run / "checkpoints").glob("best-*")]]:
        (run / "checkpoints" / late).unlink(missing_ok=True)
    (run / "checkpoints/.at-step=20.ckpt.tmp-otherhost-1").write_bytes(b"partial")  # a write cut short elsewhere
    assert newest_checkpoint(run) == run / "checkpoints/at-step=15.ckpt"

    second = run_ldm(args, cwd=tmp_path, timeout=200, **SLURM, SLURM_RESTART_COUNT="1")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints/at-step=15.ckpt'}" in second.stderr
    rows = _rows(run)
    assert [s for s, _ in rows] == list(range(20)), [s for s, _ in rows]
    assert dict(rows) == reference  # steps 15-19 trained again, bit for bit


@pytest.mark.timeout(300)
def test_sigterm_checkpoints_the_current_step_and_exits_143_without_requeue(shapes_dir, tmp_path):
    env, calls = _scontrol(tmp_path)
    proc = start_ldm(_args(shapes_dir, tmp_path, 40, "--model.init_args.step_seconds=0.15", *checkpoint_every(5),
                           "--run.version=v"), cwd=tmp_path, **SLURM, **env)
    run = tmp_path / "runs/r/v"
    _wait_for(run / "checkpoints/at-step=10.ckpt", proc)
    proc.send_signal(signal.SIGTERM)  # the trainer only, as `kill PID` does
    result = finish(proc, timeout=120)
    assert result.returncode == 143, result.stderr[-3000:]
    hpc = sorted(run.glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1 and 10 <= checkpoint_step(hpc[0]) < 40
    assert f"stopped by SIGTERM at step {checkpoint_step(hpc[0])}" in result.stderr
    assert not calls.exists()  # SIGTERM never requeues

    resumed = run_ldm(_args(shapes_dir, tmp_path, 40, *checkpoint_every(5), "--run.version=v", "--ckpt_path=newest"),
                      cwd=tmp_path, timeout=200)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [s for s, _ in _rows(run)] == list(range(40))


def test_newest_checkpoint_ranks_by_step_and_skips_incomplete_files(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 250, "state_dict": {}}, run / "checkpoints/epoch=9-step=250.ckpt")
    torch.save({"global_step": 150, "state_dict": {}}, run / "hpc_ckpt_1.ckpt")  # written later, older step
    assert newest_checkpoint(run) == run / "checkpoints/epoch=9-step=250.ckpt"
    torch.save({"global_step": 300, "state_dict": {"w": torch.zeros(1000)}}, run / "checkpoints/last.ckpt")
    data = (run / "checkpoints/last.ckpt").read_bytes()
    (run / "checkpoints/last.ckpt").write_bytes(data[: len(data) // 2])  # truncated: skipped
    assert newest_checkpoint(run) == run / "checkpoints/epoch=9-step=250.ckpt"
    assert newest_checkpoint(tmp_path / "empty") is None


def test_the_timed_checkpoint_is_added_beside_a_configs_own_checkpoints(shapes_dir, tmp_path, monkeypatch):
    """``run.checkpoint_minutes`` bounds what a hard kill loses for every preset, including those (sd15-256,
    prior/vit-b, ...) that configure their own ModelCheckpoint."""
    from datetime import timedelta

    from pytorch_lightning.callbacks import ModelCheckpoint

    from ldm.cli import LDMCLI

    monkeypatch.chdir(REPO)
    base = _args(shapes_dir, tmp_path, 5)[1:]
    for extra, expected in [([], [None, timedelta(minutes=30)]),
                            ([*checkpoint_every(5), "--run.checkpoint_minutes=2"], [None, timedelta(minutes=2)]),
                            (["--run.checkpoint_minutes=null"], [None])]:
        cli = LDMCLI(args=[*base, *extra, "--run.version=v", "--run.wandb_mode=disabled"], run=False)
        intervals = [c._train_time_interval for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
        assert intervals == expected, (extra, intervals)
