"""Exact resume of the latent-diffusion system (EMA, condition dropout, warmup, fixed-noise validation)."""

import pytest

from tests.conftest import REPO
from tests.stages import stage_args
from tests.training.test_resume import DEBUG, assert_same_second_half, interrupted_vs_straight


@pytest.mark.slow  # two fits and a resume (about 40 s): make test-slow, so make test stays within 15 minutes
@pytest.mark.timeout(400)
def test_latent_diffusion_resume_is_exact(shapes_dir, stage_runs, tmp_path):
    args = ["-c", DEBUG, "-c", str(REPO / "configs/ldm/debug.yaml"), *stage_args(stage_runs),
            f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar", "--data.batch_size=8",
            "--data.samples_per_epoch=48", "--data.num_workers=1", "--trainer.val_check_interval=4",
            "--trainer.limit_val_batches=1", "--model.init_args.cond_drop=0.3", "--model.init_args.lr_scheduler.init_args.warmup_steps=5"]
    straight, resumed = interrupted_vs_straight(tmp_path, args)
    assert_same_second_half(straight, resumed)


@pytest.mark.slow  # two autoencoder fits (about 21 s); the LDM and CLIP resume tests stay in make test
@pytest.mark.timeout(400)
def test_autoencoder_resume_is_exact_across_the_gan_switch(shapes_dir, tmp_path):
    args = ["-c", DEBUG, "-c", str(REPO / "configs/autoencoder/kl-f4-debug.yaml"),
            f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar", "--data.image_size=32",
            "--data.batch_size=8", "--data.samples_per_epoch=48", "--data.num_workers=1",
            "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1",
            "--model.init_args.loss.init_args.disc_start=12"]
    straight, resumed = interrupted_vs_straight(tmp_path, args)
    assert_same_second_half(straight, resumed)
