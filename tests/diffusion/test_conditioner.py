"""The conditioner (issue 15): one place builds every condition, so a batch, its precomputed features and its
prompts give the same condition; the negative prompt and the null condition come from it; it checks itself
against the network at construction. A real (tiny, random) open_clip text encoder, nothing mocked."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from ldm.contrastive import FrozenTextEncoder
from ldm.diffusion import Conditioner, UNet, null_condition

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> FrozenTextEncoder:
    cfg = open_clip.get_model_config("ViT-B-32")
    cfg["embed_dim"] = 16
    cfg["vision_cfg"] = {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}
    cfg["text_cfg"].update({"context_length": 12, "width": 32, "heads": 2, "layers": 1})
    folder = tmp_path_factory.mktemp("tiny-clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.manual_seed(0)
    return FrozenTextEncoder(model_name=f"local-dir:{folder}")


def _unet(context_dim=32, y_dim=None, concat=0) -> UNet:
    return UNet(in_channels=4, channels=8, channel_mult=[1], num_res_blocks=1, attention_levels=[0], heads=2,
                context_dim=context_dim, y_dim=y_dim, concat_channels=concat, groups=4)


def test_tokens_precomputed_features_and_prompts_give_one_condition(encoder):
    cond_net = Conditioner(encoder, vector="text").fit_to(_unet(y_dim=16), 4)
    tokens = encoder.tokenizer(PROMPTS)
    text = encoder(tokens)
    from_tokens = cond_net({"tokens": tokens})
    from_features = cond_net({"clip_tokens": text["tokens"], "clip_mask": text["mask"], "clip_text": text["pooled"]})
    from_prompts, uncond = cond_net.encode_prompts(PROMPTS)
    for other in (from_features, from_prompts):
        assert other.keys() == {"context", "context_mask", "y"}
        assert all(torch.equal(other[k], from_tokens[k]) for k in other)
    assert from_tokens["context"].shape == (2, 12, 32) and from_tokens["y"].shape == (2, 16)
    null = null_condition(from_tokens)
    assert all(torch.equal(uncond[k], null[k]) for k in null)


def test_negative_prompt_is_the_other_branch(encoder):
    cond_net = Conditioner(encoder).fit_to(_unet(), 4)
    cond, negative = cond_net.encode_prompts(PROMPTS, ["blurry"] * 2)
    expected, _ = cond_net.encode_prompts(["blurry"] * 2)
    assert torch.equal(negative["context"], expected["context"]) and not torch.equal(negative["context"], cond["context"])
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        cond_net.encode_prompts(PROMPTS, ["blurry"])


def test_embedding_tokens_follow_the_text_and_read_the_given_embeddings(encoder):
    cond_net = Conditioner(encoder, vector="clip_image", embedding_tokens=3, embedding_dim=16).fit_to(_unet(y_dim=16), 4)
    assert cond_net.embedding_proj.out_features == 3 * 32
    image = torch.nn.functional.normalize(torch.randn(2, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    cond, _ = cond_net.encode_prompts(PROMPTS, embeddings=image)
    assert cond["context"].shape == (2, 12 + 3, 32) and cond["context_mask"][:, -3:].all()
    assert torch.allclose(cond["y"], image * 16 ** 0.5)  # unit variance per entry
    # without embeddings, the prompts' own CLIP text embeddings stand in (unCLIP without a prior)
    text_only, _ = cond_net.encode_prompts(PROMPTS)
    assert torch.allclose(text_only["y"], encoder.encode_prompts(PROMPTS)["pooled"] * 4)


def test_inpainting_input_is_kept_in_both_branches(encoder):
    cond_net = Conditioner(encoder, inpainting=True).fit_to(_unet(concat=5), 4)
    cond, uncond = cond_net.encode_prompts(PROMPTS)
    known, mask = torch.randn(2, 4, 8, 8), torch.ones(2, 1, 8, 8)
    cond, uncond = cond_net.with_concat(cond, known, mask), cond_net.with_concat(uncond, known, mask)
    assert cond["concat"].shape == (2, 5, 8, 8) and torch.equal(cond["concat"], uncond["concat"])
    dropped, drop = cond_net.drop(cond, 1.0)
    assert drop.all() and torch.equal(dropped["concat"], cond["concat"]) and not dropped["context"].any()


def test_mismatches_are_named_at_construction(encoder):
    with pytest.raises(ValueError, match="unet.context_dim is 24 but the text encoder's token features are 32 wide"):
        Conditioner(encoder).fit_to(_unet(context_dim=24), 4)
    with pytest.raises(ValueError, match="no y route"):
        Conditioner(encoder, vector="text").fit_to(_unet(), 4)
    with pytest.raises(ValueError, match="concat_channels = latent channels \\+ 1 = 5, got 0"):
        Conditioner(encoder, inpainting=True).fit_to(_unet(), 4)
    with pytest.raises(ValueError, match="embedding_tokens need"):
        Conditioner(encoder, embedding_tokens=2)


def test_an_unconditional_model_has_no_condition():
    cond_net = Conditioner().fit_to(_unet(context_dim=None), 4)
    assert cond_net({}) == {} and cond_net.encode_prompts(PROMPTS) == (None, None)
    with pytest.raises(ValueError, match="negative prompt needs a text-conditioned model"):
        cond_net.encode_prompts(PROMPTS, ["x", "y"])


def test_empty_prompt_null_and_unmasked_padding_as_stable_diffusion(encoder):
    """null: empty_prompt makes guidance's other branch (and training's dropout) the features of "", and
    mask_padding: false lets cross-attention see every token, as Stable Diffusion is trained and sampled."""
    sd = Conditioner(encoder, null="empty_prompt", mask_padding=False).fit_to(_unet(), 4)
    cond, uncond = sd.encode_prompts(PROMPTS)
    empty = encoder(encoder.tokenizer([""]))["tokens"]  # (1, T, W)
    assert torch.equal(uncond["context"], empty.expand(2, -1, -1))
    assert cond["context_mask"].all() and uncond["context_mask"].all()
    dropped, drop = sd.drop(cond, 1.0)
    assert drop.all() and torch.equal(dropped["context"], uncond["context"])
    kept, drop = sd.drop(cond, 0.0)
    assert not drop.any() and torch.equal(kept["context"], cond["context"])
    masked = Conditioner(encoder).fit_to(_unet(), 4).encode_prompts(PROMPTS)[0]
    assert not masked["context_mask"].all()  # the default hides padding
    with pytest.raises(ValueError, match="empty_prompt.*text_encoder"):
        Conditioner(None, null="empty_prompt")
