"""EMA with warmup (issue 15): equal to diffusers' EMAModel(use_ema_warmup=True), step by step, and in a run."""

from __future__ import annotations

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from ldm.callbacks.ema import EMAWarmup, ema_warmup_multi_avg_fn, warmup_decay
from tests.conftest import REPO, run_ldm

diffusers_training = pytest.importorskip("diffusers.training_utils")


def test_the_average_equals_diffusers_ema_model_with_warmup():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))
    ours = AveragedModel(net, multi_avg_fn=ema_warmup_multi_avg_fn(decay=0.999, power=2 / 3), use_buffers=True)
    ref = diffusers_training.EMAModel(net.parameters(), decay=0.999, use_ema_warmup=True, power=2 / 3, inv_gamma=1.0,
                                      min_decay=0.0, update_after_step=0)
    for _ in range(50):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ours.update_parameters(net)
        ref.step(net.parameters())
        for a, b in zip(ours.module.parameters(), ref.shadow_params):
            assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def test_the_warmup_forgets_the_initial_weights_where_a_fixed_decay_keeps_half():
    share_fixed = 0.999 ** 600  # a 600-step run with a fixed 0.999 keeps 55 % of its first weights
    share_warm = 1.0
    for n in range(1, 600):
        share_warm *= warmup_decay(n, 0.999, 2 / 3)
    assert share_fixed > 0.5 and share_warm < 0.01
    assert warmup_decay(1, 0.999, 2 / 3) == pytest.approx(1 - 2 ** (-2 / 3))
    assert warmup_decay(10**6, 0.999, 2 / 3) == 0.999


def test_a_run_with_the_callback_validates_and_checkpoints_with_the_average(shapes_dir, tmp_path):
    result = run_ldm(["fit", "-c", str(REPO / "configs/trainer/debug.yaml"), "-c", str(REPO / "tests/configs/toy.yaml"),
                      f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar",
                      "--data.num_workers=0", "--trainer.max_steps=6", "--trainer.max_epochs=-1",
                      "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
                      "--trainer.callbacks+=ldm.callbacks.EMAWarmup", "--trainer.callbacks.decay=0.99",
                      f"--run.root={tmp_path}/runs", "--run.version=v"], cwd=tmp_path, timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / "runs/toy/v/checkpoints/last.ckpt", weights_only=True)
    assert any("EMAWarmup" in k or "WeightAveraging" in k for k in ckpt.get("callbacks", {})), list(ckpt["callbacks"])
    assert isinstance(EMAWarmup(decay=0.99), EMAWarmup)
    with pytest.raises(ValueError, match="decay must be in"):
        EMAWarmup(decay=1.0)
