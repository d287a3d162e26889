"""Divergence guard: non-finite steps are skipped and counted; a diverging run stops with status 3 and no
checkpoint in its run folder holds a non-finite value."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_ldm
from tests.training.test_resume import checkpoint_every

DEBUG = str(REPO / "configs/trainer/debug.yaml")


def _toy_fit(shapes_dir: Path, tmp_path: Path, *extra: str):
    return run_ldm(["fit", "-c", DEBUG, "-c", str(REPO / "tests/configs/toy.yaml"),
                    f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar",
                    "--data.samples_per_epoch=48", "--trainer.max_epochs=-1", "--trainer.log_every_n_steps=1",
                    "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1",
                    "--trainer.enable_progress_bar=false", f"--run.root={tmp_path}/runs", "--run.version=v", *extra],
                   cwd=tmp_path, timeout=200)


def _rows(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run / "metrics.csv")))


def _checkpoints_finite(run: Path) -> dict[str, bool]:
    out = {}
    for path in sorted((run / "checkpoints").glob("*.ckpt")):
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        out[path.name] = all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    return out


@pytest.mark.timeout(200)
def test_isolated_nan_steps_are_skipped_and_counted(shapes_dir, tmp_path):
    res = _toy_fit(shapes_dir, tmp_path, "--trainer.max_steps=12", "--model.init_args.nan_loss_steps=[3,4,9]",
                   *checkpoint_every(1))
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs/toy/v"
    rows = _rows(run)
    counts = {int(r["step"]): float(r["train/nonfinite_steps"]) for r in rows if r.get("train/nonfinite_steps")}
    assert counts[2] == 0 and counts[3] == 1 and counts[4] == 2 and counts[11] == 3, counts
    assert "step 3: non-finite loss or gradient" in res.stderr

    def weights(step: int) -> dict[str, torch.Tensor]:
        return torch.load(run / f"checkpoints/at-step={step}.ckpt", map_location="cpu", weights_only=False)["state_dict"]

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    # checkpoint "at-step=N" holds the weights after N optimizer steps: steps 3 and 4 (0-based) were skipped
    assert same(weights(3), weights(5)) and not same(weights(5), weights(6)) and not same(weights(2), weights(3))
    finite = _checkpoints_finite(run)
    assert "last.ckpt" in finite and all(finite.values()), finite


@pytest.mark.timeout(200)
def test_a_diverging_run_stops_with_status_3_naming_the_last_good_checkpoint(shapes_dir, tmp_path):
    res = _toy_fit(shapes_dir, tmp_path, "--trainer.max_steps=40", "--model.init_args.nan_loss_from=9",
                   *checkpoint_every(4),
                   "--trainer.callbacks+=ldm.callbacks.DivergenceGuard", "--trainer.callbacks.patience=6")
    assert res.returncode == 3, (res.returncode, res.stderr[-3000:])
    run = tmp_path / "runs/toy/v"
    last_line = res.stderr.strip().splitlines()[-1]
    assert "diverged" in last_line and "6 training steps in a row" in last_line and "(steps 9-14," in last_line, last_line
    assert res.stderr.count("step 9: non-finite") == 1  # the configured guard replaced the default one
    assert "at-step=8.ckpt" in last_line, last_line  # steps 9.. were skipped, so the step-8 checkpoint is the last good
    assert "Traceback" not in res.stderr
    finite = _checkpoints_finite(run)
    assert finite and all(finite.values()), finite


@pytest.mark.timeout(200)
def test_a_checkpoint_with_non_finite_weights_is_never_written(shapes_dir, tmp_path):
    res = _toy_fit(shapes_dir, tmp_path, "--trainer.max_steps=20", "--model.init_args.nan_weights_at=6",
                   *checkpoint_every(4))
    assert res.returncode == 3, (res.returncode, res.stderr[-3000:])
    assert "refusing to write a checkpoint" in res.stderr and "net.4.bias" in res.stderr
    finite = _checkpoints_finite(tmp_path / "runs/toy/v")
    assert "at-step=4.ckpt" in finite and all(finite.values()), finite
