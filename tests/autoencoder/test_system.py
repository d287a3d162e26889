"""The autoencoder system: training, GAN start, LPIPS loading, checkpoints, shipped configs."""

from pathlib import Path

import pytest
import pytorch_lightning as L
import torch

from ldm.autoencoder import AutoencoderLoss
from ldm.autoencoder.perceptual import LPIPS
from ldm.cli import LDMCLI
from ldm.systems import load_autoencoder
from tests.conftest import REPO

DEBUG = str(REPO / "configs/trainer/debug.yaml")
KL_DEBUG = str(REPO / "configs/autoencoder/kl-f4-debug.yaml")
VQ_DEBUG = str(REPO / "configs/autoencoder/vq-f4-debug.yaml")


def _build(config, shapes_dir, *extra):
    return LDMCLI(args=["-c", DEBUG, "-c", config, f"--data.train={shapes_dir}/train-*.tar",
                        f"--data.val={shapes_dir}/val-*.tar", "--data.image_size=32", "--data.num_workers=0",
                        "--data.batch_size=8", *extra], run=False)


def test_lpips_loads_local_weights_and_names_a_missing_file(vgg16_file, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth.*vgg16-397923af\.pth"):
        LPIPS(tmp_path / "nowhere.pth")
    lpips = LPIPS(vgg16_file)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    assert (lpips(x, x.flip(-1)) > 0).all()
    assert not any(p.requires_grad for p in lpips.parameters())
    with pytest.raises(FileNotFoundError, match="perceptual_weight: 0"):
        AutoencoderLoss(perceptual_weight=1.0, perceptual_weights=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("config", ["kl-f4-debug", "vq-f4-debug"])
def test_debug_training_reduces_reconstruction_loss_and_gan_starts_on_time(config, shapes_dir, tmp_path):
    cli = _build(str(REPO / f"configs/autoencoder/{config}.yaml"), shapes_dir)
    system, dm = cli.model, cli.datamodule
    system.loss.disc_start = 6
    batch = next(iter(dm.val_dataloader()))
    system.eval()
    with torch.no_grad():
        before = system.loss.reconstruction_terms(batch["image"], system.autoencoder(batch["image"])[0])["rec"].mean()
    disc0 = [p.detach().clone() for p in system.loss.discriminator.parameters()]
    states = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, b, i):
            states.append(all(torch.equal(a, p) for a, p in zip(disc0, pl_module.loss.discriminator.parameters())))

    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=14, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[Watch()],
                        default_root_dir=tmp_path)
    trainer.fit(system, datamodule=dm)
    assert states[:6] == [True] * 6 and not any(states[6:])  # the discriminator trains from step 6 on
    system.eval()
    with torch.no_grad():
        after = system.loss.reconstruction_terms(batch["image"], system.autoencoder(batch["image"])[0])["rec"].mean()
    assert after < 0.7 * before, (before, after)
    assert 0.1 < float(system.autoencoder.scale_factor) < 100 and float(system.autoencoder.scale_factor) != 1.0


def test_fit_save_reload_gives_identical_reconstructions(shapes_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = LDMCLI(args=["fit", "-c", DEBUG, "-c", KL_DEBUG, f"--data.train={shapes_dir}/train-*.tar",
                       f"--data.val={shapes_dir}/val-*.tar", "--data.image_size=32", "--data.num_workers=0",
                       "--data.batch_size=8", "--trainer.max_steps=12", "--trainer.val_check_interval=4",
                       "--trainer.enable_progress_bar=false", "--model.init_args.loss.init_args.disc_start=2"])
    run = Path(cli.run_dir)
    assert (run / "config.yaml").is_file() and list((run / "checkpoints").glob("*.ckpt"))
    assert list((run / "images").glob("reconstructions-*.png"))  # the image logger wrote grids
    metrics = (run / "metrics.csv").read_text()
    assert "val/psnr" in metrics and "val/ssim" in metrics and "train/g_adv" in metrics
    assert (run / "checkpoints/last.ckpt").is_file()  # ldm fit writes the final weights (load prefers last.ckpt)
    loaded = load_autoencoder(run)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    trained = cli.model.autoencoder.eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x)), trained.decode(trained.encode(x)))
    assert float(loaded.scale_factor) == float(trained.scale_factor) != 1.0


def test_loading_without_a_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        load_autoencoder(tmp_path)
    (tmp_path / "x.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_autoencoder(tmp_path / "x.ckpt")


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs/autoencoder").glob("*.yaml")))
def test_every_autoencoder_config_parses_and_instantiates(config, shapes_dir, vgg16_file):
    extra = [f"--model.init_args.loss.init_args.perceptual_weights={vgg16_file}"] if "debug" not in config else []
    cli = _build(str(REPO / "configs/autoencoder" / config), shapes_dir, *extra)
    ae = cli.model.autoencoder
    assert ae.downsample_factor in (4, 8, 16)
    if config == "kl-f8.yaml":  # Stable Diffusion's KL-f8: 83.65M parameters
        assert sum(p.numel() for p in ae.parameters()) == pytest.approx(83.65e6, rel=0.01)


def test_vq_validation_is_over_the_whole_split_whatever_the_batch_size(three_val_dir, tmp_path):
    """PSNR, SSIM, the reconstruction term and the codebook perplexity / usage are figures of the whole split (codes
    counted over every valid row), not means of per-batch figures: the same at a batch of 1 and of 3."""
    from ldm.data import ShardDataModule

    model = _build(VQ_DEBUG, three_val_dir, f"--data.train={three_val_dir}/val-*.tar").model
    figures = []
    for b in (1, 3):
        dm = ShardDataModule(val=f"{three_val_dir}/val-*.tar", image_size=32, val_batch_size=b, num_workers=0)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        figures.append(trainer.validate(model, dm, verbose=False)[0])
    for key in ("val/psnr", "val/ssim", "val/rec", "val/perplexity", "val/codebook_usage"):
        assert abs(figures[0][key] - figures[1][key]) < 1e-5, (key, figures)
    # the perplexity of the codes of all 3 images together, counted directly (not a mean of per-batch perplexities)
    dm = ShardDataModule(val=f"{three_val_dir}/val-*.tar", image_size=32, val_batch_size=3, num_workers=0)
    model.eval()
    with torch.no_grad():
        indices = model.autoencoder(next(iter(dm.val_dataloader()))["image"])[2]["indices"]  # (3, h, w)
    p = torch.bincount(indices.flatten()).double()
    p = p[p > 0] / p.sum()
    assert abs(figures[0]["val/perplexity"] - float(torch.exp(-(p * p.log()).sum()))) < 1e-4
