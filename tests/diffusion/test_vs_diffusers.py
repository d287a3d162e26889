"""Our schedules and samplers against diffusers' schedulers, step by step, in float64.

The same eps-prediction function drives both; ours runs in sigma space through
EpsPrecond, diffusers in its own (VP) space. Trajectories are compared after
rescaling ours by sqrt(alpha_bar) = 1 / sqrt(1 + sigma^2).
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldm.diffusion import (  # noqa: E402
    DiscreteSchedule,
    EpsPrecond,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_heun,
    sample_unipc,
)
from ldm.diffusion.schedules import append_zero  # noqa: E402

TOL = 1e-5
SHAPE = (2, 3, 4, 4)


def eps_fn(x, t):
    """A smooth, nonlinear stand-in for a trained eps network (float64)."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    t = t.reshape(-1, *([1] * (x.ndim - 1))) if t.numel() > 1 else t.reshape(())
    return torch.tanh(x * (0.5 + t / 2000)) + 0.1 * torch.sin(t / 100 + x)


class Net(torch.nn.Module):
    def forward(self, x, c_noise):
        return eps_fn(x, c_noise)


def ours(sched, sigmas=None):
    schedule = DiscreteSchedule(alphas_cumprod=torch.as_tensor(sched.alphas_cumprod, dtype=torch.float64))
    return schedule, EpsPrecond(schedule).bind(Net())


def float64(ref):
    """Run a diffusers scheduler's own arithmetic in float64 (it keeps float32 tables by default)."""
    for name in ("betas", "alphas", "alphas_cumprod", "one", "final_alpha_cumprod", "sigmas", "alpha_t", "sigma_t",
                 "lambda_t"):
        value = getattr(ref, name, None)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            setattr(ref, name, value.double())
    return ref


def vp(x, sigma):
    return x / (1 + sigma**2).sqrt()


def start():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _recorder():
    steps = []
    return steps, lambda s: steps.append(vp(s.x, s.sigma_next))


@pytest.mark.parametrize("name,kwargs", [
    ("linear", {}),
    ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
    ("squaredcos_cap_v2", {}),
])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedules_equal_diffusers(name, kwargs, zero_snr):
    ref = diffusers.DDPMScheduler(beta_schedule=name, rescale_betas_zero_snr=zero_snr, **kwargs)
    ours_name = {"squaredcos_cap_v2": "cosine"}.get(name, name)
    sched = DiscreteSchedule(ours_name, zero_terminal_snr=zero_snr, **kwargs)
    assert torch.allclose(sched.alphas_cumprod, ref.alphas_cumprod.double(), atol=1e-6, rtol=0)
    if zero_snr:
        assert sched.alphas_cumprod[-1] == 0 and sched.sigma_max == pytest.approx(4096.0)


@pytest.mark.parametrize("spacing,n", [("leading", 50), ("trailing", 10), ("linspace", 7), ("leading", 1000)])
def test_timestep_spacing_equals_diffusers(spacing, n):
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing)
    ref.set_timesteps(n)
    assert DiscreteSchedule().timesteps(n, spacing).tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_equals_diffusers(spacing):
    ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing)
    ref.set_timesteps(25)
    float64(ref)
    schedule, model_fn = ours(ref)
    sigmas = append_zero(schedule.sigmas[ref.timesteps])
    x = start()
    expected, y = [], x.clone()
    for t in ref.timesteps:
        y = ref.step(eps_fn(y, t), t, y, eta=0.0).prev_sample
        expected.append(y)
    got, cb = _recorder()
    out = sample_ddim(model_fn, x * (1 + sigmas[0] ** 2).sqrt(), sigmas, callback=cb)
    assert len(got) == len(expected) == 25
    for a, b in zip(got, expected):
        assert (a - b).abs().max() <= TOL
    assert (out - expected[-1]).abs().max() <= TOL


def test_ddpm_equals_diffusers_with_the_same_noise():
    ref = diffusers.DDPMScheduler(beta_schedule="linear", clip_sample=False, variance_type="fixed_small")
    ref.set_timesteps(40)
    float64(ref)
    schedule, model_fn = ours(ref)
    sigmas = append_zero(schedule.sigmas[ref.timesteps])
    x = start()
    g_ref = torch.Generator().manual_seed(7)
    expected, y = [], x.clone()
    for t in ref.timesteps:
        y = ref.step(eps_fn(y, t), t, y, generator=g_ref).prev_sample
        expected.append(y)
    got, cb = _recorder()
    sample_ddpm(model_fn, x * (1 + sigmas[0] ** 2).sqrt(), sigmas, generator=torch.Generator().manual_seed(7),
                callback=cb)
    for a, b in zip(got, expected):
        assert (a - b).abs().max() <= TOL


def _karras_space_ref(cls, n, **kw):
    ref = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing", **kw)
    ref.set_timesteps(n)
    return float64(ref)


def test_euler_equals_diffusers():
    """diffusers' Euler step casts the sample to float32 whatever its dtype, so this comparison
    holds to float32 precision: 1e-5 relative to the sample's magnitude (up to ~25 here)."""
    ref = _karras_space_ref(diffusers.EulerDiscreteScheduler, 30)
    _, model_fn = ours(ref)
    sigmas = ref.sigmas.double()
    x = start() * ref.init_noise_sigma
    expected, y = [], x.clone()
    for t in ref.timesteps:
        y = ref.step(eps_fn(ref.scale_model_input(y, t), t), t, y).prev_sample
        expected.append(y)
    got = []
    sample_euler(model_fn, x, sigmas, callback=lambda s: got.append(s.x))
    assert len(got) == len(expected) == 30
    for a, b in zip(got, expected):
        assert (a - b).abs().max() <= TOL * max(1.0, float(b.abs().max()))


def test_heun_equals_diffusers():
    ref = _karras_space_ref(diffusers.HeunDiscreteScheduler, 15)
    _, inner = ours(ref)
    calls = []

    def model_fn(x, sigma, cond=None):
        calls.append(1)
        return inner(x, sigma, cond)

    sigmas = _heun_sigmas(ref)
    x = start() * ref.init_noise_sigma
    y = x.clone()
    for t in ref.timesteps:
        y = ref.step(eps_fn(ref.scale_model_input(y, t), t), t, y).prev_sample
    out = sample_heun(model_fn, x, sigmas)
    assert len(calls) == len(ref.timesteps) == 2 * 15 - 1
    assert (out - y).abs().max() <= TOL


def _heun_sigmas(ref):
    """diffusers interleaves Heun's sigmas [s0, s1, s1, s2, s2, ..., 0]; undo that."""
    s = ref.sigmas.double()
    return torch.cat([s[:1], s[1:-1:2], s[-1:]])


def reference_trajectory(ref, x):
    """The samples after each step of a diffusers scheduler from ``x``, with the analytic eps."""
    expected, y = [], x.clone()
    for t in ref.timesteps:
        y = ref.step(eps_fn(y, t), t, y).prev_sample
        expected.append(y)
    return expected


def test_dpmpp_2m_equals_diffusers():
    ref = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                algorithm_type="dpmsolver++", solver_order=2)
    ref.set_timesteps(20)  # >= 15 steps: diffusers' lower-order second-to-last step is not used
    float64(ref)
    _, model_fn = ours(ref)
    sigmas = ref.sigmas.double()
    assert sigmas[-1] == 0 and len(sigmas) == 21
    x = start()
    expected = reference_trajectory(ref, x)
    got, cb = _recorder()
    sample_dpmpp_2m(model_fn, x * (1 + sigmas[0] ** 2).sqrt(), sigmas, callback=cb)
    for a, b in zip(got, expected):
        assert (a - b).abs().max() <= TOL


def test_dpmpp_2m_sde_equals_diffusers_with_the_same_noise():
    """diffusers' sde-dpmsolver++ (midpoint) with our noise passed as variance_noise (it keeps it in float32)."""
    ref = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                algorithm_type="sde-dpmsolver++", solver_order=2)
    ref.set_timesteps(20)
    float64(ref)
    _, model_fn = ours(ref)
    sigmas = ref.sigmas.double()
    x = start()
    g = torch.Generator().manual_seed(5)
    noises = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(len(sigmas) - 2)]  # none to 0
    expected, y = [], x.clone()
    for i, t in enumerate(ref.timesteps):
        noise = noises[i] if i < len(noises) else torch.zeros(SHAPE, dtype=torch.float64)
        y = ref.step(eps_fn(y, t), t, y, variance_noise=noise).prev_sample
        expected.append(y)
    got, cb = _recorder()
    out = sample_dpmpp_2m_sde(model_fn, x * (1 + sigmas[0] ** 2).sqrt(), sigmas, generator=torch.Generator().manual_seed(5),
                              callback=cb)
    assert len(got) == len(expected) == 20
    for a, b in zip(got, expected):
        assert (a - b).abs().max() <= TOL
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("steps,order", [(20, 2), (5, 2), (1, 2), (20, 3), (8, 3), (10, 1)])
def test_unipc_equals_diffusers(steps, order):
    """UniPC (bh2, data prediction, UniC after every model call, lower order on the last step) step for step.

    diffusers calls the corrector at the last model call too, but its final first-order step to sigma = 0
    discards the result; ours skips it. With order 3 the last two steps are of lower order.
    """
    ref = diffusers.UniPCMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            solver_order=order, predict_x0=True, solver_type="bh2",
                                            lower_order_final=True, disable_corrector=[])
    ref.set_timesteps(steps)
    float64(ref)
    _, inner = ours(ref)
    calls = []

    def model_fn(x, sigma, cond=None):
        calls.append(1)
        return inner(x, sigma, cond)

    sigmas = ref.sigmas.double()
    assert sigmas[-1] == 0 and len(sigmas) == steps + 1
    x = start()
    expected = reference_trajectory(ref, x)
    got, cb = _recorder()
    out = sample_unipc(model_fn, x * (1 + sigmas[0] ** 2).sqrt(), sigmas, order=order, callback=cb)
    assert len(got) == len(expected) == len(calls) == steps
    errors = [float((a - b).abs().max()) for a, b in zip(got, expected)]
    assert max(errors) <= TOL, errors
    assert (out - expected[-1]).abs().max() <= TOL


def test_guidance_rescale_equals_diffusers():
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    from ldm.diffusion import rescale_guided_eps

    g = torch.Generator().manual_seed(0)
    eps_cfg, eps_cond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    assert torch.allclose(rescale_guided_eps(eps_cfg, eps_cond, 0.7), rescale_noise_cfg(eps_cfg, eps_cond, 0.7),
                          atol=1e-6)
