"""The latent-diffusion system end to end on the shapes: training, both input paths, sampling, reload."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from ldm.cli import LDMCLI
from ldm.data import ShardDataModule
from ldm.data.precompute import precompute_embeddings, precompute_latents
from ldm.pipelines import SamplerSettings, TextToImage
from ldm.systems import LatentDiffusion
from tests.conftest import run_ldm
from tests.stages import DEBUG, LDM_DEBUG, stage_args


def _system(shapes_dir, stage_runs, *extra: str) -> LatentDiffusion:
    cli = LDMCLI(args=["-c", *DEBUG, "-c", LDM_DEBUG, *stage_args(stage_runs), f"--data.train={shapes_dir}/train-*.tar",
                       *extra], run=False)
    return cli.model


def _column(path, name):
    with open(path) as f:
        return [float(r[name]) for r in csv.DictReader(f) if r.get(name)]


def test_the_debug_run_lowers_the_validation_loss(ldm_run):
    val = _column(f"{ldm_run.run_dir}/metrics.csv", "val/loss")
    assert len(val) == 8
    assert val[-1] < 0.8 * val[0], val
    levels = [k for k in open(f"{ldm_run.run_dir}/metrics.csv").readline().strip().split(",") if k.startswith("val/loss_t")]
    assert levels == ["val/loss_t100", "val/loss_t300", "val/loss_t500", "val/loss_t700", "val/loss_t900"]
    grids = sorted((Path(ldm_run.run_dir) / "images").glob("samples-*.png"))
    assert grids and grids[-1].name == "samples-step0000056.png"  # sampled at the end with the EMA weights


def test_validation_noise_is_fixed(ldm_run):
    a = ldm_run.trainer.validate(ldm_run.model, datamodule=ldm_run.datamodule, verbose=False)[0]["val/loss"]
    b = ldm_run.trainer.validate(ldm_run.model, datamodule=ldm_run.datamodule, verbose=False)[0]["val/loss"]
    assert a == b


def test_save_reload_gives_identical_samples(ldm_run):
    settings = SamplerSettings(sampler="dpmpp_2m", steps=6, cfg=3.0, seed=7)
    prompts = ["a red circle", "a blue square left of a green star"]
    live = TextToImage(ldm_run.model.eval())(prompts, settings, image_size=32, progress=False)
    loaded = TextToImage.from_checkpoint(ldm_run.run_dir)
    again = loaded(prompts, settings, image_size=32, progress=False)
    assert live.shape == (2, 3, 32, 32)
    assert torch.equal(live, again)
    # an image depends on its seed and prompt, not on its batch
    single = TextToImage(loaded.system, batch_size=1)(prompts, settings, image_size=32, progress=False)
    assert torch.allclose(single, again, atol=1e-5)
    other_seed = loaded(prompts, SamplerSettings(steps=6, cfg=3.0, seed=8), image_size=32, progress=False)
    assert not torch.allclose(other_seed, again)


def test_condition_dropout_rate_is_p(shapes_dir, stage_runs):
    system = _system(shapes_dir, stage_runs, "--model.init_args.cond_drop=0.3")
    tokens = system.tokenizer(["a red circle"] * 2000)
    cond = system.condition({"tokens": tokens})
    dropped, mask = system.conditioner.drop(cond, system.cond_drop, torch.Generator().manual_seed(0))
    assert abs(mask.float().mean().item() - 0.3) < 0.03
    assert torch.count_nonzero(dropped["context"][mask]) == 0 and dropped["context_mask"][mask].all()
    assert torch.equal(dropped["context"][~mask], cond["context"][~mask])
    assert torch.equal(dropped["context_mask"][~mask], cond["context_mask"][~mask])


def test_image_and_precomputed_paths_give_the_same_loss(shapes_dir, stage_runs, tmp_path):
    system = _system(shapes_dir, stage_runs).eval()
    precompute_embeddings(system.conditioner.text_encoder, f"{shapes_dir}/val-*.tar", tmp_path / "emb", progress=False)
    precompute_latents(system.first_stage.autoencoder, f"{tmp_path}/emb/val-*.tar", tmp_path / "lat", size=32,
                       progress=False)
    images = ShardDataModule(val=f"{shapes_dir}/val-*.tar", image_size=32, batch_size=12, num_workers=0,
                             crop="center", flip=False, tokenizer=system.tokenizer)
    latents = ShardDataModule(val=f"{tmp_path}/lat/val-*.tar", decode_images=False, batch_size=12, num_workers=0)
    a, b = next(iter(images.val_dataloader())), next(iter(latents.val_dataloader()))
    assert a["key"] == b["key"] and "image" not in b and "latent" not in a
    sigma = torch.linspace(0.1, 10.0, 12)
    noise = torch.randn(12, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        za, zb = system.latents(a), system.latents(b)
        ca, cb = system.condition(a), system.condition(b)
        la = system.loss(system.precond, system.unet, za, ca, sigma=sigma, noise=noise)
        lb = system.loss(system.precond, system.unet, zb, cb, sigma=sigma, noise=noise)
    assert torch.allclose(za, zb, atol=1e-5) and torch.allclose(ca["context"], cb["context"], atol=1e-5)
    assert torch.equal(ca["context_mask"], cb["context_mask"])
    assert torch.allclose(la, lb, rtol=1e-4, atol=1e-6)


def test_mismatched_stages_are_named(shapes_dir, stage_runs):
    with pytest.raises(ValueError, match="context_dim is 32 but the text encoder's token features are 64 wide"):
        _system(shapes_dir, stage_runs, "--model.init_args.unet.init_args.context_dim=32")
    with pytest.raises(ValueError, match="in_channels is 3 but the first stage makes 4-channel latents"):
        _system(shapes_dir, stage_runs, "--model.init_args.unet.init_args.in_channels=3")


def test_ldm_sample_writes_grid_images_and_settings_deterministically(ldm_run, tmp_path):
    args = ["sample", "--ckpt", ldm_run.run_dir, "--prompt", "a red circle", "--prompt", "a yellow star",
            "--n", "2", "--steps", "4", "--sampler", "euler_ancestral", "--eta", "1.0", "--seed", "3", "--quiet"]
    first = run_ldm([*args, "--out", "a/grid.png"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_ldm([*args, "--out", "b/grid.png"], cwd=tmp_path)
    record = json.loads((tmp_path / "a/grid.json").read_text())
    assert record["settings"]["sampler"] == "euler_ancestral" and record["image_size"] == 32
    assert [i["seed"] for i in record["images"]] == [3, 4, 5, 6]
    files = sorted(p.name for p in (tmp_path / "a/grid").iterdir())
    assert files == ["0000-a-red-circle.png", "0001-a-red-circle.png", "0002-a-yellow-star.png", "0003-a-yellow-star.png"]
    for name in files:
        assert (tmp_path / "a/grid" / name).read_bytes() == (tmp_path / "b/grid" / name).read_bytes()
    assert (tmp_path / "a/grid.png").stat().st_size > 0 and second.returncode == 0


def test_ldm_sample_errors_clearly(stage_runs, tmp_path):
    wrong = run_ldm(["sample", "--ckpt", str(stage_runs["ae"]), "--prompt", "x"], cwd=tmp_path)
    assert wrong.returncode == 2 and "is a AutoencoderSystem run, not a latent-diffusion run" in wrong.stderr
    unknown = run_ldm(["sample", "--ckpt", str(stage_runs["ae"]), "--prompt", "x", "--sampler", "plms"], cwd=tmp_path)
    assert unknown.returncode == 2 and "invalid choice: 'plms'" in unknown.stderr
    empty = run_ldm(["sample", "--ckpt", str(stage_runs["ae"])], cwd=tmp_path)
    assert empty.returncode == 2 and "no prompts" in empty.stderr
