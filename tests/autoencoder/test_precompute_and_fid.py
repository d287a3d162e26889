"""Latent precompute round trip, resumability, the latent data path; rFID end to end."""

import math
import os

import pytest
import pytorch_lightning as L
import torch

from ldm.cli import LDMCLI
from ldm.data import ShardDataModule
from ldm.data.precompute import precompute_latents
from ldm.data.synthetic import write_synthetic_shards
from tests.conftest import REPO, run_ldm


def _system(shapes_dir, *extra):
    return LDMCLI(args=["-c", str(REPO / "configs/trainer/debug.yaml"), "-c", str(REPO / "configs/autoencoder/kl-f4-debug.yaml"),
                        f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar",
                        "--data.image_size=32", "--data.num_workers=0", "--data.batch_size=8", *extra], run=False)


def test_precomputed_latents_match_the_direct_path_and_resume(tmp_path):
    src = tmp_path / "src"
    write_synthetic_shards(src, train=20, val=4, size=32, shard_size=8, progress=False)
    cli = _system(src)
    ae = cli.model.autoencoder.eval()
    ae.scale_factor.fill_(0.8)
    out = tmp_path / "latents"
    stats = precompute_latents(ae, f"{src}/train-*.tar", out, size=32, batch_size=6, with_std=True, progress=False)
    assert stats["splits"]["train"]["samples"] == 20 and len(stats["splits"]["train"]["shards"]) == 3
    dm = ShardDataModule(val=f"{out}/train-*.tar", decode_images=False, batch_size=20, num_workers=0)
    batch = next(iter(dm.val_dataloader()))
    assert "image" not in batch and batch["latent"].shape == (20, 4, 8, 8)
    images = next(iter(ShardDataModule(val=f"{src}/train-*.tar", image_size=32, batch_size=20,
                                       num_workers=0).val_dataloader()))
    direct = ae.encode(images["image"])  # the mode, scaled
    assert torch.allclose(batch["latent"], direct, atol=1e-5)
    assert torch.allclose(ae.decode(batch["latent"]), ae.decode(direct), atol=1e-5)
    assert batch["text"] == images["text"] and (batch["latent_std"] > 0).all()

    # resume: finished shards are kept as they are, a missing one is written again
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    os.remove(out / "train-000001.tar")
    precompute_latents(ae, f"{src}/train-*.tar", out, size=32, progress=False)
    assert (out / "train-000000.tar").stat().st_mtime_ns == mtimes["train-000000.tar"]
    assert (out / "train-000001.tar").is_file() and not list(out.glob(".*.tmp"))


@pytest.mark.slow  # an autoencoder fit and ldm precompute (about 30 s); the precompute writer is tested above
def test_precompute_command_on_a_trained_run(shapes_dir, tmp_path):
    res = run_ldm(["fit", "-c", str(REPO / "configs/trainer/debug.yaml"), "-c", str(REPO / "configs/autoencoder/kl-f4-debug.yaml"),
                   f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar",
                   "--data.image_size=32", "--data.num_workers=0", "--data.batch_size=8", "--trainer.max_steps=8",
                   "--trainer.val_check_interval=4"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_ldm(["precompute", "latents", "--ckpt", "runs/kl-f4-debug/version_0", "--shards",
                   f"{shapes_dir}/val-*.tar", "--out", "lat", "--quiet"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "val: 30 latents in 1 shards" in res.stdout
    res = run_ldm(["precompute", "latents", "--ckpt", "nowhere", "--shards", "x.tar", "--out", "o"], cwd=tmp_path)
    assert res.returncode == 2 and "no checkpoint" in res.stderr


def test_rfid_runs_end_to_end_with_local_weights(shapes_dir, inception_file, tmp_path):
    """rFID through the generation metrics' FID path (StreamingFID) with torch-fidelity's Inception from a local file.
    The weights are random, so the value only proves the path works: it is not a meaningful rFID."""
    cli = _system(shapes_dir, f"--model.init_args.fid_weights={inception_file}")
    assert cli.model.fid is not None
    trainer = L.Trainer(accelerator="cpu", limit_val_batches=2, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    metrics = trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert math.isfinite(metrics["val/rfid"]) and metrics["val/rfid"] >= 0
    assert {"val/psnr", "val/ssim", "val/rec"} <= set(metrics)
