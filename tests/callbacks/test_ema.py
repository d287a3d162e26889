"""EMA (issue 15): the warmup equals diffusers' EMAModel(use_ema_warmup=True), step by step and in a run; every
checkpoint keeps the raw weights beside the average, also those written after training ended."""

from __future__ import annotations

import pytest
import pytorch_lightning as L
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import AveragedModel

from ldm.callbacks.ema import EMA, EMAWarmup, ema_warmup_multi_avg_fn, warmup_decay
from tests.conftest import REPO, run_ldm


def test_the_average_equals_diffusers_ema_model_with_warmup():
    diffusers_training = pytest.importorskip("diffusers.training_utils")
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


class _Regression(L.LightningModule):
    """y = x W: SGD steps on 20 fixed samples in batches of 4 (an epoch is 5 steps), deterministic on the CPU."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :2] * 3 - 1), batch_size=4)


def _fit(tmp_path, name: str, callback=None, max_steps: int = 5, ckpt_path=None) -> tuple[L.Trainer, dict]:
    """Fit; save a checkpoint after fitting, as ``ldm fit`` writes its final ``last.ckpt``."""
    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback] if callback else [], default_root_dir=tmp_path)
    trainer.fit(_Regression(), ckpt_path=ckpt_path)
    trainer.save_checkpoint(tmp_path / f"{name}.ckpt")
    return trainer, torch.load(tmp_path / f"{name}.ckpt", weights_only=True)


@pytest.mark.parametrize("callback", [lambda: EMA(decay=0.5), lambda: EMAWarmup(decay=0.5)], ids=["EMA", "EMAWarmup"])
def test_a_checkpoint_written_after_training_keeps_the_raw_weights(tmp_path, callback):
    _, plain = _fit(tmp_path, "plain")  # the same steps without EMA: the raw weights at the end
    trainer, ours = _fit(tmp_path, "ema", callback())
    raw, average = ours["current_model_state"], ours["state_dict"]
    assert raw.keys() == average.keys() == plain["state_dict"].keys()
    for k in plain["state_dict"]:
        assert torch.equal(raw[k], plain["state_dict"][k]), k
        assert not torch.allclose(average[k], raw[k], atol=1e-3), k
        assert torch.equal(average[k], trainer.lightning_module.state_dict()[k])  # the model holds the average


def test_lightnings_own_callback_loses_the_raw_weights_after_training(tmp_path):
    """Why :class:`ldm.callbacks.ema.KeepRawWeights` exists (if Lightning fixes this, the test says so)."""
    _, ours = _fit(tmp_path, "ours", EMA(decay=0.5))
    _, lightnings = _fit(tmp_path, "lightning", EMAWeightAveraging(decay=0.5))
    for k, average in lightnings["state_dict"].items():
        assert torch.equal(average, ours["state_dict"][k])  # the same average
        assert torch.equal(lightnings["current_model_state"][k], average)  # and no raw weights


def test_training_on_from_the_final_checkpoint_continues_from_the_raw_weights(tmp_path):
    """A run extended from its final ``last.ckpt`` (``ckpt_path``, more ``max_steps``) trains on from the raw
    weights, as the same run without EMA does; with Lightning's own callback it would train on from the average."""
    def extended(name, callback):
        _fit(tmp_path, name, callback() if callback else None, max_steps=5)
        return _fit(tmp_path, f"{name}-on", callback() if callback else None, max_steps=8,
                    ckpt_path=tmp_path / f"{name}.ckpt")[1]

    plain = extended("plain", None)["state_dict"]
    ours = extended("ours", lambda: EMA(decay=0.5))["current_model_state"]
    lightnings = extended("lightning", lambda: EMAWeightAveraging(decay=0.5))["current_model_state"]
    for k, v in plain.items():
        assert torch.equal(ours[k], v), k
        assert not torch.allclose(lightnings[k], v, atol=1e-3), k


def test_the_averaged_copy_is_read_through_the_public_accessor():
    from types import SimpleNamespace

    from ldm.callbacks.ema import averaged_module

    ema, model = EMA(decay=0.9), torch.nn.Linear(2, 2)
    assert ema.averaged_module() is None  # before training sets it up
    trainer = SimpleNamespace(callbacks=[ema])
    assert averaged_module(trainer, model) is model  # no average yet: the live weights
    ema._average_model = AveragedModel(model)  # what WeightAveraging.setup makes
    assert averaged_module(trainer, model) is ema._average_model.module is ema.averaged_module()
