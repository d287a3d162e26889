"""The GPU preset (configs/trainer/gpu.yaml, issue 19) composes with every stage config, and a fit with it, moved
to the CPU, trains without a host sync between logging steps.

A host sync is an op that makes the host wait for the device: ``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``
(all ``aten._local_scalar_dense``), and ops whose output size depends on the data (``nonzero``, boolean indexing,
``masked_select``, ``unique``). On the CPU nothing waits, but the ops are the same: :class:`HostSyncs` (a
``TorchDispatchMode``, below autograd, so it sees what runs) records them during whole training steps of a real
``ldm fit`` run (data, model, fused AdamW, EMA, divergence guard, throughput monitor, progress bar, logging). What
it cannot see on a CPU: blocking host -> device copies (``tensor.to("cuda")`` of a CPU tensor) and ``.tolist()`` /
``.cpu()`` of CPU tensors; on a GPU, ``speed.sync_debug: warn`` (``torch.cuda.set_sync_debug_mode``) checks those.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import pytorch_lightning as L
import torch
import yaml
from pytorch_lightning.trainer.states import RunningStage
from torch.utils._python_dispatch import TorchDispatchMode

from ldm.callbacks.divergence import DivergenceGuard
from ldm.callbacks.ema import EMAWarmup
from ldm.callbacks.progress import LoggingStepProgressBar
from ldm.callbacks.speed import Speedups
from ldm.callbacks.throughput import SampleThroughput
from tests.conftest import REPO

GPU = str(REPO / "configs/trainer/gpu.yaml")
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
           "equal"}


class HostSyncs(TorchDispatchMode):
    """Records the ops run while it is active that would make the host wait for a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in SYNCING:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _Open(L.Callback):
    """First of the callbacks: starts recording a training batch (before every other hook of it)."""

    def __init__(self, steps: dict) -> None:
        self.steps, self.mode = steps, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.mode = HostSyncs().__enter__()
        self.steps[trainer.global_step] = (trainer._logger_connector.should_update_logs, self.mode.ops)


class _Close(L.Callback):
    """Last of the callbacks: stops recording once every callback's ``on_train_batch_end`` has run."""

    def __init__(self, opener: _Open) -> None:
        self.opener = opener

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.opener.mode.__exit__(None, None, None)


def _config(tmp_path: Path, shapes_dir: Path) -> str:
    """A pixel-space latent diffusion with a tiny U-Net, fused AdamW and a warmup EMA, on the shapes at 8 px."""
    config = {
        "model": {"class_path": "ldm.systems.LatentDiffusion", "init_args": {
            "unet": {"class_path": "ldm.diffusion.UNet", "init_args": {
                "in_channels": 3, "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                "attention_levels": [1], "heads": 2, "context_dim": None, "groups": 4}},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3, "fused": True}}}},
        "data": {"init_args": {"train": f"{shapes_dir}/train-*.tar", "image_size": 8, "batch_size": 2,
                               "num_workers": 0}},
        "trainer": {"callbacks": [{"class_path": "ldm.callbacks.EMAWarmup", "init_args": {"decay": 0.99}}]},
        "run": {"name": "gpu-preset", "root": str(tmp_path / "runs"), "version": "v", "wandb_mode": "disabled"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("stage", ["ldm/debug.yaml", "autoencoder/kl-f4-debug.yaml", "contrastive/clip-debug.yaml"])
def test_the_gpu_preset_composes_with_the_stage_configs(stage, capsys):
    from ldm.cli import LDMCLI

    with pytest.raises(SystemExit) as exit:
        LDMCLI(args=["fit", "-c", GPU, "-c", str(REPO / "configs" / stage), "--print_config"])
    assert exit.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["precision"] == "bf16-mixed" and config["trainer"]["accelerator"] == "gpu"
    assert config["speed"]["matmul_precision"] == "high" and config["speed"]["compile"] is True
    assert config["speed"]["channels_last"] is True
    assert config["model"]["class_path"].startswith("ldm.systems.")  # the stage's model, untouched


def test_a_fit_with_the_gpu_preset_on_the_cpu_makes_no_host_sync_between_logging_steps(shapes_dir, tmp_path):
    from ldm.cli import LDMCLI

    cli = LDMCLI(args=["-c", GPU, "-c", _config(tmp_path, shapes_dir), "--trainer.accelerator=cpu",
                       "--trainer.precision=32-true", "--speed.compile=false", "--trainer.max_steps=6",
                       "--trainer.log_every_n_steps=2", "--trainer.limit_val_batches=0",
                       "--trainer.enable_checkpointing=false"], run=False)
    trainer = cli.trainer
    kinds = {type(c) for c in trainer.callbacks}
    assert {Speedups, SampleThroughput, DivergenceGuard, EMAWarmup, LoggingStepProgressBar} <= kinds
    speed = next(c for c in trainer.callbacks if isinstance(c, Speedups))
    assert speed.channels_last and speed.matmul_precision == "high" and not speed.compile
    steps: dict[int, tuple[bool, list[str]]] = {}
    opener = _Open(steps)
    trainer.callbacks.insert(0, opener)
    trainer.callbacks.append(_Close(opener))
    trainer.fit(cli.model, datamodule=cli.datamodule)

    assert trainer.global_step == 6 and sorted(steps) == list(range(6))
    assert cli.model.optimizers().optimizer.param_groups[0]["fused"]
    conv = cli.model.unet.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    # steps 1, 3, 5 log (every 2nd batch): they read the metrics, on purpose; the first step reads the EMA's count
    logging = [s for s, (logs, _) in steps.items() if logs]
    assert logging == [1, 3, 5] and all(steps[s][1] for s in logging), steps
    quiet = {s: ops for s, (logs, ops) in steps.items() if not logs and s > 0}
    assert quiet.keys() == {2, 4} and not any(quiet.values()), quiet

    rows = list(csv.DictReader(open(Path(cli.run_dir) / "metrics.csv")))
    rates = [float(r["train/device/samples_per_sec"]) for r in rows if r.get("train/device/samples_per_sec")]
    # the clock is read on the 3 logging steps only: rates over a window of 2 readings at the 2nd and 3rd (read at
    # every batch, as Lightning's monitor does, the window would be full at all three)
    assert len(rates) == 2 and all(r > 0 for r in rates)
    monitor = next(c for c in trainer.callbacks if isinstance(c, SampleThroughput))
    assert monitor._throughputs[RunningStage.TRAINING]._samples[-1] == 6 * 2  # yet every batch is counted


def test_the_contrastive_system_counts_its_flops_for_mfu():
    """The throughput monitor logs MFU for systems that count their training FLOPs per sample (as the latent
    diffusion does): the CLIP's are 3 x its two towers' forward, the same as open_clip's own forward counts."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.contrastive import ClipLoss, OpenCLIP
    from ldm.systems import ContrastiveSystem

    torch.manual_seed(0)  # the towers of configs/contrastive/clip-debug.yaml
    clip = OpenCLIP(embed_dim=64, vision=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
                    text=CLIPTextCfg(context_length=32, width=64, heads=2, layers=2))
    system = ContrastiveSystem(clip, ClipLoss())
    batch = {"image": torch.randn(4, 3, 32, 32), "tokens": torch.randint(1, 100, (4, 32))}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        clip.clip(batch["image"][:1], batch["tokens"][:1])  # open_clip's CLIP forward: both towers
    assert system.flops_per_sample(batch) == 3 * counter.get_total_flops() > 0
    monitor = SampleThroughput()
    monitor._module_has_flops, monitor.available_flops = False, 989e12
    monitor.on_train_batch_start(None, system, batch, 0)
    assert system.flops_per_batch == 4 * system.flops_per_sample(batch)
