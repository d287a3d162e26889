import pytest
import torch

from ldm.diffusion import (
    DenoisingLoss,
    DiscreteSchedule,
    EDMPrecond,
    EDMWeighting,
    EpsPrecond,
    LogitNormalSigmas,
    LogNormalSigmas,
    MinSNRWeighting,
    NoWeighting,
    UniformTimesteps,
    VPrecond,
    offset_noise_like,
)


class EpsNet(torch.nn.Module):
    def forward(self, x, t):
        return torch.sin(x) * (t.reshape(-1, *[1] * (x.ndim - 1)) / 1000)


def test_default_loss_is_the_ddpm_simple_loss():
    schedule = DiscreteSchedule("linear")
    precond, net = EpsPrecond(schedule), EpsNet()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    abar = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps  # Ho et al., Algorithm 1
    expected = (eps - net(x_t, t.double())).pow(2).mean(dim=(1, 2, 3))
    got = DenoisingLoss()(precond, net, x0, sigma=schedule.sigmas[t], noise=eps)
    assert got.shape == (6,)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_loss_samples_timesteps_and_noise_itself():
    schedule = DiscreteSchedule("linear")
    loss = DenoisingLoss()(EpsPrecond(schedule), EpsNet(), torch.randn(5, 2, 4, 4),
                           generator=torch.Generator().manual_seed(3))
    assert loss.shape == (5,) and torch.isfinite(loss).all() and (loss > 0).all()


def test_min_snr_weights_equal_the_formula():
    schedule = DiscreteSchedule("scaled_linear")
    sigma = schedule.sigmas[torch.tensor([0, 100, 400, 999])]
    snr = schedule.alphas_cumprod[[0, 100, 400, 999]] / (1 - schedule.alphas_cumprod[[0, 100, 400, 999]])
    w = MinSNRWeighting(gamma=5.0)
    # Hang et al. 2023: min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v
    assert torch.allclose(w(sigma, EpsPrecond(schedule)), snr.clamp(max=5) / snr, rtol=1e-9)
    assert torch.allclose(w(sigma, VPrecond(schedule)), snr.clamp(max=5) / (snr + 1), rtol=1e-9)
    assert torch.equal(NoWeighting()(sigma, EpsPrecond(schedule)), torch.ones_like(sigma))


def test_edm_weighting_with_edm_precond_is_one():
    sigma = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    assert torch.allclose(EDMWeighting(0.5)(sigma, EDMPrecond(0.5)), torch.ones(4, dtype=torch.float64))


def test_offset_noise_changes_only_the_per_channel_mean():
    x = torch.zeros(4, 3, 16, 16)
    plain = offset_noise_like(x, 0.0, torch.Generator().manual_seed(5))
    shifted = offset_noise_like(x, 0.1, torch.Generator().manual_seed(5))
    diff = shifted - plain  # (B, C, H, W)
    per_channel = diff.flatten(2)
    assert torch.allclose(per_channel, per_channel[..., :1].expand_as(per_channel), atol=1e-6)  # constant over H, W
    assert (per_channel[..., 0].abs() > 0).all() and per_channel[..., 0].abs().max() < 0.5
    with pytest.raises(ValueError, match="spatial"):
        offset_noise_like(torch.zeros(4, 8), 0.1)


def test_sigma_samplers():
    schedule = DiscreteSchedule("linear")
    vp, edm = EpsPrecond(schedule), EDMPrecond()
    g = torch.Generator().manual_seed(0)
    s = UniformTimesteps()(5000, vp, g, dtype=torch.float64)
    assert torch.isin(s, schedule.sigmas).all() and len(s.unique()) > 900
    s = LogitNormalSigmas()(5000, vp, g, dtype=torch.float64)
    assert (s >= schedule.sigma_min).all() and (s <= schedule.sigma_max).all()
    t = schedule.sigma_to_t(s) / 999  # logit-normal(0, 1): median 0.5
    assert abs(float(t.median()) - 0.5) < 0.03
    s = LogNormalSigmas(-1.2, 1.2)(20000, edm, g)
    assert abs(float(s.log().mean()) + 1.2) < 0.03 and abs(float(s.log().std()) - 1.2) < 0.03
    with pytest.raises(ValueError, match="discrete VP"):
        UniformTimesteps()(4, edm)


def test_a_small_denoiser_learns():
    """Train an MLP with eps prediction and min-SNR weighting on 2-d data: the loss goes down."""
    torch.manual_seed(0)
    schedule = DiscreteSchedule("linear", num_timesteps=200)
    precond = EpsPrecond(schedule)

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2))

        def forward(self, x, t):
            return self.net(torch.cat([x, (t / 200).unsqueeze(1)], dim=1))

    net = MLP()
    loss_fn = DenoisingLoss(weighting=MinSNRWeighting(5.0))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    data = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])

    def sample(n, g=None):
        return data[torch.randint(0, 2, (n,), generator=g)] + 0.05 * torch.randn(n, 2, generator=g)

    g = torch.Generator().manual_seed(1)
    held_out = sample(512, g)
    fixed = {"sigma": schedule.sigmas[torch.randint(0, 200, (512,), generator=g)],
             "noise": torch.randn(512, 2, generator=g)}

    def eval_loss():
        with torch.no_grad():
            return loss_fn(precond, net, held_out, **fixed).mean().item()

    before = eval_loss()
    for _ in range(300):
        loss = loss_fn(precond, net, sample(128)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.5 * before, (before, eval_loss())
