"""Sampling in bf16 / fp16 autocast (``--precision``) and with the EMA or the raw weights (``--weights``), issue 15.

One tiny pixel-space latent-diffusion run (a 2-level U-Net with self-attention, 16 px shapes), trained for 30
steps with :class:`ldm.callbacks.ema.EMA`, serves every test: sampled through the Python API and through the
real ``ldm sample`` / ``ldm eval`` entry points.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from ldm.checkpoint_files import find_checkpoint
from ldm.cli import LDMCLI
from ldm.pipelines import SamplerSettings, TextToImage
from ldm.pipelines.precision import (
    PrecisionPipe,
    autocast_denoiser,
    autocast_dtype,
    parse_precision,
    sampling_precision,
)
from ldm.systems.loading import load_latent_diffusion, load_system
from tests.conftest import REPO

TINY = {
    "model": {"class_path": "ldm.systems.LatentDiffusion", "init_args": {
        "unet": {"class_path": "ldm.diffusion.UNet", "init_args": {
            "in_channels": 3, "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
            "heads": 2, "context_dim": None, "groups": 8}},
        "first_stage": {"class_path": "ldm.autoencoder.IdentityFirstStage"},
        "precond": {"class_path": "ldm.diffusion.EpsPrecond", "init_args": {
            "schedule": {"class_path": "ldm.diffusion.DiscreteSchedule", "init_args": {"beta_schedule": "linear"}}}},
        "cond_drop": 0.0,
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3.0e-3, "weight_decay": 0.0}}}},
    "data": {"class_path": "ldm.data.ShardDataModule",
             "init_args": {"image_size": 16, "batch_size": 8, "num_workers": 0, "crop": "center"}},
    "run": {"name": "tiny"},
}
SETTINGS = SamplerSettings(sampler="dpmpp_2m", steps=10, cfg=1.0, seed=0)


@pytest.fixture(scope="module")
def ema_run(shapes_dir, tmp_path_factory) -> Path:
    """The tiny unconditional pixel-space run, 30 steps with EMA (decay 0.9): its run folder."""
    root = tmp_path_factory.mktemp("tiny-ema")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    cli = LDMCLI(args=["fit", "-c", str(REPO / "configs/trainer/debug.yaml"), "-c", str(config),
                       f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar",
                       "--trainer.max_steps=30", "--trainer.max_epochs=-1", "--trainer.limit_val_batches=0",
                       "--trainer.enable_progress_bar=false", "--run.wandb_mode=disabled",
                       "--trainer.callbacks+=ldm.callbacks.ema.EMA", "--trainer.callbacks.decay=0.9",
                       f"--run.root={root}", "--run.version=v", "--seed_everything=1"])
    return Path(cli.run_dir)


def _max_difference(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


# -- precision ---------------------------------------------------------------------------------------------------

def test_precision_names_are_lightnings_and_a_bad_one_lists_the_allowed_values():
    assert [parse_precision(p) for p in ("32-true", "32", 32, "bf16-mixed", "bf16", "16-mixed", "16", "fp16")] == [
        "32-true", "32-true", "32-true", "bf16-mixed", "bf16-mixed", "16-mixed", "16-mixed", "16-mixed"]
    assert autocast_dtype("bf16") == torch.bfloat16 and autocast_dtype("fp16") == torch.float16
    assert autocast_dtype("32") is None
    with pytest.raises(ValueError, match=r"'fp8' is not a sampling precision: choose one of 32-true, 32, bf16-mixed"):
        parse_precision("fp8")
    with pytest.raises(ValueError, match="bf16-true"), sampling_precision("bf16-true"):
        pass


def test_the_context_autocasts_matmuls_on_the_modules_device_and_32_true_turns_an_outer_one_off():
    net = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    for name, dtype in (("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)):
        with sampling_precision(name, net):
            assert net(x).dtype == dtype
            assert (x * 2).dtype == torch.float32  # element-wise arithmetic is not autocast
    with torch.autocast("cpu", dtype=torch.bfloat16), sampling_precision("32-true", net):
        assert net(x).dtype == torch.float32


def test_bf16_and_fp16_samples_are_finite_float32_and_close_to_float32_ones(ema_run):
    """Measured on this run (10 dpmpp_2m steps, 8 images, 55 % of the pixels inside (-1, 1)): bf16 differs from
    fp32 by at most 0.039 per pixel (of a [-1, 1] range), 0.0018 on average, 0.42 % in relative L2; fp16 by about
    ten times less (0.003, 0.0002, 0.05 %). The bounds leave 2.5-5x headroom."""
    system = load_latent_diffusion(ema_run)
    pipe = TextToImage(system)
    prompts = [""] * 8
    ref = pipe(prompts, SETTINGS, image_size=16, progress=False)
    assert (ref.abs() < 0.99).float().mean() > 0.3  # trained enough that most pixels are not clipped
    for name, (max_abs, mean_abs, rel) in {"bf16-mixed": (0.1, 0.01, 0.02), "16-mixed": (0.02, 0.002, 0.004)}.items():
        seen = []  # the dtype of every U-Net output
        hook = system.unet.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
        x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 5.0])
        with sampling_precision(name, system):
            x0 = system.denoiser()(x, sigma)
        wrapped = autocast_denoiser(system.denoiser(), name, system)(x, sigma)
        hook.remove()
        assert seen == [autocast_dtype(name)] * 2  # the network ran in low precision ...
        assert x0.dtype == wrapped.dtype == torch.float32  # ... its x0 estimate is float32
        assert torch.equal(x0, wrapped)
        out = PrecisionPipe(pipe, name)(prompts, SETTINGS, image_size=16, progress=False)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        diff = out - ref
        assert 0 < diff.abs().max() < max_abs, (name, diff.abs().max())
        assert diff.abs().mean() < mean_abs, (name, diff.abs().mean())
        assert diff.norm() / ref.norm() < rel, (name, diff.norm() / ref.norm())


def test_sample_cli_precision_is_recorded_and_a_bad_value_is_refused(ema_run, tmp_path, capsys):
    from ldm.tools.sample import main

    common = ["--ckpt", str(ema_run), "--prompt", "", "--n", "4", "--steps", "10", "--cfg", "1", "--quiet",
              "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "fp32.png")]) == 0
    assert main([*common, "--precision", "bf16", "--out", str(tmp_path / "bf16.png")]) == 0
    fp32, bf16 = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("fp32", "bf16"))
    assert (fp32["precision"], bf16["precision"]) == ("32-true", "bf16-mixed")
    assert fp32["weights"] == bf16["weights"] == "ema"
    a, b = (torch.tensor([_pixels(f["file"]) for f in r["images"]], dtype=torch.float32) for r in (fp32, bf16))
    assert 0 < (a - b).abs().mean() < 0.01 * 255 / 2  # the images of the tolerance test above, as 8-bit PNGs
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--precision", "fp8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --precision" in err and "choose one of 32-true, 32, bf16-mixed, bf16, 16-mixed, 16, fp16" in err


def _pixels(path) -> list[int]:
    from PIL import Image

    with Image.open(path) as im:
        return list(im.convert("RGB").tobytes())


# -- EMA or raw weights ------------------------------------------------------------------------------------------

def test_every_checkpoint_of_an_ema_run_keeps_the_raw_weights_beside_the_average(ema_run):
    """``last.ckpt`` is written after training ended, when Lightning has copied the average into the model."""
    files = sorted((ema_run / "checkpoints").glob("*.ckpt"))
    assert find_checkpoint(ema_run).name == "last.ckpt" and files
    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state["global_step"] == 30
        ema, raw = state["state_dict"], state["current_model_state"]
        assert ema.keys() == raw.keys()
        assert _max_difference(raw, ema) > 1e-3, path.name  # decay 0.9 over 30 steps: they differ


def test_load_system_loads_the_raw_or_the_ema_weights(ema_run):
    state = torch.load(ema_run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    for weights, key in (("ema", "state_dict"), ("raw", "current_model_state")):
        loaded = load_system(ema_run, weights=weights).state_dict()
        assert _max_difference(loaded, state[key]) == 0, weights
    with pytest.raises(ValueError, match="weights must be one of ema, raw, got 'average'"):
        load_system(ema_run, weights="average")


def test_a_run_without_ema_has_one_set_of_weights_for_both_and_says_so(ema_run, tmp_path, caplog):
    run = _copy_run(ema_run, tmp_path / "plain", drop_ema=True)
    with caplog.at_level(logging.INFO, logger="ldm.systems.loading"):
        raw = load_system(run, weights="raw").state_dict()
        ema = load_system(run, weights="ema").state_dict()
    assert _max_difference(raw, ema) == 0
    notes = [r for r in caplog.records if "holds no EMA weights" in r.getMessage()]
    assert [r.levelno for r in notes] == [logging.WARNING, logging.INFO], notes
    assert "raw and EMA are the same" in notes[0].getMessage()


def test_raw_weights_lost_by_lightnings_own_callback_are_an_error_not_the_average(ema_run, tmp_path):
    """Lightning's ``EMAWeightAveraging`` writes the average as ``current_model_state`` after training ended."""
    run = _copy_run(ema_run, tmp_path / "lost", lose_raw=True)
    with pytest.raises(ValueError, match=r"holds only EMA weights: its raw weights \(current_model_state\) are the "
                                         "average too"):
        load_system(run, weights="raw")
    assert load_system(run, weights="ema") is not None


def _copy_run(run: Path, to: Path, *, drop_ema: bool = False, lose_raw: bool = False) -> Path:
    (to / "checkpoints").mkdir(parents=True)
    (to / "config.yaml").write_text((run / "config.yaml").read_text())
    state = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    if drop_ema:
        state["state_dict"] = state.pop("current_model_state")
        state.pop("averaging_state", None)
    if lose_raw:
        state["current_model_state"] = dict(state["state_dict"])
    torch.save(state, to / "checkpoints/last.ckpt")
    return to


def test_sample_and_eval_with_raw_or_ema_weights(ema_run, tmp_path, inception_file):
    from ldm.tools.evaluate import main as evaluate
    from ldm.tools.sample import main as sample

    common = ["--ckpt", str(ema_run), "--prompt", "", "--n", "2", "--steps", "10", "--cfg", "1", "--quiet",
              "--device", "cpu"]
    assert sample([*common, "--out", str(tmp_path / "ema.png")]) == 0
    assert sample([*common, "--weights", "raw", "--out", str(tmp_path / "raw.png")]) == 0
    records = {w: json.loads((tmp_path / f"{w}.json").read_text()) for w in ("ema", "raw")}
    assert records["raw"]["weights"] == "raw" and records["ema"]["weights"] == "ema"
    a, b = (torch.tensor([_pixels(f["file"]) for f in records[w]["images"]], dtype=torch.float32) for w in records)
    assert (a - b).abs().mean() > 5  # different weights, different images (same seeds)

    out = tmp_path / "eval"
    assert evaluate(["--ckpt", str(ema_run), "--n", "4", "--steps", "2", "--cfg", "1", "--no-clip", "--no-cache",
                     "--batch-size", "4", "--weights", "raw", "--precision", "bf16-mixed", "--device", "cpu",
                     "--inception", str(inception_file), "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["weights"], report["precision"]) == ("raw", "bf16-mixed")
    assert "RAW weights, bf16-mixed" in (out / "report.md").read_text()
