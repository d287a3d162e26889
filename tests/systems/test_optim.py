"""One optimizer convention (issue 15): ``optimizer`` + ``lr_scheduler`` callables, torch's schedulers, per-step.

Each system's default learning-rate curve equals the formula of its hand-written ``LambdaLR`` before the
change (copied here as the reference), the schedule survives a checkpoint round trip, and any torch
scheduler can be named in a config.
"""

from __future__ import annotations

import copy
import io
import math
from types import SimpleNamespace

import pytest
import pytorch_lightning as L
import torch
import yaml
from jsonargparse import ArgumentParser
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from pytorch_lightning.cli import ReduceLROnPlateau

from ldm.autoencoder import Autoencoder, AutoencoderLoss, Decoder, DiagonalGaussian, Encoder, PatchDiscriminator
from ldm.contrastive import ClipLoss, OpenCLIP
from ldm.diffusion import PriorTransformer
from ldm.systems import AutoencoderSystem, ContrastiveSystem, DiffusionPrior
from ldm.systems.optim import (
    LinearWarmup,
    WarmupCosine,
    build_scheduler,
    run_length,
    scheduler_config,
)
from ldm.systems.config_upgrades import upgrade_optimizer_config
from tests.conftest import REPO


# -- the formulas of the hand-written LambdaLRs before issue 15, verbatim ----------------------------------
def old_contrastive_factor(step: int, warmup_steps: int, total: int) -> float:
    """ldm/systems/contrastive.py, ``configure_optimizers``' ``schedule``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def old_warmup_factor(step: int, warmup_steps: int) -> float:
    """ldm/systems/optim.py ``warmup_scheduler`` (prior, latent diffusion) and the autoencoder's ``warmup``."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def lr_curve(opt: torch.optim.Optimizer, sched, steps: int, group: int = 0) -> list[float]:
    """The learning rate of each of ``steps`` optimizer steps, the scheduler stepped after each (as Lightning)."""
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[group]["lr"])
        opt.step()
        sched.step()
    return lrs


def assert_curve(lrs: list[float], reference: list[float], base_lr: float, at: list[int]) -> None:
    for step in at:  # torch's schedulers are recursive: equal up to float rounding, not bit for bit
        assert lrs[step] == pytest.approx(reference[step], rel=1e-12, abs=1e-12 * base_lr), step


def _clip_system(**kwargs) -> ContrastiveSystem:
    model = OpenCLIP(32, CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
                     CLIPTextCfg(context_length=16, width=32, heads=2, layers=1))
    return ContrastiveSystem(model, ClipLoss(), **kwargs)


def _autoencoder_system(**kwargs) -> AutoencoderSystem:
    ae = Autoencoder(Encoder(out_channels=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, groups=4),
                     Decoder(in_channels=4, channels=8, channel_mult=(1, 2), num_res_blocks=1, groups=4),
                     DiagonalGaussian(in_channels=8, latent_channels=4))
    loss = AutoencoderLoss(perceptual_weight=0.0, disc_start=3, discriminator=PatchDiscriminator(channels=8, layers=1))
    return AutoencoderSystem(ae, loss, **kwargs)


def _prior_system(**kwargs) -> DiffusionPrior:
    return DiffusionPrior(PriorTransformer(embed_dim=16, token_dim=16, max_tokens=4, width=32, layers=1, heads=2),
                          **kwargs)


def _attach(module: L.LightningModule, total: float) -> None:
    module.trainer = SimpleNamespace(estimated_stepping_batches=total)  # all configure_optimizers reads of it


# -- each system's default curve is the old one ---------------------------------------------------------------
def test_contrastive_default_is_adamw_with_the_old_warmup_and_cosine():
    system, total = _clip_system(), 1000
    _attach(system, total)
    config = system.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step" and isinstance(sched, WarmupCosine)
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 2
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    for g in opt.param_groups:
        assert (g["initial_lr"], g["betas"], g["eps"]) == (5e-4, (0.9, 0.98), 1e-6)
    curves = [[], []]
    for _ in range(total + 5):  # past the last step the old schedule stays at 0, so does this one
        for i, g in enumerate(opt.param_groups):
            curves[i].append(g["lr"])
        opt.step()
        sched.step()
    reference = [5e-4 * old_contrastive_factor(s, 100, total) for s in range(total + 5)]
    for lrs in curves:  # both groups: decay and no decay
        assert_curve(lrs, reference, 5e-4, at=[0, 99, 100, 550, total - 1, total + 4])
    assert curves[0][total - 1] > 0 and curves[0][total] == 0.0


def test_contrastive_schedule_runs_to_the_last_step_of_a_real_trainer(tmp_path):
    """In a real fit the schedule is stepped per optimizer step and ends at the trainer's last step."""
    system, total, warmup = _clip_system(lr_scheduler=lambda o: WarmupCosine(o, warmup_steps=3)), 12, 3
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.randn(4, 3, 16, 16, generator=g), "tokens": torch.randint(1, 400, (4, 16), generator=g)}
            for _ in range(total)]
    trainer = L.Trainer(accelerator="cpu", max_steps=total, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
                        default_root_dir=tmp_path)
    trainer.fit(system, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    reference = [5e-4 * old_contrastive_factor(s, warmup, total) for s in range(total)]
    assert len(seen) == total
    assert_curve(seen, reference, 5e-4, at=list(range(total)))


@pytest.mark.parametrize("warmup", [0, 5])
def test_autoencoder_both_optimizers_keep_the_old_warmup_then_constant(warmup):
    kwargs = {} if warmup == 0 else {"lr_scheduler": lambda o: LinearWarmup(o, warmup_steps=warmup)}
    system = _autoencoder_system(**kwargs)
    (opt_g, opt_d), (sched_g, sched_d) = system.configure_optimizers()
    for opt in (opt_g, opt_d):
        assert type(opt) is torch.optim.Adam and opt.param_groups[0]["betas"] == (0.5, 0.9)
    reference = [4.5e-6 * old_warmup_factor(s, warmup) for s in range(30)]
    at = [0, max(0, warmup - 1), warmup, 15, 29]
    for opt, sched in ((opt_g, sched_g), (opt_d, sched_d)):
        assert_curve(lr_curve(opt, sched, 30), reference, 4.5e-6, at)
    if warmup == 0:  # the default: exactly the optimizer's lr at every step
        assert {g["lr"] for g in opt_g.param_groups} == {4.5e-6}


def test_autoencoder_discriminator_schedule_starts_at_disc_start(tmp_path):
    """Each scheduler is stepped with its optimizer: the discriminator's warmup begins when it starts training."""
    system = _autoencoder_system(lr_scheduler=lambda o: LinearWarmup(o, warmup_steps=4),
                                 optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
                                 disc_optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    lrs = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            lrs.append([o.param_groups[0]["lr"] for o in trainer.optimizers])

    data = [{"image": torch.rand(2, 3, 16, 16) * 2 - 1} for _ in range(8)]
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
                        default_root_dir=tmp_path)
    trainer.fit(system, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    gen = [1e-3 * old_warmup_factor(s + 1, 4) for s in range(8)]  # after the step of batch s
    disc = [1e-3 * (old_warmup_factor(s - 3 + 1, 4) if s >= 3 else old_warmup_factor(0, 4)) for s in range(8)]
    assert [a for a, _ in lrs] == pytest.approx(gen, rel=1e-12)
    assert [b for _, b in lrs] == pytest.approx(disc, rel=1e-12)  # disc_start=3


@pytest.mark.parametrize("warmup", [0, 20])
def test_prior_default_adamw_and_old_warmup(warmup):
    kwargs = {} if warmup == 0 else {"lr_scheduler": lambda o: LinearWarmup(o, warmup_steps=warmup)}
    system = _prior_system(**kwargs)
    config = system.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["weight_decay"] == 6e-2
    reference = [1.1e-4 * old_warmup_factor(s, warmup) for s in range(60)]
    assert_curve(lr_curve(opt, sched, 60), reference, 1.1e-4, at=[0, max(0, warmup - 1), warmup, 40, 59])


@pytest.mark.parametrize("warmup", [0, 7])
def test_latent_diffusion_default_adamw_and_old_warmup(warmup):
    """AdamW lr 1e-4, wd 0 over the trainable parameters (the frozen first stage and text encoder are not)."""
    from ldm.diffusion import UNet
    from ldm.systems import LatentDiffusion

    unet = UNet(in_channels=3, channels=8, channel_mult=[1], num_res_blocks=1, attention_levels=[], context_dim=None,
                groups=4)
    kwargs = {} if warmup == 0 else {"lr_scheduler": lambda o: LinearWarmup(o, warmup_steps=warmup)}
    system = LatentDiffusion(unet, **kwargs)
    config = system.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["weight_decay"] == 0.0
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in unet.parameters())
    reference = [1e-4 * old_warmup_factor(s, warmup) for s in range(30)]
    assert_curve(lr_curve(opt, sched, 30), reference, 1e-4, at=[0, max(0, warmup - 1), warmup, 15, 29])


# -- the schedules themselves --------------------------------------------------------------------------------
def _opt(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


@pytest.mark.parametrize("warmup, total", [(0, 10), (1, 10), (5, 5), (5, 3), (10, 100)])
def test_warmup_cosine_equals_the_old_formula_everywhere(warmup, total):
    opt = _opt()
    sched = WarmupCosine(opt, warmup_steps=warmup, total_steps=total)
    lrs = lr_curve(opt, sched, total + 10)
    assert lrs == pytest.approx([old_contrastive_factor(s, warmup, total) for s in range(total + 10)], abs=1e-14)


def test_warmup_cosine_eta_min_and_its_end():
    opt = _opt(2.0)
    lrs = lr_curve(opt, WarmupCosine(opt, warmup_steps=2, total_steps=10, eta_min=0.5), 15)
    assert lrs[:3] == pytest.approx([1.0, 2.0, 2.0]) and lrs[10:] == [0.5] * 5
    assert lrs[6] == pytest.approx(0.5 + 1.5 * (1 + math.cos(math.pi * 4 / 8)) / 2)


def test_the_schedule_state_round_trips_a_weights_only_checkpoint():
    """Resume: optimizer + scheduler state saved at step 7 and loaded into freshly built ones (whose total the
    trainer would fill in anew) continue the uninterrupted curve exactly."""

    def build(total):
        torch.manual_seed(0)
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=1e-3)
        return opt, build_scheduler(lambda o: WarmupCosine(o, warmup_steps=3), opt, lambda: total)

    opt, sched = build(20)
    straight = lr_curve(opt, sched, 20)
    opt, sched = build(20)
    lr_curve(opt, sched, 7)
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain data only: ldm's checkpoints are read this way
    opt, sched = build(999)  # e.g. a resume with another max_steps: the checkpoint's schedule wins
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    assert sched.total_steps == 20
    assert lr_curve(opt, sched, 13) == straight[7:]


def test_a_schedule_without_its_length_says_what_to_set():
    sched = WarmupCosine(_opt(), warmup_steps=2)
    with pytest.raises(RuntimeError, match="total_steps"):
        sched.step()
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(lambda o: WarmupCosine(o), _opt())  # no trainer to ask (the autoencoder)
    with pytest.raises(ValueError, match="trainer.max_steps"):
        run_length(SimpleNamespace(trainer=SimpleNamespace(estimated_stepping_batches=float("inf"))))
    system = _autoencoder_system(lr_scheduler=WarmupCosine)
    with pytest.raises(ValueError, match="total_steps"):
        system.configure_optimizers()
    with pytest.raises(ValueError, match="warmup_steps"):
        LinearWarmup(_opt(), warmup_steps=-1)


def test_reduce_on_plateau_is_stepped_per_epoch_on_its_metric():
    config = scheduler_config(lambda o: ReduceLROnPlateau(o, monitor="val/loss"), _opt(), None)
    assert config["interval"] == "epoch" and config["monitor"] == "val/loss"


# -- configs name any torch scheduler; EMA's deep copy shares the callables ------------------------------------
def _from_config(model_cfg: dict) -> L.LightningModule:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model")
    return parser.instantiate(parser.parse_object({"model": model_cfg})).model


def test_any_torch_scheduler_can_be_named_in_the_config():
    cfg = yaml.safe_load((REPO / "configs/prior/debug.yaml").read_text())["model"]
    cfg["init_args"]["lr_scheduler"] = {"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
                                        "init_args": {"T_max": 1000}}
    system = _from_config(cfg)
    config = system.configure_optimizers()
    sched = config["lr_scheduler"]["scheduler"]
    assert type(sched) is torch.optim.lr_scheduler.CosineAnnealingLR and sched.T_max == 1000
    assert config["lr_scheduler"]["interval"] == "step"
    assert config["optimizer"].param_groups[0]["lr"] == 1e-3  # the config's AdamW


@pytest.mark.parametrize("config", ["contrastive/clip-debug.yaml", "prior/debug.yaml", "autoencoder/kl-f4-debug.yaml"])
def test_a_deep_copy_of_a_configured_system_shares_its_callables(config):
    """The EMA callback deep-copies the system: the callables jsonargparse built are shared, not copied."""
    system = _from_config(yaml.safe_load((REPO / "configs" / config).read_text())["model"])
    clone = copy.deepcopy(system)
    assert clone.optimizer_fn.value is system.optimizer_fn.value
    assert clone.lr_scheduler_fn.value is system.lr_scheduler_fn.value
    _attach(clone, 100)
    assert clone.configure_optimizers()  # and they still build the optimizers of the copy


# -- run folders from before the convention -----------------------------------------------------------------
def _as_before(model: dict) -> dict:
    """A shipped config's model section as the previous convention wrote it."""
    model = copy.deepcopy(model)
    args = model["init_args"]
    sched = args.pop("lr_scheduler")["init_args"]
    if model["class_path"].endswith("ContrastiveSystem"):
        opt = args.pop("optimizer")["init_args"]
        args.update(lr=opt["lr"], weight_decay=opt["weight_decay"], betas=opt["betas"], eps=opt["eps"])
    args["warmup_steps"] = sched["warmup_steps"]
    return model


@pytest.mark.parametrize("config", ["contrastive/clip-debug.yaml", "contrastive/siglip-vit-b16.yaml",
                                    "prior/vit-b.yaml", "autoencoder/vq-f4-debug.yaml"])
def test_an_old_config_is_upgraded_to_the_same_optimizer_and_schedule(config):
    now = yaml.safe_load((REPO / "configs" / config).read_text())["model"]
    old = _as_before(now)
    assert "warmup_steps" in old["init_args"] and upgrade_optimizer_config(now) is now
    assert upgrade_optimizer_config(old) == now
    assert old == _as_before(now)  # the caller's dict is left alone


def test_old_default_optimizers_by_import_path_are_upgraded():
    old = {"class_path": "ldm.systems.DiffusionPrior",
           "init_args": {"prior": {"class_path": "ldm.diffusion.PriorTransformer",
                                   "init_args": {"embed_dim": 16, "token_dim": 16, "max_tokens": 4, "width": 32,
                                                 "layers": 1, "heads": 2}},
                         "optimizer": "ldm.systems.prior._adamw", "warmup_steps": 3}}
    system = _from_config(upgrade_optimizer_config(old))
    config = system.configure_optimizers()
    assert config["optimizer"].param_groups[0]["lr"] == pytest.approx(1.1e-4 / 3)  # first warmup step
    assert config["optimizer"].param_groups[0]["weight_decay"] == 6e-2
    ae = upgrade_optimizer_config({"class_path": "ldm.systems.AutoencoderSystem",
                                   "init_args": {"optimizer": "ldm.systems.autoencoder._adam", "warmup_steps": 0}})
    assert ae["init_args"] == {"optimizer": "ldm.systems.autoencoder.ldm_adam",
                               "lr_scheduler": {"class_path": "ldm.systems.optim.LinearWarmup",
                                                "init_args": {"warmup_steps": 0}}}
