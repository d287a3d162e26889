"""A run that cannot start says why in one line (naming the config key), exits 2 and leaves nothing behind;
two runs never share a run folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO, run_ldm

DEBUG = str(REPO / "configs/trainer/debug.yaml")
TOY = str(REPO / "tests/configs/toy.yaml")


def _toy(shapes_dir: Path, *extra: str) -> list[str]:
    return ["fit", "-c", DEBUG, "-c", TOY, f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar",
            "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", *extra]


def assert_clean_failure(res, tmp_path: Path, *words: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("ldm fit: error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    assert not (tmp_path / "runs").exists(), sorted(str(p) for p in (tmp_path / "runs").rglob("*"))[:10]
    return errors[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("arg, words", [
    ("--data.batch_size=-3", ["data.init_args.batch_size", "-3"]),
    ("--trainer.max_steps=-5", ["trainer.max_steps", "-5"]),
    ("--model.init_args.lr=-1", ["model.init_args.lr", "learning rate"]),
    ("--ckpt_path=missing.ckpt", ["ckpt_path", "missing.ckpt"]),
])
def test_a_failed_start_is_one_line_exit_2_and_leaves_no_run_folder(shapes_dir, tmp_path, arg, words):
    res = run_ldm(_toy(shapes_dir, arg), cwd=tmp_path, timeout=100, WANDB_MODE="offline")
    assert_clean_failure(res, tmp_path, *words)


@pytest.mark.timeout(120)
def test_a_missing_first_stage_names_its_key(shapes_dir, tmp_path):
    # configs/ldm/debug.yaml names runs/kl-f4-debug/version_0, which does not exist under tmp_path
    res = run_ldm(["fit", "-c", DEBUG, "-c", str(REPO / "configs/ldm/debug.yaml"), f"--data.train={shapes_dir}/train-*.tar",
                   f"--data.val={shapes_dir}/val-*.tar"], cwd=tmp_path, timeout=100, WANDB_MODE="offline")
    assert_clean_failure(res, tmp_path, "first_stage.init_args.checkpoint", "runs/kl-f4-debug/version_0")


def test_a_malformed_yaml_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args: [1, 2\n")
    res = run_ldm(["fit", "-c", DEBUG, "-c", str(bad)], cwd=tmp_path, timeout=60)
    line = assert_clean_failure(res, tmp_path, str(bad), "line 3")
    assert "not valid YAML" in line


@pytest.mark.timeout(200)
@pytest.mark.slow  # make test-all (keeps make test within its 15 minutes)
def test_two_runs_never_share_a_run_folder(shapes_dir, tmp_path):
    first = run_ldm(_toy(shapes_dir, "--run.version=shared"), cwd=tmp_path, timeout=100)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs/toy/shared"
    config = (run / "config.yaml").read_text()
    second = run_ldm(_toy(shapes_dir, "--run.version=shared", "--model.init_args.lr=0.5"), cwd=tmp_path, timeout=100)
    assert second.returncode == 2 and "already holds another run" in second.stderr, second.stderr[-2000:]
    assert (run / "config.yaml").read_text() == config  # untouched, and the folder was not removed
    # the same SLURM job id twice (two `ldm fit` in one allocation): the second is refused too
    slurm = run_ldm(_toy(shapes_dir), cwd=tmp_path, timeout=100, SLURM_JOB_ID="4242")
    assert slurm.returncode == 0, slurm.stderr[-3000:]
    again = run_ldm(_toy(shapes_dir), cwd=tmp_path, timeout=100, SLURM_JOB_ID="4242")
    assert again.returncode == 2 and "runs/toy/slurm_4242" in again.stderr, again.stderr[-2000:]
    # resuming the run is what a folder with a config is for
    resumed = run_ldm(_toy(shapes_dir, "--run.version=shared", f"--ckpt_path={run}/checkpoints/last.ckpt",
                           "--trainer.max_steps=4"), cwd=tmp_path, timeout=100)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
