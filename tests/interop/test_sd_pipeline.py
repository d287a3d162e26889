"""End to end: a small random Stable-Diffusion-shaped diffusers pipeline, saved to a folder, imported with
``ldm convert diffusers`` and sampled by ldm, gives diffusers' ``StableDiffusionPipeline`` images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from ldm.cli import main  # noqa: E402
from ldm.pipelines.text_to_image import SamplerSettings, TextToImage  # noqa: E402
from tests.interop.tiny_sd import CFG, PROMPTS, SIZE, STEPS, reference_images, tiny_sd_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    pipe = tiny_sd_pipeline(root)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe", pipe


@pytest.fixture(scope="module")
def imported(pipeline_folder, tmp_path_factory):
    folder, _ = pipeline_folder
    run = tmp_path_factory.mktemp("runs") / "sd-tiny"
    assert main(["convert", "diffusers", str(folder), "--out", str(run)]) == 0
    return run


def test_the_imported_run_samples_diffusers_images(pipeline_folder, imported):
    _, pipe = pipeline_folder
    expected = reference_images(pipe)
    t2i = TextToImage.from_checkpoint(str(imported))
    got = t2i(PROMPTS, SamplerSettings(sampler="ddim", steps=STEPS, cfg=CFG, seed=0, spacing="trailing"),
              image_size=SIZE, progress=False)
    got = ((got + 1) / 2).clamp(0, 1)
    err = (got - expected).abs().max().item()
    print(f"DDIM: max abs difference to diffusers' StableDiffusionPipeline: {err:.2e}")
    assert err <= 1e-4, f"max abs difference to diffusers' StableDiffusionPipeline: {err:.2e}"
    assert expected.std() > 0.01  # a real image, not a constant


def test_dpm_solver_matches_too(pipeline_folder, imported):
    _, pipe = pipeline_folder
    ref = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=2, timestep_spacing="trailing")
    expected = reference_images(pipe, ref)
    t2i = TextToImage.from_checkpoint(str(imported))
    got = t2i(PROMPTS, SamplerSettings(sampler="dpmpp_2m", steps=STEPS, cfg=CFG, seed=0, spacing="trailing"),
              image_size=SIZE, progress=False)
    err = (((got + 1) / 2).clamp(0, 1) - expected).abs().max().item()
    print(f"DPM-Solver++(2M): max abs difference to diffusers: {err:.2e}")
    assert err <= 1e-4, f"DPM-Solver++(2M): max abs difference to diffusers: {err:.2e}"


def test_ldm_sample_on_the_imported_run_writes_the_same_pixels(pipeline_folder, imported, tmp_path):
    _, pipe = pipeline_folder
    expected = (reference_images(pipe).permute(0, 2, 3, 1).numpy() * 255).round()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "samples" / "grid.png"
    assert main(["sample", "--ckpt", str(imported), "--prompts", str(prompts), "--out", str(out), "--sampler", "ddim",
                 "--steps", str(STEPS), "--cfg", str(CFG), "--spacing", "trailing", "--size", str(SIZE),
                 "--seed", "0"]) == 0
    files = sorted((tmp_path / "samples" / "grid").glob("*.png"))  # one file per image beside the grid
    assert len(files) == 2
    for f, ref in zip(files, expected):
        pixels = np.asarray(Image.open(f).convert("RGB"), dtype=np.float64)
        assert np.abs(pixels - ref).max() <= 1, f"{f.name}: pixels differ from diffusers' by more than 1/255"


def test_the_imported_folder_is_a_run(imported):
    assert (imported / "config.yaml").is_file() and (imported / "autoencoder" / "config.yaml").is_file()
    assert "Imported from" in (imported / "IMPORTED.md").read_text()
    from ldm.systems import load_autoencoder, load_system

    system = load_system(imported)
    assert system.conditioner.null == "empty_prompt" and not system.conditioner.mask_padding
    ae = load_autoencoder(imported / "autoencoder")
    assert float(ae.scale_factor) == pytest.approx(0.18215)


def test_round_trip_back_to_diffusers(pipeline_folder, imported, tmp_path):
    folder, pipe = pipeline_folder
    out = tmp_path / "back"
    assert main(["convert", "to-diffusers", str(imported), "--out", str(out)]) == 0
    back = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: weights changed in the round trip"
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["beta_schedule"] == "scaled_linear"


def test_a_folder_that_is_not_a_pipeline_is_named(tmp_path, capsys):
    assert main(["convert", "diffusers", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_ldm_fit_fine_tunes_the_imported_run(imported, shapes_dir, tmp_path):
    """`ldm fit` with the imported run's config and init_from: training starts from the imported weights."""
    from ldm.systems import load_system
    from tests.stages import DEBUG, fit

    start = load_system(imported).unet.state_dict()
    cli = fit(["-c", *DEBUG, "-c", str(imported / "config.yaml"), f"--model.init_args.init_from={imported}",
               f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar", "--data.num_workers=0",
               "--data.image_size=16", "--data.batch_size=4", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
               f"--run.root={tmp_path}", "--run.version=v"])
    assert cli.model.unet is not None and cli.trainer.global_step == 2
    tuned = load_system(cli.run_dir, weights="raw").unet.state_dict()
    change = max((tuned[k] - start[k]).abs().max().item() for k in start)
    assert 0 < change < 0.01, f"largest weight change after 2 steps at lr 1e-4: {change}"  # moved a little, from there


def test_init_from_a_mismatched_run_names_the_keys(imported):
    from ldm.systems import load_system
    from ldm.systems.loading import load_weights_into

    with pytest.raises(ValueError, match="(?s)init_from .*do not fit.*unet"):  # an autoencoder run has no U-Net
        load_weights_into(load_system(imported), imported / "autoencoder")
