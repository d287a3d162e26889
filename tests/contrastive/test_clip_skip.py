"""The text encoder's ``layer`` ("clip skip", issue 15): the penultimate block's features, as SD 2.x conditions on."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from ldm.contrastive import FrozenTextEncoder

PROMPTS = ["a red circle above a blue square", "two green triangles"]


@pytest.fixture(scope="module", params=["ViT-B-32", "ViT-B-16-SigLIP"])
def two_block_model(request, tmp_path_factory):
    """A ``local-dir:`` model name: the family's open_clip config shrunk to 2 text blocks (standard / custom text)."""
    cfg = open_clip.get_model_config(request.param)
    cfg["embed_dim"] = 32
    cfg["vision_cfg"] = {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}
    cfg["text_cfg"].pop("hf_tokenizer_name", None)  # SigLIP's sentencepiece vocabulary is a download
    cfg["text_cfg"].update({"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2})
    folder = tmp_path_factory.mktemp(request.param)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    return f"local-dir:{folder}"


def _blocks_and_norm(clip):
    tower = getattr(clip, "text", None)
    return (tower.transformer.resblocks, tower.ln_final) if tower is not None else (clip.transformer.resblocks, clip.ln_final)


def test_the_penultimate_layer_is_the_first_blocks_output_after_the_final_norm(two_block_model):
    torch.manual_seed(0)
    last = FrozenTextEncoder(model_name=two_block_model)
    skip = FrozenTextEncoder(model_name=two_block_model, layer=-2)
    skip.load_state_dict(last.state_dict())
    tokens = last.tokenizer(PROMPTS)
    a, b = last(tokens), skip(tokens)
    assert torch.equal(a["pooled"], b["pooled"]) and torch.equal(a["mask"], b["mask"])  # the embedding is the model's
    assert not torch.allclose(a["tokens"], b["tokens"])
    # by hand: the token embedding, block 0 only, the final LayerNorm
    clip = skip.model.clip
    tower = getattr(clip, "text", None)
    embed = tower.token_embedding if tower is not None else clip.token_embedding
    pos = tower.positional_embedding if tower is not None else clip.positional_embedding
    mask = tower.attn_mask if tower is not None else clip.attn_mask
    blocks, norm = _blocks_and_norm(clip)
    with torch.no_grad():
        x = blocks[0](embed(tokens) + pos, attn_mask=mask)
        expected = norm(x)
    assert torch.allclose(b["tokens"], expected, atol=1e-6), (b["tokens"] - expected).abs().max()
    with pytest.raises(ValueError, match="the text transformer has 2 blocks"):
        FrozenTextEncoder(model_name=two_block_model, layer=-3)
    with pytest.raises(ValueError, match="layer counts from the end"):
        FrozenTextEncoder(model_name=two_block_model, layer=0)
