import pytest
import torch

from ldm.diffusion import ConditionDropout, classifier_free_guidance, gradient_guidance


class CondModel:
    """A denoiser whose output depends on a condition vector; counts calls and batch sizes."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, cond=None):
        self.calls.append(x.shape[0])
        return x * 0.5 + cond["y"].reshape(x.shape[0], -1, 1, 1) * sigma.reshape(-1, 1, 1, 1)


def test_cfg_equals_the_formula_in_one_batched_call():
    model = CondModel()
    x, sigma = torch.randn(3, 2, 4, 4), torch.tensor([0.5, 1.0, 2.0])
    cond, uncond = {"y": torch.randn(3, 2)}, {"y": torch.zeros(1, 2)}
    guided = classifier_free_guidance(model, scale=4.0, uncond=uncond)
    out = guided(x, sigma, cond)
    assert model.calls == [6]  # conditional and unconditional branches in one call
    d_c = CondModel()(x, sigma, cond)
    d_u = CondModel()(x, sigma, {"y": torch.zeros(3, 2)})
    assert torch.allclose(out, d_u + 4.0 * (d_c - d_u), atol=1e-6)
    assert torch.allclose(classifier_free_guidance(CondModel(), scale=1.0, uncond=uncond)(x, sigma, cond), d_c,
                          atol=1e-6)


def test_cfg_rescale_moves_toward_the_conditional_std():
    x, sigma = torch.randn(3, 2, 4, 4), torch.tensor([0.5, 1.0, 2.0])
    cond, uncond = {"y": torch.randn(3, 2) * 3}, {"y": torch.zeros(1, 2)}
    plain = classifier_free_guidance(CondModel(), scale=7.0, uncond=uncond)(x, sigma, cond)
    rescaled = classifier_free_guidance(CondModel(), scale=7.0, uncond=uncond, rescale=1.0)(x, sigma, cond)
    s = sigma.reshape(-1, 1, 1, 1)
    eps_c = (x - CondModel()(x, sigma, cond)) / s
    eps_r = (x - rescaled) / s
    assert torch.allclose(eps_r.flatten(1).std(1), eps_c.flatten(1).std(1), rtol=1e-5)
    assert not torch.allclose(plain, rescaled)


def test_gradient_guidance_adds_sigma_squared_times_the_score_gradient():
    def model(x, sigma, cond=None):  # the exact denoiser of N(0, 1) data
        return x / (1 + sigma.reshape(-1, 1) ** 2)

    target = torch.tensor([[1.0, -2.0]])

    def score(x0, sigma, cond):
        return -0.5 * (x0 - target).pow(2).sum(dim=1)

    x, sigma = torch.randn(4, 2, dtype=torch.float64), torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    s2 = sigma.reshape(-1, 1) ** 2
    d = model(x, sigma)
    through = gradient_guidance(model, score, scale=0.7)(x, sigma)
    # d/dx score(D(x)) = -(D(x) - target) * dD/dx, dD/dx = 1 / (1 + sigma^2)
    assert torch.allclose(through, d + 0.7 * s2 * (-(d - target) / (1 + s2)), atol=1e-12)
    at_x0 = gradient_guidance(model, score, scale=0.7, at="prediction")(x, sigma)
    assert torch.allclose(at_x0, d + 0.7 * s2 * (-(d - target)), atol=1e-12)
    on_input = gradient_guidance(model, score, scale=0.7, at="input")(x, sigma)
    assert torch.allclose(on_input, d + 0.7 * s2 * (-(x - target)), atol=1e-12)
    with pytest.raises(ValueError, match="at must be"):
        gradient_guidance(model, score, scale=0.7, at="x0")


def test_condition_dropout():
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(10000, 4, 3) + 5
    drop = ConditionDropout((4, 3), p=0.3)
    out, mask = drop(cond, generator=g)
    assert abs(float(mask.float().mean()) - 0.3) < 0.02
    assert torch.equal(out[mask], torch.zeros_like(out[mask])) and torch.equal(out[~mask], cond[~mask])
    assert torch.equal(drop(cond, p=0.0)[0], cond)
    assert not drop(cond, p=1.0)[0].any()

    learned = ConditionDropout((4, 3), p=1.0, null="learned")
    out, _ = learned(cond[:8])
    out.sum().backward()
    assert learned.null.grad is not None and torch.equal(learned.null.grad, torch.full((4, 3), 8.0))
    with pytest.raises(ValueError, match=r"expected \(4, 3\)"):
        drop(torch.zeros(2, 5))
