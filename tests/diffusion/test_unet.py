"""The conditional U-Net: conditioning routes, zero init, masks, checkpointing, the SD-1.5 shape."""

import pytest
import torch

from ldm.diffusion import UNet
from ldm.diffusion.unet import count_parameters
from ldm.nn import timestep_embedding

TINY = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), heads=2, groups=4)


def _randomise_output(unet: UNet) -> UNet:
    """A fresh U-Net outputs zeros by design; give the zero-initialised layers weights to see its function."""
    torch.manual_seed(0)
    for p in unet.parameters():
        if torch.count_nonzero(p) == 0 and p.ndim > 1:
            torch.nn.init.normal_(p, std=0.05)
    return unet


@pytest.mark.parametrize("route", ["context", "vector", "label", "concat", "all"])
def test_each_conditioning_route_gives_the_output_shape(route):
    kwargs = dict(TINY, context_dim=None)
    cond = {}
    if route in ("context", "all"):
        kwargs["context_dim"] = 12
        cond["context"], cond["context_mask"] = torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool)
    if route in ("vector", "all"):
        kwargs["y_dim"] = 7
        cond["y"] = torch.randn(2, 7)
    if route == "label":
        kwargs["num_classes"] = 10
        cond["y"] = torch.tensor([3, 9])
    if route in ("concat", "all"):
        kwargs["concat_channels"] = 5
        cond["concat"] = torch.randn(2, 5, 16, 16)
    unet = _randomise_output(UNet(in_channels=4, out_channels=6, **kwargs))
    out = unet(torch.randn(2, 4, 16, 16), torch.tensor([1.0, 900.0]), **cond)
    assert out.shape == (2, 6, 16, 16) and torch.isfinite(out).all() and out.abs().sum() > 0
    # each route changes the output: the condition is used
    for key in cond:
        if key == "context_mask":
            continue
        other = dict(cond)
        other[key] = torch.tensor([4, 1]) if route == "label" else torch.randn_like(cond[key])
        assert not torch.allclose(unet(torch.randn(2, 4, 16, 16).mul(0), torch.tensor([1.0, 900.0]), **other),
                                  unet(torch.randn(2, 4, 16, 16).mul(0), torch.tensor([1.0, 900.0]), **cond))


def test_a_fresh_unet_outputs_zero():
    unet = UNet(in_channels=4, context_dim=8, **TINY)
    out = unet(torch.randn(3, 4, 8, 8), torch.tensor([0.0, 10.0, 999.0]), context=torch.randn(3, 4, 8))
    assert out.shape == (3, 4, 8, 8) and torch.count_nonzero(out) == 0
    assert torch.count_nonzero(unet.out[-1].weight) == 0


def test_the_context_mask_hides_padded_tokens():
    unet = _randomise_output(UNet(in_channels=4, context_dim=8, **TINY)).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([50.0, 500.0])
    context = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    changed_padding = context.clone()
    changed_padding[~mask] = torch.randn(int((~mask).sum()), 8) * 10
    with torch.no_grad():
        ref = unet(x, t, context=context, context_mask=mask)
        assert torch.allclose(unet(x, t, context=changed_padding, context_mask=mask), ref, atol=1e-6)
        changed_real = context.clone()
        changed_real[0, 1] += 1.0
        moved = unet(x, t, context=changed_real, context_mask=mask)
        assert not torch.allclose(moved[0], ref[0], atol=1e-4)  # a real token matters
        assert torch.allclose(moved[1], ref[1], atol=1e-6)  # ... only to its own sample
        # a row without real tokens (a dropped condition) attends to everything instead of giving NaN
        empty = unet(x, t, context=torch.zeros_like(context), context_mask=torch.zeros_like(mask))
        assert torch.isfinite(empty).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(1)
    a = _randomise_output(UNet(in_channels=4, context_dim=8, **TINY))
    b = _randomise_output(UNet(in_channels=4, context_dim=8, gradient_checkpointing=True, **TINY))
    b.load_state_dict(a.state_dict())
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 300.0]), torch.randn(2, 3, 8)
    for net in (a, b):
        net.train()
        net(x, t, context=c).pow(2).mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name


def test_missing_or_malformed_conditions_are_named():
    unet = UNet(in_channels=4, context_dim=8, y_dim=3, concat_channels=1, **TINY)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([1.0])
    with pytest.raises(ValueError, match="context"):
        unet(x, t, y=torch.randn(1, 3), concat=torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="pass y"):
        unet(x, t, context=torch.randn(1, 2, 8), concat=torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="concatenates 1 channels"):
        unet(x, t, context=torch.randn(1, 2, 8), y=torch.randn(1, 3))
    with pytest.raises(ValueError, match="divisible by 2"):
        unet(torch.randn(1, 4, 7, 7), t, context=torch.randn(1, 2, 8), y=torch.randn(1, 3), concat=torch.randn(1, 1, 7, 7))
    with pytest.raises(ValueError, match="exactly one of heads and head_dim"):
        UNet(heads=8, head_dim=64)


def test_the_sd15_preset_matches_diffusers_parameter_for_parameter():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ours = UNet(in_channels=4, channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                    attention_levels=(0, 1, 2), heads=8, context_dim=768)
        ref = diffusers.UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=32)
    assert count_parameters(ours) == count_parameters(ref) == 859_520_964


def test_timestep_features_equal_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    ref = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(timestep_embedding(t, 320), ref, atol=1e-5)
