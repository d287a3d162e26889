import pytest
import torch

from ldm.diffusion import DiscreteSchedule, karras_sigmas
from ldm.diffusion.schedules import (
    alpha_bar_to_sigma,
    logsnr_to_sigma,
    sigma_to_alpha_bar,
    sigma_to_logsnr,
)


def test_conversions_round_trip():
    sched = DiscreteSchedule("scaled_linear")
    ab = sched.alphas_cumprod
    sigma = alpha_bar_to_sigma(ab)
    assert torch.allclose(sigma_to_alpha_bar(sigma), ab, rtol=1e-12)
    assert torch.allclose(logsnr_to_sigma(sigma_to_logsnr(sigma)), sigma, rtol=1e-12)
    assert torch.allclose(sigma_to_logsnr(sigma), (ab / (1 - ab)).log(), rtol=1e-10)


def test_timestep_sigma_round_trip_including_fractions():
    sched = DiscreteSchedule("linear")
    t = torch.tensor([0.0, 1.0, 17.25, 500.5, 998.9, 999.0], dtype=torch.float64)
    assert torch.allclose(sched.sigma_to_t(sched.t_to_sigma(t)), t, atol=1e-9)
    assert torch.equal(sched.t_to_sigma(torch.arange(1000.0)), sched.sigmas)


def test_karras_sigmas_endpoints_and_order():
    s = karras_sigmas(10, 0.002, 80.0)
    assert len(s) == 11 and s[-1] == 0
    assert s[0] == pytest.approx(80.0) and s[-2] == pytest.approx(0.002)
    assert (s[1:] < s[:-1]).all()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        DiscreteSchedule("quadratic")
    with pytest.raises(ValueError, match="number of steps"):
        DiscreteSchedule().timesteps(0)
