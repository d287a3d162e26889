"""The latent scale factor's running statistics (:class:`ldm.autoencoder.LatentScaleEstimator`)."""

import pytest
import torch

from ldm.autoencoder import (
    Autoencoder,
    AutoencoderLoss,
    Decoder,
    DiagonalGaussian,
    Encoder,
    LatentScaleEstimator,
    PatchDiscriminator,
)
from ldm.systems import AutoencoderSystem


def old_track_latents(moments: torch.Tensor, z: torch.Tensor, first: bool, momentum: float) -> torch.Tensor:
    """AutoencoderSystem._track_latents before the statistics moved out of the system, verbatim (on a copy)."""
    m = 0.0 if first else momentum
    new = torch.stack([z.float().mean(), z.float().pow(2).mean()])
    moments.mul_(m).add_(new, alpha=1 - m)
    var = (moments[1] - moments[0] ** 2).clamp(min=1e-12)
    return var.rsqrt()


def test_the_first_batch_gives_its_own_std_then_moving_moments_as_before():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 8, 8, generator=g) * s + s for s in (0.5, 2.0, 3.0, 0.1)]
    est = LatentScaleEstimator(momentum=0.9)
    assert float(est.scale) == 1.0  # before any update
    assert est.update(batches[0]) == pytest.approx(1 / batches[0].std(unbiased=False).item(), rel=1e-5)
    reference = torch.tensor([0.0, 1.0])
    old_track_latents(reference, batches[0], True, 0.9)
    for z in batches[1:]:
        assert torch.equal(est.update(z), old_track_latents(reference, z, False, 0.9))  # bit for bit
    assert torch.equal(est.moments, reference) and int(est.count) == 4


def test_state_round_trips_and_resumes_the_same_average():
    a, b = LatentScaleEstimator(0.99), LatentScaleEstimator(0.99)
    a.update(torch.randn(2, 4, 4, 4))
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"moments", "count"}
    z = torch.randn(2, 4, 4, 4)
    assert torch.equal(a.update(z), b.update(z))  # a resumed estimator does not restart from the next batch
    with pytest.raises(ValueError, match="momentum"):
        LatentScaleEstimator(1.0)


def test_an_autoencoder_checkpoint_from_before_loads_its_latent_moments():
    def system():
        ae = Autoencoder(Encoder(out_channels=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, groups=4),
                         Decoder(in_channels=4, channels=8, channel_mult=(1, 2), num_res_blocks=1, groups=4),
                         DiagonalGaussian(in_channels=8, latent_channels=4))
        return AutoencoderSystem(ae, AutoencoderLoss(perceptual_weight=0.0,
                                                     discriminator=PatchDiscriminator(channels=8, layers=1)))

    old = system().state_dict()
    old["latent_moments"] = torch.tensor([0.25, 4.0])
    old["batches_seen"] = torch.tensor(7)
    del old["latent_scale.moments"], old["latent_scale.count"]
    new = system()
    new.load_state_dict(old)  # strict
    assert torch.equal(new.latent_scale.moments, torch.tensor([0.25, 4.0])) and int(new.latent_scale.count) == 7
