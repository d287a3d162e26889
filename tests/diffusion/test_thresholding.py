"""x0 clipping and dynamic thresholding (issue 15, defect 6) against diffusers' DDIM, step by step.

The samplers had neither: a pixel-space model's overshooting x0 estimates turned into high-frequency
noise. Our wrapper clips the denoiser's x0, so the sampler's direction comes from the clipped x0 too:
diffusers' DDIM with ``use_clipped_model_output=True`` (GLIDE's choice).
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldm.diffusion import sample_ddim  # noqa: E402
from ldm.diffusion.schedules import append_zero  # noqa: E402
from ldm.diffusion.thresholding import dynamic_threshold, thresholded  # noqa: E402
from tests.diffusion.test_vs_diffusers import TOL, _recorder, eps_fn, float64, ours, start  # noqa: E402


@pytest.mark.parametrize("mode,options", [("clip", {"clip_sample": True, "clip_sample_range": 1.0}),
                                          ("dynamic", {"thresholding": True, "dynamic_thresholding_ratio": 0.9,
                                                       "sample_max_value": 1.8})])
def test_ddim_with_x0_thresholding_equals_diffusers_step_for_step(mode, options):
    ref = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", set_alpha_to_one=True, **options)
    ref.set_timesteps(25)
    float64(ref)
    schedule, model_fn = ours(ref)
    sigmas = append_zero(schedule.sigmas[ref.timesteps])
    x = start() * 3  # large values: the x0 estimates overshoot [-1, 1] for most steps
    expected, y = [], x.clone()
    for t in ref.timesteps:
        y = ref.step(eps_fn(y, t), t, y, eta=0.0, use_clipped_model_output=True).prev_sample
        expected.append(y)
    got, cb = _recorder()
    kwargs = {"ratio": 0.9, "max_value": 1.8} if mode == "dynamic" else {}
    denoised = []
    clipped = thresholded(model_fn, mode, **kwargs)
    out = sample_ddim(clipped, x * (1 + sigmas[0] ** 2).sqrt(), sigmas,
                      callback=lambda s: (cb(s), denoised.append(s.denoised)))
    assert len(got) == 25
    for a, b in zip(got, expected):
        assert (a - b).abs().max() <= TOL
    assert (out - expected[-1]).abs().max() <= TOL
    bound = 1.0 if mode == "clip" else 1.0 + 1e-12
    assert max(float(d.abs().max()) for d in denoised) <= bound  # every x0 estimate in range
    assert float(out.abs().max()) <= 1.0 + 1e-9  # so is the image
    raw = []
    sample_ddim(model_fn, x * (1 + sigmas[0] ** 2).sqrt(), sigmas, callback=lambda s: raw.append(s.denoised))
    assert max(float(d.abs().max()) for d in raw) > 1.5  # without it they overshoot


def test_dynamic_threshold_is_imagens_rule():
    x0 = torch.tensor([[0.5, -3.0, 2.0, 1.0], [0.2, -0.4, 0.6, 0.9]])
    s = torch.quantile(x0.abs(), 0.5, dim=1).clamp(min=1.0)  # 1.5 and 1 (0.5 clamped up)
    expected = torch.maximum(torch.minimum(x0, s[:, None]), -s[:, None]) / s[:, None]
    assert torch.allclose(dynamic_threshold(x0, 0.5), expected)
    assert torch.allclose(dynamic_threshold(x0, 0.5)[1], x0[1])  # an estimate in range is left alone
    with pytest.raises(ValueError, match="unknown threshold 'soft'"):
        thresholded(lambda x, s, c=None: x, "soft")
