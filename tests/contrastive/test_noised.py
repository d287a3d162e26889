"""Noised CLIP: the training noise and the sampler-side mapping agree."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.contrastive.noised import noise_images, vp_input


def test_noise_images_replaces_the_chosen_fraction_with_variance_preserving_noise():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4000, 3, 4, 4, generator=g)  # unit-variance "images"
    assert torch.equal(noise_images(images, 0.0), images)
    out = noise_images(images, 0.5, generator=g)
    changed = (out != images).flatten(1).any(1)
    assert abs(float(changed.float().mean()) - 0.5) < 0.03
    assert abs(float(out.var()) - 1.0) < 0.02  # sqrt(a) x + sqrt(1 - a) eps keeps unit variance
    all_noised = noise_images(images, 1.0, generator=g)
    assert float((all_noised != images).flatten(1).any(1).float().mean()) > 0.99  # (u ~ 0 leaves a row as it is)
    # a = cos^2(pi/2 u), u uniform: the signal fraction is 0.5 on average; correlation with the input shows it
    corr = (all_noised * images).flatten(1).mean(1)
    assert abs(float(corr.mean()) - 2 / math.pi) < 0.03  # E[cos(pi/2 u)] = 2 / pi
    with pytest.raises(ValueError, match="noised_fraction"):
        noise_images(images, 1.5)


def test_vp_input_is_the_training_noise_at_the_sampler_level():
    x0, eps = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    a = 1 / (1 + sigma**2)  # alpha_bar of the variance-preserving form
    expected = a.sqrt().reshape(-1, 1, 1, 1) * x0 + (1 - a).sqrt().reshape(-1, 1, 1, 1) * eps
    assert torch.allclose(vp_input(x0 + sigma.reshape(-1, 1, 1, 1) * eps, sigma), expected, atol=1e-6)


def test_contrastive_system_trains_a_noised_clip(shapes_dir):
    """``noised_fraction`` reaches the training step: the same batch gives another loss than without noise."""
    from ldm.cli import LDMCLI
    from tests.conftest import REPO

    base = ["-c", str(REPO / "configs/data/shapes.yaml"), "-c", str(REPO / "configs/contrastive/clip-debug.yaml"),
            f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar", "--data.num_workers=0",
            "--data.image_size=32"]
    cli = LDMCLI(args=[*base, "--model.init_args.noised_fraction=1.0"], run=False)
    system = cli.model
    batch = next(iter(cli.datamodule.val_dataloader()))
    torch.manual_seed(0)
    noised = system.training_step(batch, 0)
    system.noised_fraction = 0.0
    clean = system.training_step(batch, 0)
    assert torch.isfinite(noised) and not torch.allclose(noised, clean)
    with pytest.raises(ValueError, match="noised_fraction"):
        LDMCLI(args=[*base, "--model.init_args.noised_fraction=2"], run=False)
