"""Flow matching (rectified flow, SD3): the preconditioner's two views agree, its training target is the
velocity, ldm's Euler / Heun samplers on its flow levels are diffusers' FlowMatch schedulers step for step, and
DPM-Solver++ in its sigma-space view is diffusers' DPMSolverMultistepScheduler with flow sigmas."""

import pytest
import torch

from ldm.diffusion import (
    DenoisingLoss,
    FlowPrecond,
    LogitNormalSigmas,
    UniformTimesteps,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
    sampling_sigmas,
    time_shift,
)

TOL = 1e-5


class Velocity(torch.nn.Module):
    """A smooth, nonlinear stand-in for a trained velocity network: (x_t, 1000 t) -> v."""

    def forward(self, x, timestep):
        t = (timestep / 1000).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return torch.tanh(x * (0.5 + t)) - 0.3 * torch.sin(3 * t + x)


def _start():
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [4, 28])
def test_euler_equals_diffusers_flow_match_euler(shift, steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    precond, net = FlowPrecond(shift=shift), Velocity()
    assert precond.flow_space("euler") and not precond.flow_space("dpmpp_2m")
    levels = sampling_sigmas(precond, steps, flow=True).double()
    assert torch.allclose(levels, ref.sigmas.double(), atol=1e-6), (levels, ref.sigmas)
    x = _start()
    expected, y = [], x.clone()
    for t in ref.timesteps:
        y = ref.step(net(y.float(), t.reshape(1).float()).double(), t, y.float()).prev_sample.double()
        expected.append(y)
    got = []
    out = sample_euler(precond.bind(net, flow=True), x * precond.initial_noise_scale(levels[0], flow=True), levels,
                       callback=lambda s: got.append(s.x))
    assert len(got) == len(expected) == steps
    err = max((a - b).abs().max().item() for a, b in zip(got, expected))
    assert err <= TOL, f"max abs difference to FlowMatchEulerDiscreteScheduler over the trajectory: {err:.2e}"
    assert (out - expected[-1]).abs().max() <= TOL


def test_heun_equals_diffusers_flow_match_heun():
    diffusers = pytest.importorskip("diffusers")
    steps = 10
    ref = diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0)
    ref.set_timesteps(steps)
    precond, net = FlowPrecond(shift=3.0), Velocity()
    x = _start()
    y = x.clone().float()
    for t in ref.timesteps:
        y = ref.step(net(y, t.reshape(1).float()), t, y).prev_sample
    levels = sampling_sigmas(precond, steps, flow=True).double()
    out = sample_heun(precond.bind(net, flow=True), x, levels)
    err = (out - y.double()).abs().max().item()
    assert err <= TOL, f"max abs difference to FlowMatchHeunDiscreteScheduler: {err:.2e}"


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dpmpp_2m_in_the_sigma_space_equals_diffusers_with_flow_sigmas(shift):
    """Every sampler other than Euler / Heun runs on a flow model in the sigma space (x = x_t / (1 - t), sigma =
    t / (1 - t)), from t = 1 - 1/1000. DPM-Solver++(2M) there is diffusers' DPMSolverMultistepScheduler with
    use_flow_sigmas and flow_prediction (the network given the exact time; diffusers' pipelines round it down to
    an integer timestep)."""
    diffusers = pytest.importorskip("diffusers")
    steps = 20
    ref = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                flow_shift=shift, algorithm_type="dpmsolver++", solver_order=2)
    ref.set_timesteps(steps)
    precond, net = FlowPrecond(shift=shift), Velocity()
    levels = sampling_sigmas(precond, steps, "leading").double()
    assert torch.allclose(precond.sigma_to_time(levels), ref.sigmas.double(), atol=1e-6)
    x = _start()
    y, expected = x.clone().float(), []
    for i, timestep in enumerate(ref.timesteps):
        y = ref.step(net(y, (ref.sigmas[i] * 1000).reshape(1)), timestep, y).prev_sample
        expected.append(y.double())
    got = []
    out = sample_dpmpp_2m(precond.bind(net), x * precond.initial_noise_scale(levels[0]), levels,
                          callback=lambda s: got.append(s.x / (1 + s.sigma_next)))  # back to x_t = x / (1 + sigma)
    err = max((a - b).abs().max().item() for a, b in zip(got, expected))
    assert len(got) == steps and err <= TOL, f"max abs difference over the trajectory: {err:.2e}"
    assert (out - expected[-1]).abs().max() <= TOL


def test_the_two_views_agree_and_the_target_is_the_velocity():
    """The sigma-space view (training) and the flow view (sampling) give the same x0 estimate of the same sample,
    and the network's regression target for x = x0 + sigma eps is eps - x0."""
    precond, net = FlowPrecond(), Velocity()
    x0, eps = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    sigma = precond.time_to_sigma(t)
    x_sigma = x0 + sigma.reshape(-1, 1, 1, 1) * eps
    x_flow = (1 - t).reshape(-1, 1, 1, 1) * x0 + t.reshape(-1, 1, 1, 1) * eps
    assert torch.allclose(x_sigma / (1 + sigma).reshape(-1, 1, 1, 1), x_flow)
    assert torch.allclose(precond(net, x_sigma, sigma), precond.bind(net, flow=True)(x_flow, t), atol=1e-12)
    assert torch.equal(precond.bind(net)(x_sigma, sigma), precond(net, x_sigma, sigma))  # the sigma-space denoiser
    assert torch.allclose(precond.target(x0, eps, sigma), eps - x0, atol=1e-12)
    assert torch.allclose(precond.output_weight(sigma), t**2)  # |D - x0|^2 = t^2 |v_hat - v|^2
    assert torch.allclose(precond.noise_cond(sigma), 1000 * t)


def test_training_times_uniform_logit_normal_and_shifted():
    g = torch.Generator().manual_seed(0)
    precond = FlowPrecond()
    t = precond.sigma_to_time(UniformTimesteps()(20000, precond, g, dtype=torch.float64))
    assert 0 < t.min() and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.01
    t = precond.sigma_to_time(LogitNormalSigmas(0.0, 1.0)(20000, precond, g, dtype=torch.float64))
    assert abs(torch.logit(t).mean().item()) < 0.03 and abs(torch.logit(t).std().item() - 1) < 0.03
    shifted = FlowPrecond(shift=3.0, shift_training=True)
    u = torch.tensor([0.25, 0.5], dtype=torch.float64)
    assert torch.allclose(shifted.sigma_to_time(shifted.training_sigma(u)), time_shift(u, 3.0))
    assert torch.allclose(time_shift(torch.tensor(0.5), 3.0), torch.tensor(0.75))


def test_the_denoising_loss_regresses_the_velocity():
    precond, net = FlowPrecond(), Velocity()
    x0 = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    loss = DenoisingLoss()(precond, net, x0, sigma=precond.time_to_sigma(t), noise=noise)
    x_t = (1 - t).reshape(-1, 1, 1, 1) * x0 + t.reshape(-1, 1, 1, 1) * noise
    expected = (net(x_t, 1000 * t) - (noise - x0)).pow(2).flatten(1).mean(1)
    assert torch.allclose(loss, expected, atol=1e-5)
