"""img2img, inpainting and DDIM inversion on the trained debug latent diffusion."""

from __future__ import annotations

import pytest
import torch

from ldm.data import ShardDataModule
from ldm.pipelines import SamplerSettings, TextToImage, img2img, inpaint, invert, reconstruct
from ldm.pipelines.editing import latent_mask
from tests.conftest import REPO, run_ldm
from tests.stages import DEBUG, LDM_DEBUG, fit, stage_args

GUIDE_SCALE = 1000.0
INPAINT_STEPS = 250
INPAINT_RATIO = 0.85  # measured 0.67 (250 steps, sigma 0.5; 0.85-0.91 at 150 steps with per-step seeds); untrained: exactly 1


def _batch(shapes_dir, n=4):
    dm = ShardDataModule(val=f"{shapes_dir}/val-*.tar", image_size=32, batch_size=n, num_workers=0)
    batch = next(iter(dm.val_dataloader()))
    return batch["image"], list(batch["text"])


def test_img2img_strength_moves_from_the_input_to_a_new_sample(ldm_run, shapes_dir):
    pipe = TextToImage(ldm_run.model.eval())
    images, prompts = _batch(shapes_dir)
    recon = pipe.system.first_stage.decode(pipe.system.first_stage.encode(images)).clamp(-1, 1)
    settings = SamplerSettings(sampler="ddim", steps=20, cfg=2.0, seed=3)
    light = img2img(pipe, images, prompts, settings, strength=0.1)
    full = img2img(pipe, images, prompts, settings, strength=1.0)
    assert light.shape == images.shape
    assert (light - recon).abs().mean() < 0.5 * (full - recon).abs().mean()
    assert torch.equal(img2img(pipe, images, prompts, settings, strength=0.1), light)  # deterministic


def test_inpainting_keeps_the_unmasked_region(ldm_run, shapes_dir):
    pipe = TextToImage(ldm_run.model.eval())
    images, prompts = _batch(shapes_dir)
    mask = torch.zeros(len(images), 1, 32, 32)
    mask[..., :, 16:] = 1  # regenerate the right half
    settings = SamplerSettings(sampler="dpmpp_2m", steps=10, cfg=2.0, seed=1)
    z0 = pipe.system.first_stage.encode(images)
    z = inpaint(pipe, images, mask, prompts, settings, decode=False)
    m = latent_mask(mask, z0.shape)
    assert torch.allclose(z * (1 - m), z0 * (1 - m), atol=1e-6)  # the known latents exactly
    assert (z * m - z0 * m).abs().mean() > 0.05  # the masked ones are new
    out = inpaint(pipe, images, mask, prompts, settings)
    assert out.shape == images.shape and torch.equal(out, pipe.system.first_stage.decode(z).clamp(-1, 1))
    # in pixels the unmasked region is then the autoencoder's decoding of the input's own latents; how close
    # that is to the input is the autoencoder's error (its decoder mixes latents across the mask's edge)


def test_ddim_inversion_round_trip(ldm_run, shapes_dir):
    pipe = TextToImage(ldm_run.model.eval())
    images, prompts = _batch(shapes_dir)
    settings = SamplerSettings(sampler="ddim", steps=50, cfg=1.0, seed=0)
    z0 = pipe.system.first_stage.encode(images)
    noise = invert(pipe, images, prompts, settings)
    assert noise.shape == z0.shape and not torch.allclose(noise, z0, atol=0.5)
    z = reconstruct(pipe, noise, prompts, settings, decode=False)
    error = (z - z0).norm() / z0.norm()
    assert error < 0.05, float(error)  # measured 0.028 (50 DDIM steps, guidance off, 4 validation scenes)


def test_attention_maps_are_one_per_word_and_differ(ldm_run, tmp_path):
    from ldm.pipelines.attention_maps import attention_maps, cross_attention_layers, save_attention_figure

    pipe = TextToImage(ldm_run.model.eval())
    image, maps, words = attention_maps(pipe, "a red circle left of a blue square",
                                        SamplerSettings(sampler="ddim", steps=6, cfg=3.0, seed=0), image_size=32)
    assert words == ["a", "red", "circle", "left", "of", "a", "blue", "square"]
    assert image.shape == (3, 32, 32) and maps.shape == (8, 32, 32) and torch.isfinite(maps).all()
    assert float(maps.min()) == 0.0 and float(maps.max()) == 1.0
    assert not torch.allclose(maps[1], maps[2], atol=1e-3) and not torch.allclose(maps[2], maps[7], atol=1e-3)
    # the probes are removed afterwards: sampling runs on the fast SDPA path again
    assert all(layer.probe is None for layer in cross_attention_layers(pipe.system.unet))
    path = save_attention_figure(image, maps, words, tmp_path / "attention.png", "a red circle left of a blue square")
    assert path.stat().st_size > 0
    res = run_ldm(["sample", "--ckpt", ldm_run.run_dir, "--prompt", "a red circle", "--steps", "3", "--quiet",
                   "--attention-maps", "--out", "s/grid.png"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "s/grid_attention.png").stat().st_size > 0


PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


@pytest.fixture(scope="module")
def eps_run(shapes_dir, stage_runs, tmp_path_factory):
    """The debug LDM with configs/ldm/debug-eps.yaml (eps prediction on SD's schedule), trained as ldm_run is."""
    root = tmp_path_factory.mktemp("ldm-eps")
    return fit(["-c", *DEBUG, "-c", LDM_DEBUG, "-c", str(REPO / "configs/ldm/debug-eps.yaml"), *stage_args(stage_runs),
                f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar",
                "--data.num_workers=0", "--data.batch_size=16", "--trainer.max_steps=56", "--trainer.max_epochs=-1",
                "--trainer.val_check_interval=1.0", "--trainer.limit_val_batches=2", f"--run.root={root}",
                "--run.version=v"])


def test_clip_guidance_raises_the_clip_similarity_to_the_prompt(eps_run):
    """On the eps-prediction debug model. (On the rectified-flow debug preset, ``ldm_run``, the same guidance raised
    the mean similarity by 0.045, under this test's 0.05: its sigma-space levels reach 999, against 14.6 for SD's
    schedule, so ``scale * sigma^2`` weights its first steps far more; not tuned for flow models.)"""
    from ldm.pipelines.clip_guidance import ClipGuided, clip_similarity

    system = eps_run.model.eval()
    clip = system.conditioner.text_encoder.model
    settings = SamplerSettings(sampler="ddim", steps=10, cfg=1.0, seed=0)
    plain = TextToImage(system)(PROMPTS, settings, image_size=32, progress=False)
    assert torch.equal(ClipGuided(system, scale=0.0)(PROMPTS, settings, image_size=32, progress=False), plain)
    before = clip_similarity(clip, plain, PROMPTS)
    guided = ClipGuided(system, scale=GUIDE_SCALE)(PROMPTS, settings, image_size=32, progress=False)
    after = clip_similarity(clip, guided, PROMPTS)
    assert float(after.mean()) > float(before.mean()) + 0.05, (before, after)
    through = ClipGuided(system, scale=GUIDE_SCALE, through_denoiser=True)(PROMPTS, settings, image_size=32,
                                                                          progress=False)
    assert float(clip_similarity(clip, through, PROMPTS).mean()) > float(before.mean()) + 0.05
    with pytest.raises(ValueError, match="noised CLIP reads noisy pixels"):
        ClipGuided(system, noised=True)


def test_noised_clip_guidance_on_a_pixel_space_model(ldm_run):
    """A pixel-space model (untrained) guided by a CLIP at the noisy input: the similarity rises."""
    from ldm.diffusion import Conditioner, UNet
    from ldm.pipelines.clip_guidance import ClipGuided, clip_similarity
    from ldm.systems import LatentDiffusion

    text_encoder = ldm_run.model.conditioner.text_encoder
    unet = UNet(in_channels=3, channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], heads=2,
                context_dim=text_encoder.width, groups=8)
    system = LatentDiffusion(unet, conditioner=Conditioner(text_encoder)).eval()
    settings = SamplerSettings(sampler="ddim", steps=8, cfg=1.0, seed=0)
    plain = TextToImage(system)(PROMPTS, settings, image_size=32, progress=False)
    guided = ClipGuided(system, scale=GUIDE_SCALE, noised=True)(PROMPTS, settings, image_size=32, progress=False)
    clip = text_encoder.model
    before, after = clip_similarity(clip, plain, PROMPTS), clip_similarity(clip, guided, PROMPTS)
    assert float(after.mean()) > float(before.mean()) + 0.05, (before, after)


def test_sample_cli_editing_modes(ldm_run, shapes_dir, tmp_path, monkeypatch, capsys):
    import json

    from ldm.data.transforms import to_pil
    from ldm.tools.sample import main

    monkeypatch.chdir(tmp_path)
    images, _ = _batch(shapes_dir, n=2)
    for i, image in enumerate(to_pil(images)):
        image.save(tmp_path / f"in{i}.png")
    common = ["--ckpt", str(ldm_run.run_dir), "--steps", "4", "--quiet"]
    assert main([*common, "--mode", "img2img", "--image", "in0.png", "--prompt", "a red circle", "--n", "2",
                 "--strength", "0.5", "--out", "a/grid.png"]) == 0
    record = json.loads((tmp_path / "a/grid.json").read_text())
    assert record["strength"] == 0.5 and len(record["images"]) == 2
    assert main([*common, "--mode", "inpaint", "--image", "in0.png", "--image", "in1.png", "--mask-box", "0.5,0,1,1",
                 "--prompt", "a blue square", "--out", "b/grid.png"]) == 0
    assert len(json.loads((tmp_path / "b/grid.json").read_text())["images"]) == 4  # input + mask, result; x2
    assert main([*common, "--mode", "invert", "--image", "in0.png", "--sampler", "ddim", "--steps", "30", "--cfg", "1",
                 "--out", "c/grid.png"]) == 0
    errors = json.loads((tmp_path / "c/grid.json").read_text())["latent_relative_error"]
    assert len(errors) == 1 and errors[0] < 0.1, errors
    assert main([*common, "--prompt", "a red circle", "--clip-guidance", "1000", "--out", "d/grid.png"]) == 0
    assert json.loads((tmp_path / "d/grid.json").read_text())["clip_guidance"]["scale"] == 1000
    # errors name what is wrong
    assert main([*common, "--mode", "variations", "--image", "in0.png", "--out", "x.png"]) == 2
    assert "needs a decoder conditioned on CLIP image embeddings" in capsys.readouterr().err
    assert main([*common, "--mode", "inpaint", "--image", "in0.png", "--prompt", "x", "--out", "x.png"]) == 2
    assert "--mask" in capsys.readouterr().err
    assert main([*common, "--mode", "inpaint", "--image", "in0.png", "--mask-box", "0.5,0,0.2,1", "--out", "x.png"]) == 2
    assert "left < right" in capsys.readouterr().err
    assert main([*common, "--mode", "img2img", "--image", "missing.png", "--prompt", "x", "--out", "x.png"]) == 2
    assert "missing.png: no such file" in capsys.readouterr().err
    assert main([*common, "--prompt", "x", "--clip-guidance", "10", "--noised-clip", "--out", "x.png"]) == 2
    assert "noised CLIP reads noisy pixels" in capsys.readouterr().err


def test_random_inpainting_masks():
    from ldm.diffusion.inpainting import inpaint_concat, random_masks

    masks = random_masks(400, 8, 8, p_full=0.25, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (400, 1, 8, 8) and set(masks.unique().tolist()) == {0.0, 1.0}
    full = (masks.flatten(1) == 1).all(1)
    assert abs(float(full.float().mean()) - 0.25) < 0.06
    covered = masks[~full].flatten(1).mean(1)  # one box of 2-6 x 2-6 latents out of 8 x 8
    assert float(covered.min()) >= 4 / 64 and float(covered.max()) <= 36 / 64
    z = torch.randn(400, 4, 8, 8)
    concat = inpaint_concat(z, masks)
    assert concat.shape == (400, 5, 8, 8) and torch.equal(concat[:, 4:], masks)
    assert torch.equal(concat[:, :4], z * (1 - masks))


@pytest.mark.slow  # a 150-step fit (about 28 s); the concat route's inputs are checked above without training
def test_inpainting_model_reads_the_known_region_through_its_concat_channels(shapes_dir, stage_runs, tmp_path):
    from tests.stages import DEBUG, fit, stage_args

    cli = fit(["-c", *DEBUG, "-c", str(REPO / "configs/ldm/debug-inpaint.yaml"), *stage_args(stage_runs),
               f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar", "--data.num_workers=0",
               "--data.batch_size=16", f"--trainer.max_steps={INPAINT_STEPS}", "--trainer.max_epochs=-1",
               "--trainer.limit_val_batches=0", "--trainer.callbacks=[]", f"--run.root={tmp_path}"])
    system = cli.model.eval()
    pipe = TextToImage(system)
    images, prompts = _batch(shapes_dir)
    z0 = system.first_stage.encode(images)
    mask = torch.zeros(len(images), 1, 32, 32)
    mask[..., :, 16:] = 1
    m = latent_mask(mask, z0.shape)
    # the prediction of the known half is closer to the known latents when the concat channels hold them than
    # when they say "generate everything" (at sigma 0.5; after 150 steps there is no gain yet at sigma >= 2)
    sigma = torch.full((len(z0),), 0.5)
    x = z0 + 0.5 * torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    settings = SamplerSettings()
    with torch.no_grad():
        informed = system.denoiser()(x, sigma, pipe.conditions(prompts, z0, settings, known=z0, mask=m)[0])
        blind = system.denoiser()(x, sigma, pipe.conditions(prompts, z0, settings)[0])
    err = lambda d: float(((d - z0) * (1 - m)).pow(2).sum() / (1 - m).expand_as(z0).sum())  # noqa: E731
    assert err(informed) < INPAINT_RATIO * err(blind), (err(informed), err(blind))
    settings = SamplerSettings(sampler="ddim", steps=8, cfg=2.0, seed=0)
    z = inpaint(pipe, images, mask, prompts, settings, decode=False)
    assert torch.allclose(z * (1 - m), z0 * (1 - m), atol=1e-6)
    assert pipe(prompts[:2], settings, image_size=32, progress=False).shape == (2, 3, 32, 32)  # text -> image too


def test_inpainting_settings_are_checked(shapes_dir, stage_runs):
    from ldm.cli import LDMCLI
    from tests.stages import DEBUG, stage_args

    base = ["-c", *DEBUG, "-c", str(REPO / "configs/ldm/debug-inpaint.yaml"), *stage_args(stage_runs),
            f"--data.train={shapes_dir}/train-*.tar"]
    with pytest.raises(ValueError, match="nothing fills them: set the conditioner.s inpainting: true"):
        LDMCLI(args=[*base, "--model.init_args.conditioner.init_args.inpainting=false"], run=False)
    with pytest.raises(ValueError, match="concat_channels = latent channels \\+ 1 = 5, got 4"):
        LDMCLI(args=[*base, "--model.init_args.unet.init_args.concat_channels=4"], run=False)


def test_sample_cli_inpaints_what_the_mask_covers_on_a_non_square_image(ldm_run, tmp_path, monkeypatch, capsys):
    """The input is centre-cropped, so the mask must be too: a mask over x 8..23 of a 64x32 image regenerates
    columns 0..7 of the 32 px square (shown magenta in the "input + mask" tile), not a stretched x 4..11."""
    import numpy as np
    from PIL import Image

    from ldm.tools.sample import main

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 32), (128, 128, 128)).save("wide.png")
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (8, 0, 24, 32))
    mask.save("mask.png")
    common = ["--ckpt", str(ldm_run.run_dir), "--steps", "2", "--quiet", "--mode", "inpaint", "--image", "wide.png",
              "--prompt", "a red circle", "--size", "32"]
    assert main([*common, "--mask", "mask.png", "--out", "a/grid.png"]) == 0
    shown = np.asarray(Image.open(next((tmp_path / "a/grid").glob("0000-*.png"))).convert("RGB")).astype(int)
    magenta = (shown == [255, 0, 255]).all(axis=-1)  # (32, 32)
    assert magenta.all(axis=0).nonzero()[0].tolist() == list(range(8))
    assert not magenta[:, 8:].any()
    Image.new("L", (32, 32), 255).save("square.png")
    assert main([*common, "--mask", "square.png", "--out", "b/grid.png"]) == 2
    assert "--mask square.png is 32x32 but --image wide.png is 64x32" in capsys.readouterr().err
