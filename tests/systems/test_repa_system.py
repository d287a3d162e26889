"""REPA and patch masking in the latent-diffusion system: configs/dit/debug-repa.yaml (the debug DiT aligned with the
session's debug CLIP run, half of its tokens masked, unmasked from a given step) trains through `ldm fit`, logs
train/repa, keeps the encoder out of the checkpoint and loads back; on latent shards REPA sees the first stage's
decoding; REPA refuses what it cannot align."""

import pytest
import torch

from ldm.checkpoint_files import find_checkpoint, load_checkpoint_file
from ldm.diffusion import DiT, MMDiT, UNet
from ldm.diffusion.repa import FrozenImageEncoder, RepresentationAlignment
from ldm.systems import LatentDiffusion
from ldm.systems.loading import load_latent_diffusion
from tests.conftest import REPO
from tests.stages import DEBUG, LDM_DEBUG, fit, stage_args

DIT = str(REPO / "configs/dit/debug.yaml")
REPA = str(REPO / "configs/dit/debug-repa.yaml")


@pytest.mark.slow  # make test-all (keeps make test within its 15 minutes)
def test_the_repa_preset_trains_with_masking_and_an_unmasked_phase(shapes_dir, stage_runs, tmp_path):
    cli = fit(["-c", *DEBUG, "-c", LDM_DEBUG, "-c", DIT, "-c", REPA, *stage_args(stage_runs),
               f"--model.init_args.repa.init_args.encoder.init_args.checkpoint={stage_runs['clip']}",
               "--model.init_args.unmask_after_steps=6", f"--data.train={shapes_dir}/train-*.tar",
               f"--data.val={shapes_dir}/val-*.tar", "--data.num_workers=0", "--data.batch_size=16",
               "--trainer.max_steps=7", "--trainer.max_epochs=-1", "--trainer.val_check_interval=7",
               "--trainer.limit_val_batches=1", f"--run.root={tmp_path}", "--run.version=v"])
    model = cli.model
    assert isinstance(model.unet, DiT) and isinstance(model.repa, RepresentationAlignment)
    assert model.unet.mask_token is not None and model.unet.mask_ratio == 0.0  # unmasked from step 6 on
    metrics = cli.trainer.callback_metrics
    repa, denoise, total = (float(metrics[k]) for k in ("train/repa", "train/loss_denoise", "train/loss"))
    assert -1.0 <= repa <= 1.0 and denoise > 0
    assert total == pytest.approx(denoise + 0.5 * repa, rel=1e-5)  # train/loss: what the optimizer minimised
    assert torch.isfinite(metrics["val/loss"])
    # the projector trained with the backbone; the encoder is frozen and left out of the checkpoint
    state = load_checkpoint_file(find_checkpoint(cli.run_dir), map_location="cpu")["state_dict"]
    assert any(k.startswith("repa.projector.") for k in state)
    assert not any(k.startswith("repa.encoder.") for k in state)
    opt_params = {id(p) for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in opt_params for p in model.repa.projector.parameters())
    assert not any(id(p) in opt_params for p in model.repa.encoder.parameters())
    loaded = load_latent_diffusion(cli.run_dir)  # the encoder rebuilt from its config, strict loading
    assert torch.equal(loaded.repa.projector[0].weight, state["repa.projector.0.weight"])


def small_system(unet, **kwargs) -> LatentDiffusion:
    return LatentDiffusion(unet, cond_drop=0.0, **kwargs)


def test_repa_on_precomputed_latents_aligns_with_the_first_stages_decoding(stage_runs):
    """Latent shards carry no image: REPA's encoder then sees the first stage's decoding of the latent. In pixel
    space (identity first stage) that is the latent itself, so the step equals the step on the same images."""
    encoder = FrozenImageEncoder(checkpoint=str(stage_runs["clip"]))
    dit = DiT(in_channels=3, patch_size=8, hidden_size=32, depth=2, num_heads=4)  # pixel space, 32 px: 4 x 4 tokens
    system = small_system(dit, repa=RepresentationAlignment(encoder, depth=1, hidden=32))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(0)
    on_latents = system.training_step({"latent": x}, 0)
    torch.manual_seed(0)
    on_images = system.training_step({"image": x}, 0)
    assert torch.isfinite(on_latents) and torch.equal(on_latents, on_images)
    assert torch.equal(system.clean_images({"latent": x * 3}), (x * 3).clamp(-1, 1))  # decoded images are clamped


def test_repa_needs_a_transformer(stage_runs):
    encoder = FrozenImageEncoder(checkpoint=str(stage_runs["clip"]))
    assert encoder.width == 64
    with pytest.raises(TypeError, match="transformer backbone with blocks"):
        small_system(UNet(in_channels=3, channels=32, channel_mult=[1], num_res_blocks=1, attention_levels=[],
                          groups=8), repa=RepresentationAlignment(encoder, depth=1, hidden=32))
    with pytest.raises(ValueError, match="unmask_after_steps turns off patch masking"):
        small_system(UNet(in_channels=3, channels=32, channel_mult=[1], num_res_blocks=1, attention_levels=[],
                          groups=8), unmask_after_steps=10)


def test_an_mmdit_trains_with_repa_and_patch_masking_then_unmasked(stage_runs):
    """The system's REPA and unmasked phase work on SD3's MMDiT as on the DiT: a training step with half the image
    tokens masked gives the denoising + weighted alignment loss; from ``unmask_after_steps`` on nothing is masked."""
    encoder = FrozenImageEncoder(checkpoint=str(stage_runs["clip"]))
    mmdit = MMDiT(in_channels=3, patch_size=8, hidden_size=32, depth=2, num_heads=4, context_dim=8, mask_ratio=0.5)
    system = small_system(mmdit, repa=RepresentationAlignment(encoder, depth=1, hidden=32), unmask_after_steps=0)
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1}
    cond = {"context": torch.randn(2, 3, 8)}
    system.condition = lambda batch: dict(cond)  # the conditioner's output; the tiny text width has no encoder
    loss = system.training_step(batch, 0)
    assert torch.isfinite(loss) and mmdit.last_kept.shape == (2, 8)  # 16 tokens, 8 kept
    system.on_train_batch_start(batch, 0)  # global step 0 >= unmask_after_steps
    system.training_step(batch, 0)
    assert mmdit.mask_ratio == 0.0 and mmdit.last_kept is None
