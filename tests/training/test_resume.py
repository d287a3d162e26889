"""Exact resume: a run interrupted at step 10 and resumed from its checkpoint equals the uninterrupted run.

Each run is the real ``ldm fit`` in a subprocess: run A trains 20 steps and saves a checkpoint at
step 10 (as a requeue or a crash would leave it); run B resumes from that checkpoint into another
run folder. Steps 10-19 of B must log the losses of A's steps 10-19, bit for bit on CPU: the same
batches in the same order (the data position is in the checkpoint), the same RNG streams (seeded
per step) and the same optimizer, schedule and EMA state.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.conftest import REPO, run_ldm

DEBUG = str(REPO / "configs/trainer/debug.yaml")


def checkpoint_every(steps: int) -> list[str]:
    """Arguments adding a ModelCheckpoint that keeps ``at-step=N.ckpt`` every ``steps`` training steps."""
    return ["--trainer.callbacks+=pytorch_lightning.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.every_n_train_steps={steps}", "--trainer.callbacks.save_top_k=-1",
            "--trainer.callbacks.filename=at-{step}"]


def _losses(run: Path, key: str = "train/loss") -> dict[int, float]:
    rows = csv.DictReader(open(run / "metrics.csv"))
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def interrupted_vs_straight(tmp_path: Path, args: list[str], *, devices: int = 1, steps: int = 20,
                            at: int = 10) -> tuple[dict[int, float], dict[int, float]]:
    """(losses of the uninterrupted run, losses of the run resumed from its step-``at`` checkpoint)."""
    common = [*args, "--seed_everything=7", f"--trainer.max_steps={steps}", "--trainer.max_epochs=-1",
              "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
              f"--trainer.devices={devices}", f"--run.root={tmp_path}/runs", "--run.name=r", *checkpoint_every(at)]
    if devices > 1:
        common.append("--trainer.strategy=ddp")
    straight = run_ldm(["fit", *common, "--run.version=straight"], cwd=tmp_path, timeout=400)
    assert straight.returncode == 0, straight.stderr[-4000:]
    ckpt = tmp_path / f"runs/r/straight/checkpoints/at-step={at}.ckpt"
    assert ckpt.is_file(), sorted(p.name for p in ckpt.parent.iterdir())
    resumed = run_ldm(["fit", *common, "--run.version=resumed", f"--ckpt_path={ckpt}"], cwd=tmp_path, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    return _losses(tmp_path / "runs/r/straight"), _losses(tmp_path / "runs/r/resumed")


def assert_same_second_half(straight: dict[int, float], resumed: dict[int, float], at: int = 10) -> None:
    """The resumed run logged the steps from ``at`` on that the uninterrupted one logged, with equal losses.
    (A manually optimised system steps its optimizers more than once per batch, so steps may skip numbers.)"""
    expected = sorted(s for s in straight if s >= at)
    assert len(expected) >= 5 and sorted(resumed) == expected, (sorted(resumed), expected)
    diffs = {s: abs(straight[s] - resumed[s]) for s in expected}
    assert max(diffs.values()) == 0.0, {s: (straight[s], resumed[s]) for s in diffs if diffs[s]}


def _toy(shapes_dir: Path, workers: int) -> list[str]:
    # 120 training scenes, 48 per epoch: 6 batches of 8, so step 10 is in the middle of epoch 1
    return ["-c", DEBUG, "-c", str(REPO / "tests/configs/toy.yaml"), f"--data.train={shapes_dir}/train-*.tar",
            f"--data.val={shapes_dir}/val-*.tar", "--data.samples_per_epoch=48", f"--data.num_workers={workers}",
            "--data.crop=random", "--data.flip=true", "--data.shuffle_buffer=20", "--trainer.val_check_interval=4",
            "--trainer.limit_val_batches=1"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [0, 2])
def test_toy_resume_is_exact(shapes_dir, tmp_path, workers):
    straight, resumed = interrupted_vs_straight(tmp_path, _toy(shapes_dir, workers))
    assert_same_second_half(straight, resumed)


@pytest.mark.timeout(500)
# the two-rank case (about 50 s) runs in make test-slow: make test stays within its 15 minutes
@pytest.mark.parametrize("devices, batch, noised", [(1, 16, 0.3), pytest.param(2, 8, 0.0, marks=pytest.mark.slow)])
def test_clip_resume_is_exact(shapes_dir, tmp_path, devices, batch, noised):
    # noised_fraction draws random noise levels in the training step (the RNG must resume too)
    args = ["-c", DEBUG, "-c", str(REPO / "configs/contrastive/clip-debug.yaml"),
            f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar",
            f"--data.batch_size={batch}", "--data.samples_per_epoch=64", "--data.num_workers=1",
            "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
            f"--model.init_args.noised_fraction={noised}"]
    straight, resumed = interrupted_vs_straight(tmp_path, args, devices=devices)
    assert_same_second_half(straight, resumed)
