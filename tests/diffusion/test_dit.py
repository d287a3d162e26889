"""The DiT backbone: the paper's sizes (parameter counts against diffusers' DiTTransformer2DModel on the meta
device), adaLN-Zero's identity at initialisation, the U-Net's interface (class, vector and text conditioning,
concat), and gradients reaching every block."""

import pytest
import torch

from ldm.diffusion import UNet
from ldm.diffusion.dit import DiT, sincos_2d


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("size,heads,head_dim,depth", [("S", 6, 64, 12), ("B", 12, 64, 12), ("L", 16, 64, 24),
                                                       ("XL", 16, 72, 28)])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_preset_sizes_equal_diffusers_dit(size, heads, head_dim, depth, patch):
    """diffusers keeps a copy of the timestep + class embedders in every block's AdaLayerNormZero; DiT (and ldm)
    share one: the counts differ by exactly depth - 1 copies."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ours = DiT(preset=f"{size}/{patch}", out_channels=8, num_classes=1000)
        ref = diffusers.DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                              out_channels=8, num_layers=depth, sample_size=32, patch_size=patch,
                                              num_embeds_ada_norm=1000)
    shared = _count(ref.transformer_blocks[0].norm1.emb)
    assert _count(ours) == _count(ref) - (depth - 1) * shared


def test_xl2_has_the_papers_parameter_count():
    with torch.device("meta"):
        model = DiT(preset="XL/2", out_channels=8, num_classes=1000)
    assert _count(model) == 674_834_720
    assert _count(model) + 256 * 1152 == 675_129_632  # the official code counts its frozen position table too


def test_a_fresh_dit_predicts_zero_and_every_block_gets_gradients():
    torch.manual_seed(0)
    model = DiT(in_channels=4, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([3, 10])  # 10: the null class
    assert torch.equal(model(x, t, y=y), torch.zeros_like(x))  # adaLN-Zero and a zero final layer
    for p in model.parameters():  # as after some training: nothing zero
        p.data.normal_(0, 0.05)
    out = model(x, t, y=y)
    assert out.shape == x.shape and out.abs().mean() > 0
    out.square().mean().backward()
    assert all(block.attn.to_q.weight.grad.abs().sum() > 0 for block in model.blocks)


def test_text_and_vector_conditioning_and_other_sizes():
    torch.manual_seed(0)
    model = DiT(in_channels=4, patch_size=2, hidden_size=64, depth=2, num_heads=4, context_dim=32, y_dim=16,
                concat_channels=5)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, t = torch.randn(2, 4, 8, 12), torch.tensor([10.0, 500.0])  # a non-square latent
    context, mask = torch.randn(2, 7, 32), torch.ones(2, 7, dtype=torch.bool)
    out = model(x, t, context=context, context_mask=mask, y=torch.randn(2, 16), concat=torch.randn(2, 5, 8, 12))
    assert out.shape == x.shape
    other = model(x, t, context=torch.randn(2, 7, 32), context_mask=mask, y=torch.randn(2, 16),
                  concat=torch.randn(2, 5, 8, 12))
    assert not torch.allclose(out, other)  # the condition matters
    with pytest.raises(ValueError, match="cross-attends to a context"):
        model(x, t, y=torch.randn(2, 16), concat=torch.randn(2, 5, 8, 12))
    with pytest.raises(ValueError, match="divisible by the patch size 2"):
        model(torch.randn(2, 4, 7, 8), t, context=context, y=torch.randn(2, 16), concat=torch.randn(2, 5, 7, 8))
    assert {"context_dim", "y_dim", "num_classes", "concat_channels", "in_channels"} <= set(vars(model)) & set(
        vars(UNet(channels=8, channel_mult=[1], num_res_blocks=1, attention_levels=[], context_dim=None, groups=4)))


def test_sincos_positions_are_maes():
    pos = sincos_2d(4, 3, 8)  # (12, 8): the columns in the first half, the rows in the second
    assert pos.shape == (12, 8)
    assert torch.allclose(pos[1, :2], torch.tensor([1.0, 0.01]).sin())  # column 1, frequencies 1 and 1/100
    assert torch.allclose(pos[4, 4:6], torch.tensor([1.0, 0.01]).sin())  # row 1 starts at index 4
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 6)
