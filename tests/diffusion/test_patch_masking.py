"""Patch masking of the DiT and the MMDiT (MaskDiT, Zheng et al. 2024): how many tokens the blocks see, that a masking path which
drops nothing is exactly the unmasked model, that the loss counts only the kept patches, and the unmasked phase."""

import pytest
import torch

from ldm.diffusion import DenoisingLoss, DiT, FlowPrecond, MMDiT
from ldm.diffusion.patch_masking import drop_tokens, keep_count, restore_tokens


def small_dit(mask_ratio: float = 0.0, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=4, mask_ratio=mask_ratio)
    for p in model.parameters():  # leave adaLN-Zero's zeros: every block and the output then depend on the input
        torch.nn.init.normal_(p, std=0.05)
    return model


def block_token_counts(model: DiT) -> list[int]:
    seen: list[int] = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    return seen


@pytest.mark.parametrize("ratio, kept", [(0.5, 32), (0.75, 16), (0.3, 45), (0.005, 64)])
def test_masking_keeps_the_same_number_of_tokens_per_sample_and_the_blocks_see_only_those(ratio, kept):
    model = small_dit(ratio).train()
    seen = block_token_counts(model)
    x, t = torch.randn(3, 4, 16, 16), torch.rand(3)  # 8 x 8 = 64 tokens
    out = model(x, t)
    assert keep_count(64, ratio) == kept == 64 - round(ratio * 64)
    assert out.shape == (3, 4, 16, 16)
    assert model.last_kept.shape == (3, kept) and seen == [kept, kept]  # the block compute scales with the kept
    for row in model.last_kept:  # distinct, sorted, in range
        assert row.unique().numel() == kept and (row.diff() > 0).all() and 0 <= row.min() and row.max() < 64
    assert model.output_mask().shape == (3, 1, 16, 16)
    assert model.output_mask().sum(dim=(1, 2, 3)).tolist() == [kept * 4.0] * 3  # 2 x 2 elements per patch
    seen.clear()
    model.eval()(x, t)  # eval / sampling: nothing masked
    assert seen == [64, 64] and model.last_kept is None and model.output_mask() is None


def test_the_masks_differ_per_sample_and_the_output_mask_covers_the_kept_patches():
    torch.manual_seed(1)
    model = small_dit(0.5).train()
    model(torch.randn(4, 4, 8, 8), torch.rand(4))  # 4 x 4 = 16 tokens, 8 kept
    kept = model.last_kept  # (4, 8)
    assert len({tuple(r.tolist()) for r in kept}) > 1
    mask = model.output_mask()  # (4, 1, 8, 8)
    for b in range(4):
        patches = mask[b, 0].reshape(4, 2, 4, 2).amax(dim=(1, 3)).flatten()  # (16,) per token, row-major
        assert patches.nonzero().flatten().tolist() == kept[b].tolist()
        assert (mask[b, 0].reshape(4, 2, 4, 2).amin(dim=(1, 3)).flatten() == patches).all()  # whole patches


def test_a_masking_path_that_drops_nothing_is_exactly_the_unmasked_model():
    masked = small_dit(0.01).train()  # round(0.01 * 16) = 0 dropped: the gather / scatter path with all tokens
    plain = small_dit(0.0).train()
    plain.load_state_dict({k: v for k, v in masked.state_dict().items() if k != "mask_token"})
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    out = masked(x, t)
    assert masked.last_kept.shape == (2, 16)
    assert torch.equal(out, plain(x, t))
    masked.mask_ratio = 0.0  # the unmasked phase: the plain path, no mask
    assert torch.equal(masked(x, t), plain(x, t)) and masked.last_kept is None
    masked.mask_ratio = 0.5
    assert torch.equal(masked.eval()(x, t), plain.eval()(x, t))  # eval never masks


def test_dropped_positions_are_the_mask_token_at_its_position_and_restore_inverts_drop():
    tokens = torch.randn(2, 16, 8)
    kept_tokens, kept = drop_tokens(tokens, 0.5, generator=torch.Generator().manual_seed(0))
    assert kept_tokens.shape == (2, 8, 8)
    assert torch.equal(kept_tokens, torch.stack([tokens[b, kept[b]] for b in range(2)]))
    fill = torch.zeros(16, 8)
    full = restore_tokens(kept_tokens, kept, fill)  # (2, 16, 8)
    for b in range(2):
        dropped = sorted(set(range(16)) - set(kept[b].tolist()))
        assert torch.equal(full[b, kept[b]], tokens[b, kept[b]]) and (full[b, dropped] == 0).all()
    # in the model the prediction on a dropped patch does not depend on the input at all
    model = small_dit(0.5).train()
    x, other = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    torch.manual_seed(3)
    a = model(x, torch.full((1,), 0.5))
    torch.manual_seed(3)
    b = model(other, torch.full((1,), 0.5))
    dropped = model.output_mask() == 0  # (1, 1, 8, 8), the same draw
    assert dropped.sum() == 32
    assert torch.allclose(a[dropped.expand_as(a)], b[dropped.expand_as(b)], atol=1e-6)
    assert not torch.allclose(a[~dropped.expand_as(a)], b[~dropped.expand_as(b)])


class Perturbed(torch.nn.Module):
    """The DiT, with its prediction on the dropped patches replaced by 1000."""

    def __init__(self, dit: DiT):
        super().__init__()
        self.dit = dit

    def forward(self, *args, **kwargs):
        out = self.dit(*args, **kwargs)
        return torch.where(self.dit.output_mask().bool(), out, torch.full_like(out, 1000.0))

    def output_mask(self):
        return self.dit.output_mask()


def test_the_loss_counts_only_the_kept_patches():
    model, loss, precond = small_dit(0.5).train(), DenoisingLoss(), FlowPrecond()
    x0, sigma, noise = torch.randn(3, 4, 8, 8), torch.tensor([0.2, 0.5, 0.9]), torch.randn(3, 4, 8, 8)
    torch.manual_seed(5)
    plain = loss(precond, model, x0, sigma=sigma, noise=noise)  # (3,)
    torch.manual_seed(5)
    perturbed = loss(precond, Perturbed(model), x0, sigma=sigma, noise=noise)
    assert torch.allclose(plain, perturbed, rtol=1e-6)
    # the value: the mean squared error over the kept elements only (the same mask draw)
    torch.manual_seed(5)
    _, raw = precond.raw(model, x0 + sigma[:, None, None, None] * noise, sigma)
    mask = model.output_mask()  # (3, 1, 8, 8), 32 of 64 elements per channel
    err = (raw - precond.target(x0, noise, sigma)).pow(2) * mask
    assert torch.allclose(plain, err.flatten(1).sum(1) / (32 * 4), rtol=1e-5)
    assert not torch.allclose(plain, (raw - precond.target(x0, noise, sigma)).pow(2).flatten(1).mean(1))
    # an explicit mask of ones is the plain mean; in eval the model masks nothing
    model.eval()
    full = loss(precond, model, x0, sigma=sigma, noise=noise)
    assert torch.allclose(loss(precond, model, x0, sigma=sigma, noise=noise, mask=torch.ones(3, 1, 8, 8)), full)


def test_a_model_built_without_masking_cannot_mask_and_the_ratio_is_checked():
    model = small_dit(0.0).train()
    assert model.mask_token is None  # DiT's parameter count is unchanged without masking
    model.mask_ratio = 0.5
    with pytest.raises(ValueError, match="built without patch masking"):
        model(torch.randn(1, 4, 8, 8), torch.rand(1))
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        DiT(hidden_size=32, depth=1, num_heads=4, mask_ratio=1.0)


# -- the same masking in SD3's MMDiT: the joint blocks see the kept image tokens and every text token ---------------

def small_mmdit(mask_ratio: float = 0.0, seed: int = 0, depth: int = 2) -> MMDiT:
    torch.manual_seed(seed)
    model = MMDiT(in_channels=4, patch_size=2, hidden_size=32, depth=depth, num_heads=4, context_dim=16, y_dim=8,
                  mask_ratio=mask_ratio)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def mmdit_inputs(b: int = 3, side: int = 16):
    return (torch.randn(b, 4, side, side), torch.rand(b), {"context": torch.randn(b, 5, 16), "y": torch.randn(b, 8)})


def test_mmdit_masking_drops_image_tokens_only_and_eval_masks_nothing():
    model = small_mmdit(0.75).train()
    seen: list[tuple[int, int]] = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append((args[0].shape[1], args[1].shape[1])))
    x, t, cond = mmdit_inputs()  # 8 x 8 = 64 image tokens, 5 text tokens
    out = model(x, t, **cond)
    assert out.shape == x.shape and model.last_kept.shape == (3, 16) and model.last_grid == (8, 8)
    assert seen == [(16, 5), (16, 5)]  # a quarter of the image tokens, all the text tokens
    assert model.output_mask().sum(dim=(1, 2, 3)).tolist() == [16 * 4.0] * 3
    seen.clear()
    model.eval()(x, t, **cond)
    assert seen == [(64, 5), (64, 5)] and model.last_kept is None and model.output_mask() is None
    assert small_mmdit(0.0).mask_token is None  # unmasked: diffusers' parameter count (tests/diffusion/test_mmdit.py)
    with pytest.raises(ValueError, match="MMDiT was built without patch masking"):
        broken = small_mmdit(0.0).train()
        broken.mask_ratio = 0.5
        broken(x, t, **cond)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        small_mmdit(1.0)


def test_mmdit_masking_that_drops_nothing_is_exactly_the_unmasked_model_and_dropped_patches_ignore_the_input():
    masked, plain = small_mmdit(0.01).train(), small_mmdit(0.0).train()  # round(0.01 * 16) = 0 dropped
    plain.load_state_dict({k: v for k, v in masked.state_dict().items() if k != "mask_token"})
    x, t, cond = mmdit_inputs(2, 8)
    assert torch.equal(masked(x, t, **cond), plain(x, t, **cond)) and masked.last_kept.shape == (2, 16)
    model = small_mmdit(0.5).train()
    other = torch.randn_like(x)
    torch.manual_seed(3)
    a = model(x, t, **cond)
    torch.manual_seed(3)
    b = model(other, t, **cond)
    dropped = (model.output_mask() == 0).expand_as(a)  # the same draw
    assert dropped.sum() == 2 * 8 * 4 * 4
    assert torch.allclose(a[dropped], b[dropped], atol=1e-6) and not torch.allclose(a[~dropped], b[~dropped])


def test_the_loss_counts_only_the_patches_the_mmdit_kept():
    model, loss, precond = small_mmdit(0.5).train(), DenoisingLoss(), FlowPrecond()
    x0, sigma, noise = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8]), torch.randn(2, 4, 8, 8)
    cond = {"context": torch.randn(2, 5, 16), "y": torch.randn(2, 8)}
    torch.manual_seed(5)
    got = loss(precond, model, x0, cond, sigma=sigma, noise=noise)
    torch.manual_seed(5)
    _, raw = precond.raw(model, x0 + sigma[:, None, None, None] * noise, sigma, cond)
    err = (raw - precond.target(x0, noise, sigma)).pow(2) * model.output_mask()
    assert torch.allclose(got, err.flatten(1).sum(1) / (32 * 4), rtol=1e-5)
