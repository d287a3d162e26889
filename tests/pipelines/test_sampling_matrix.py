"""Every preconditioner (flow matching too) x every sampler x every spacing through TextToImage (issue 15, defect 1).

On the main before issue 15, ``sampling_sigmas`` appended a zero to ``karras_sigmas``, which already
ends in one: ``--spacing karras`` and every EDM model got steps + 2 levels, and DDPM, DDIM, Euler and
Euler-ancestral divided by the last zero (ZeroDivisionError) while Heun returned non-finite values.
"""

from __future__ import annotations

import pytest
import torch

from ldm.autoencoder import IdentityFirstStage
from ldm.diffusion import SAMPLERS, EDMPrecond, EpsPrecond, FlowPrecond, VPrecond, X0Precond, sampling_sigmas
from ldm.diffusion.schedules import DiscreteSchedule
from ldm.diffusion.unet import UNet
from ldm.pipelines import SamplerSettings, TextToImage
from ldm.systems import LatentDiffusion

PRECONDS = {"eps": EpsPrecond, "v": VPrecond, "x0": X0Precond, "edm": EDMPrecond, "flow": FlowPrecond}
SPACINGS = ["leading", "trailing", "linspace", "karras"]
STEPS = 4


def _system(precond: str) -> tuple[LatentDiffusion, list[int]]:
    """A tiny unconditional model whose U-Net counts its calls."""
    torch.manual_seed(0)
    unet = UNet(in_channels=3, channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=(), heads=1,
                context_dim=None, groups=4)
    for p in unet.parameters():
        if torch.count_nonzero(p) == 0 and p.ndim > 1:
            torch.nn.init.normal_(p, std=0.05)
    calls = [0]
    forward = unet.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    unet.forward = counted
    pre = PRECONDS[precond]() if precond in ("edm", "flow") else PRECONDS[precond](DiscreteSchedule())
    val = {"val_sigmas": [0.5, 2.0]} if precond == "edm" else {}
    return LatentDiffusion(unet, IdentityFirstStage(), precond=pre, **val).eval(), calls


def _expected_calls(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler == "heun" else steps  # Heun: one call on its last step to sigma = 0


@pytest.mark.parametrize("precond", list(PRECONDS))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_sampler_gives_finite_images_with_the_right_number_of_model_calls(precond, spacing):
    system, calls = _system(precond)
    sigmas = sampling_sigmas(system.precond, STEPS, spacing)
    assert len(sigmas) == STEPS + 1 and sigmas[-1] == 0 and bool((sigmas[:-1] > 0).all())
    assert bool((sigmas[:-1] > sigmas[1:]).all())  # strictly descending: one zero, at the end
    for sampler in SAMPLERS:
        calls[0] = 0
        images = TextToImage(system)([""] * 2, SamplerSettings(sampler=sampler, steps=STEPS, spacing=spacing, seed=1),
                                     image_size=8, progress=False)
        assert images.shape == (2, 3, 8, 8) and bool(torch.isfinite(images).all()), (sampler, precond, spacing)
        assert calls[0] == _expected_calls(sampler, STEPS), (sampler, calls[0])


def test_a_pixel_space_model_clips_its_x0_estimates_by_default_and_latents_do_not():
    """``threshold=auto``: clip for an identity first stage (pixel space). The tiny U-Net's random weights make
    its x0 estimates overshoot, so clipping changes the images; ``none`` reproduces the unclipped sampler."""
    system, _ = _system("eps")
    pipe = TextToImage(system)
    run = {mode: pipe(["", ""], SamplerSettings(sampler="ddim", steps=6, seed=3, threshold=mode), image_size=8,
                      progress=False) for mode in ("auto", "clip", "none", "dynamic")}
    assert pipe.threshold_mode(SamplerSettings()) == "clip"
    assert torch.equal(run["auto"], run["clip"])
    assert not torch.allclose(run["clip"], run["none"], atol=1e-3)
    assert not torch.allclose(run["dynamic"], run["none"], atol=1e-3)
    with pytest.raises(ValueError, match="unknown threshold 'soft'"):
        SamplerSettings(threshold="soft")


def test_non_square_images_and_sizes_that_do_not_fit_the_first_stage():
    system, calls = _system("eps")
    pipe = TextToImage(system)
    images = pipe(["", ""], SamplerSettings(sampler="euler", steps=3, seed=2), image_size=(8, 16), progress=False)
    assert images.shape == (2, 3, 8, 16) and bool(torch.isfinite(images).all())
    system.first_stage.downsample_factor = 4  # as a KL-f4 first stage would have it
    with pytest.raises(ValueError, match="image width 18 is not a positive multiple of the first stage's factor 4"):
        pipe([""], SamplerSettings(steps=2), image_size=(8, 18), progress=False)
