"""Representation alignment (REPA, Yu et al. 2025): the encoder's patch features equal open_clip's own tokens, the
loss's closed-form values, the grid resize, where its gradient goes, masking, and the encoder kept out of the state."""

import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from torch import nn

from ldm.contrastive.model import OpenCLIP
from ldm.diffusion import DiT, MMDiT, UNet
from ldm.diffusion.repa import RepresentationAlignment, patch_features, projector


def tiny_clip(seed: int = 0) -> OpenCLIP:
    torch.manual_seed(seed)
    return OpenCLIP(embed_dim=32, vision=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
                    text=CLIPTextCfg(context_length=16, width=32, heads=2, layers=1)).eval()


class TinyEncoder(nn.Module):
    """A frozen tiny ViT (4 x 4 patch grid of width 32), as :class:`FrozenImageEncoder` wraps a CLIP run's."""

    width = 32

    def __init__(self):
        super().__init__()
        self.model = tiny_clip()

    @torch.no_grad()
    def forward(self, images):
        return patch_features(self.model, images)  # (B, 32, 4, 4)


class FixedFeatures(nn.Module):
    """An encoder returning given features (B, C, h, w), whatever the images."""

    def __init__(self, feats: torch.Tensor):
        super().__init__()
        self.register_buffer("feats", feats)
        self.width = feats.shape[1]

    def forward(self, images):
        return self.feats


def identity_repa(feats: torch.Tensor) -> RepresentationAlignment:
    repa = RepresentationAlignment(FixedFeatures(feats), depth=1, layers=1, backbone_width=feats.shape[1])
    with torch.no_grad():
        repa.projector[0].weight.copy_(torch.eye(feats.shape[1]))
        repa.projector[0].bias.zero_()
    return repa


def test_patch_features_are_open_clips_output_tokens():
    clip, images = tiny_clip(), torch.rand(2, 3, 32, 32) * 2 - 1
    feats = patch_features(clip, images)  # (2, 32, 4, 4)
    clip.clip.visual.output_tokens = True
    _, tokens = clip.clip.visual(clip.preprocess(images))  # (2, 16, 32): after ln_post, class token dropped
    assert feats.shape == (2, 32, 4, 4)
    assert torch.allclose(feats.flatten(2).transpose(1, 2), tokens, atol=1e-6)
    # other sizes are resized to the tower's 32 px first (OpenCLIP.preprocess): the same 4 x 4 grid
    big = F.interpolate(images, size=(64, 64), mode="bilinear")
    small = F.interpolate(big, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(patch_features(clip, big), patch_features(clip, small), atol=1e-6)


def test_the_loss_is_minus_the_mean_cosine_per_token():
    torch.manual_seed(0)
    feats = torch.randn(2, 8, 4, 4)  # encoder features (B, C, h, w)
    tokens = feats.flatten(2).transpose(1, 2)  # (B, 16, 8): the backbone already holds them
    images = torch.zeros(2, 3, 32, 32)
    repa = identity_repa(feats)
    assert torch.allclose(repa(tokens, images, (4, 4)), torch.full((2,), -1.0), atol=1e-6)
    assert torch.allclose(repa(-tokens, images, (4, 4)), torch.full((2,), 1.0), atol=1e-6)
    assert torch.allclose(repa(3.0 * tokens, images, (4, 4)), torch.full((2,), -1.0), atol=1e-6)  # scale-free
    half = torch.cat([tokens[:, :8], -tokens[:, 8:]], dim=1)  # aligned on 8 tokens, opposite on 8: mean 0
    assert torch.allclose(repa(half, images, (4, 4)), torch.zeros(2), atol=1e-6)
    # masking: only the kept tokens, each against the encoder feature at its own position
    kept = torch.tensor([[0, 5, 9], [2, 3, 15]])
    assert torch.allclose(repa(tokens.gather(1, kept[..., None].expand(-1, -1, 8)), images, (4, 4), kept),
                          torch.full((2,), -1.0), atol=1e-6)
    assert repa(tokens[:, :3], images, (4, 4), kept).max() > -0.9  # the wrong positions do not align


def test_encoder_features_on_another_grid_are_resized_to_the_backbones():
    feats = torch.randn(1, 8, 2, 2)  # a 2 x 2 encoder grid, a 4 x 4 backbone grid
    repa = identity_repa(feats)
    target = repa.targets(torch.zeros(1, 3, 32, 32), (4, 4))  # (1, 16, 8)
    expected = F.interpolate(feats, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    assert target.shape == (1, 16, 8) and torch.allclose(target, expected.flatten(2).transpose(1, 2))
    assert torch.allclose(repa(target, torch.zeros(1, 3, 32, 32), (4, 4)), torch.tensor([-1.0]), atol=1e-6)


def test_the_gradient_reaches_the_aligned_block_and_the_projector_not_the_encoder_nor_later_blocks():
    torch.manual_seed(0)
    dit = DiT(in_channels=4, patch_size=2, hidden_size=32, depth=3, num_heads=4)
    for p in dit.parameters():
        nn.init.normal_(p, std=0.05)
    repa = RepresentationAlignment(TinyEncoder(), depth=2, hidden=64, layers=3).fit_to(dit)
    assert [type(m).__name__ for m in repa.projector] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert repa.projector[0].in_features == 32 and repa.projector[-1].out_features == 32
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with repa.capture(dit) as captured:
        dit(torch.randn(2, 4, 8, 8), torch.rand(2))  # 16 tokens on a 4 x 4 grid, the encoder's grid
    assert captured["tokens"].shape == (2, 16, 32)
    assert dit.blocks[1]._forward_hooks == {}  # the hook is gone after the block
    loss = repa(captured["tokens"], images, dit.last_grid).mean()
    assert -1.0 <= loss.item() <= 1.0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in repa.projector.parameters())
    assert dit.blocks[0].mlp[0].weight.grad.abs().sum() > 0 and dit.blocks[1].mlp[0].weight.grad.abs().sum() > 0
    assert dit.patchify.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in dit.blocks[2].parameters())  # after the aligned block: nothing
    assert all(p.grad is None for p in dit.proj_out.parameters())
    assert all(not p.requires_grad and p.grad is None for p in repa.encoder.parameters())


def test_with_patch_masking_the_kept_tokens_are_aligned():
    torch.manual_seed(0)
    dit = DiT(in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=4, mask_ratio=0.5).train()
    repa = RepresentationAlignment(TinyEncoder(), depth=1, hidden=64).fit_to(dit)
    with repa.capture(dit) as captured:
        dit(torch.randn(2, 4, 8, 8), torch.rand(2))
    assert captured["tokens"].shape == (2, 8, 32) and dit.last_kept.shape == (2, 8)
    loss = repa(captured["tokens"], torch.zeros(2, 3, 32, 32), dit.last_grid, dit.last_kept)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    with pytest.raises(ValueError, match="8 backbone tokens but a grid of 4 x 4"):
        repa(captured["tokens"], torch.zeros(2, 3, 32, 32), dit.last_grid)


def test_the_encoder_is_frozen_and_out_of_the_state_dict():
    dit = DiT(in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=4)
    repa = RepresentationAlignment(TinyEncoder(), depth=1, hidden=64).fit_to(dit)
    state = repa.state_dict()
    assert sorted(state) == sorted(f"projector.{k}" for k in projector(32, 64, 32, 3).state_dict())
    again = RepresentationAlignment(TinyEncoder(), depth=1, hidden=64).fit_to(dit)
    again.load_state_dict(state)  # strict: the rebuilt encoder keeps its own weights
    assert all(torch.equal(a, b) for a, b in zip(again.projector.parameters(), repa.projector.parameters()))
    repa.train()
    assert repa.projector.training and not repa.encoder.training and not repa.encoder.model.training
    assert [p for p in repa.parameters() if p.requires_grad] == list(repa.projector.parameters())


def test_only_transformer_backbones_with_enough_blocks():
    repa = RepresentationAlignment(TinyEncoder(), depth=3, hidden=64)
    with pytest.raises(TypeError, match="transformer backbone with blocks"):
        repa.fit_to(UNet(in_channels=4, channels=32, channel_mult=[1], num_res_blocks=1, attention_levels=[],
                         groups=8))
    with pytest.raises(ValueError, match="REPA depth 3: the backbone has 2 blocks"):
        repa.fit_to(DiT(in_channels=4, hidden_size=32, depth=2, num_heads=4))
    with pytest.raises(ValueError, match="depth counts blocks from 1"):
        RepresentationAlignment(TinyEncoder(), depth=0)


def test_repa_aligns_the_image_stream_of_an_mmdit_joint_block_with_or_without_masking():
    """An MMDiT block returns (image tokens, text tokens): REPA reads the image stream, its gradient reaches the
    blocks up to the aligned one (both streams of those, through the joint attention) and no later; with patch
    masking the kept image tokens are aligned."""
    torch.manual_seed(0)
    mmdit = MMDiT(in_channels=4, patch_size=2, hidden_size=32, depth=3, num_heads=4, context_dim=16)
    for p in mmdit.parameters():
        nn.init.normal_(p, std=0.05)
    repa = RepresentationAlignment(TinyEncoder(), depth=2, hidden=64).fit_to(mmdit)
    assert repa.projector[0].in_features == 32
    context = torch.randn(2, 5, 16)
    with repa.capture(mmdit) as captured:
        mmdit(torch.randn(2, 4, 8, 8), torch.rand(2), context=context)  # a 4 x 4 grid, the encoder's
    assert captured["tokens"].shape == (2, 16, 32) and mmdit.last_grid == (4, 4)
    repa(captured["tokens"], torch.rand(2, 3, 32, 32) * 2 - 1, mmdit.last_grid).mean().backward()
    assert mmdit.blocks[1].attn.to_q.weight.grad.abs().sum() > 0
    assert mmdit.blocks[0].mlp_ctx[0].weight.grad.abs().sum() > 0  # the text stream feeds block 2's attention
    assert all(p.grad is None for p in mmdit.blocks[2].parameters()) and mmdit.proj_out.weight.grad is None
    masked = MMDiT(in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=4, context_dim=16,
                   mask_ratio=0.5).train()
    repa = RepresentationAlignment(TinyEncoder(), depth=1, hidden=64).fit_to(masked)
    with repa.capture(masked) as captured:
        masked(torch.randn(2, 4, 8, 8), torch.rand(2), context=context)
    assert captured["tokens"].shape == (2, 8, 32) and masked.last_kept.shape == (2, 8)
    loss = repa(captured["tokens"], torch.zeros(2, 3, 32, 32), masked.last_grid, masked.last_kept)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
