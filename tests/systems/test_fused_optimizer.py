"""Fused AdamW from a config (``fused: true`` in the optimizer's init_args, issue 19): on the CPU of torch 2.14 it
runs and takes the unfused steps; where the fused kernel cannot update a parameter it falls back, saying so; and
with it the divergence guard skips non-finite steps on the device and reads its counts on logging steps only."""

from __future__ import annotations

import logging

import pytest
import pytorch_lightning as L
import torch
from jsonargparse import ArgumentParser
from pytorch_lightning.cli import OptimizerCallable

from ldm.callbacks.divergence import DivergenceError, DivergenceGuard
from ldm.diffusion import UNet
from ldm.systems.optim import build_optimizer, fused_unsupported


def optimizer_from_config(**init_args) -> OptimizerCallable:
    """The callable jsonargparse builds from ``optimizer: {class_path: torch.optim.AdamW, init_args: ...}``."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--optimizer", type=OptimizerCallable)
    config = parser.parse_object({"optimizer": {"class_path": "torch.optim.AdamW", "init_args": init_args}})
    return parser.instantiate_classes(config).optimizer


def _steps(make_optimizer: OptimizerCallable, steps: int = 3) -> list[torch.Tensor]:
    """The U-Net's parameters after ``steps`` optimizer steps on fixed gradients (gradients drawn, not computed:
    through the network, rounding differences of a step change the next gradients, and Adam's normalised update
    amplifies them wherever a gradient is near 0, e.g. behind the zero-initialised output layer)."""
    torch.manual_seed(0)
    unet = UNet(in_channels=4, channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], heads=2,
                context_dim=8, groups=4)
    params = list(unet.parameters())
    opt = build_optimizer(make_optimizer, params)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
        opt.step()
    return [p.detach().clone() for p in params]


def test_fused_adamw_from_a_config_takes_the_unfused_steps_on_the_cpu():
    fused = optimizer_from_config(lr=1e-2, weight_decay=0.01, fused=True)
    assert build_optimizer(fused, [torch.nn.Parameter(torch.ones(2))]).param_groups[0]["fused"]  # no fallback here
    ours, ref = _steps(fused), _steps(optimizer_from_config(lr=1e-2, weight_decay=0.01))
    assert max((a - b).abs().max().item() for a, b in zip(ours, ref)) < 1e-6
    assert max((a - b).abs().max().item() for a, b in zip(ref, _steps(fused, 0))) > 1e-3  # the steps moved them


def test_a_parameter_the_fused_kernel_cannot_update_falls_back_with_a_logged_reason(caplog):
    param = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))  # the fused kernels take real tensors only
    with caplog.at_level(logging.WARNING, logger="ldm.systems.optim"):
        opt = build_optimizer(optimizer_from_config(lr=0.1, fused=True), [param])
    assert not opt.param_groups[0]["fused"] and not fused_unsupported(opt)
    assert "fused AdamW cannot update 1 parameters here (the first: torch.complex64 on cpu)" in caplog.text
    before = param.detach().clone()
    param.grad = torch.ones_like(param)
    opt.step()  # the fused step would raise here
    assert not torch.equal(param.detach(), before)


class _Regression(L.LightningModule):
    """A linear fit whose loss is NaN at ``nan_steps``, trained with fused AdamW."""

    def __init__(self, nan_steps: set[int]):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)
        self.nan_steps = nan_steps
        self.weights: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        return loss * float("nan") if self.global_step in self.nan_steps else loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.weights[self.global_step] = self.net.weight.detach().clone()  # after global_step optimizer steps

    def configure_optimizers(self):
        return optimizer_from_config(lr=0.1, fused=True)(self.parameters())

    def train_dataloader(self):
        x = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :2]), batch_size=4)


def _fit(tmp_path, nan_steps: set[int], guard: DivergenceGuard, max_steps: int = 8) -> _Regression:
    model = _Regression(nan_steps)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, log_every_n_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[guard], default_root_dir=tmp_path)
    trainer.fit(model)
    return model


def test_with_a_fused_optimizer_non_finite_steps_are_skipped_on_the_device_and_counted_at_logging_steps(
        tmp_path, caplog):
    guard = DivergenceGuard(patience=3)
    with caplog.at_level(logging.WARNING, logger="ldm.callbacks.divergence"):
        model = _fit(tmp_path, {1, 2, 5}, guard)
    w = model.weights
    assert torch.equal(w[1], w[2]) and torch.equal(w[2], w[3]) and torch.equal(w[5], w[6])  # steps 1, 2, 5 skipped
    assert not torch.equal(w[3], w[4]) and not torch.equal(w[6], w[7])
    assert guard.skipped == 3 and guard.in_a_row == 0
    # read at the logging steps (every 4th batch) and at the end, not at every step
    assert "steps 0-3: 2 training steps had a non-finite loss" in caplog.text
    assert "steps 4-7: 1 training steps" in caplog.text


def test_with_a_fused_optimizer_a_diverging_run_stops_at_the_next_reading(tmp_path):
    guard = DivergenceGuard(patience=3)
    with pytest.raises(DivergenceError, match=r"4 training steps in a row .* \(steps 4-7"):
        _fit(tmp_path, {4, 5, 6, 7, 8, 9, 10}, guard, max_steps=20)
    assert guard.skipped == 4  # stopped at the reading after batch 7, the fourth NaN in a row
