"""FrozenTextEncoder, CLIP score and CLIP guidance on open_clip's custom-text towers (issue 15, defect 2).

Tiny random-weight models built from open_clip's own configs, shrunk and loaded through the
``local-dir:`` schema (nothing downloaded): ``ViT-B-16-SigLIP`` (a ``CustomTextCLIP``:
bidirectional text tower, last-token pooling, biased projection) and ``ViT-B-32`` (a plain
``CLIP``). Both get a tiny open_clip ViT instead of their image towers, and the BPE tokenizer
that ships with open_clip instead of SigLIP's sentencepiece one (a Hugging Face download).
"""

import json
import types

import open_clip
import pytest
import torch

from ldm.contrastive import FrozenTextEncoder, OpenCLIP
from ldm.metrics.clip_score import CLIPScore
from ldm.pipelines.clip_guidance import clip_similarity

PROMPTS = ["a red circle above a blue square", "two green triangles"]
TINY_VISION = {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}
TINY_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> ``local-dir:`` model name of a shrunk copy of that open_clip config."""
    names = {}
    for family, key in (("ViT-B-16-SigLIP", "custom"), ("ViT-B-32", "standard")):
        cfg = open_clip.get_model_config(family)
        cfg["embed_dim"], cfg["vision_cfg"] = 32, dict(TINY_VISION)
        cfg["text_cfg"].pop("hf_tokenizer_name", None)  # SigLIP's sentencepiece vocabulary is a download
        cfg["text_cfg"].update(TINY_TEXT)
        folder = tmp_path_factory.mktemp(key)
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
        names[key] = f"local-dir:{folder}"
    return names


def reference(enc: FrozenTextEncoder, name: str) -> OpenCLIP:
    """A separate model with the encoder's weights (free to be reconfigured)."""
    ref = OpenCLIP(model_name=name).eval()
    ref.load_state_dict(enc.model.state_dict())
    return ref


def images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (n, 3, 16, 16)


class PaddingTokenizer:
    """open_clip's BPE tokenizer padding with ``pad`` instead of 0, shaped like open_clip's HFTokenizer /
    SigLipTokenizer: ``.tokenizer`` is the wrapped tokenizer holding ``pad_token_id`` / ``eos_token_id``."""

    def __init__(self, base, pad: int, eos: int):
        self.base, self.tokenizer = base, types.SimpleNamespace(pad_token_id=pad, eos_token_id=eos)

    def __call__(self, texts):
        tokens = self.base(texts)  # (B, T), zero-padded
        return tokens.masked_fill(tokens == 0, self.tokenizer.pad_token_id)


def test_frozen_text_encoder_leaves_custom_text_clip_usable(tiny):
    enc = FrozenTextEncoder(model_name=tiny["custom"])
    assert type(enc.model.clip).__name__ == "CustomTextCLIP"
    tokens = enc.tokenizer(PROMPTS)
    out = enc(tokens)
    assert out["tokens"].shape == (2, 16, 32) and out["pooled"].shape == (2, 32)
    assert enc.model.clip.text.output_tokens is False  # the shared model is not reconfigured
    with torch.no_grad():
        pooled = enc.model.encode_text(tokens)  # (2, 32): still one tensor
    assert torch.allclose(out["pooled"], pooled, atol=1e-6)
    ref = reference(enc, tiny["custom"])
    ref.clip.text.output_tokens = True  # the tower's own per-token output, on a copy
    with torch.no_grad():
        ref_pooled, ref_tokens = ref.clip.text(tokens)
    assert torch.allclose(out["tokens"], ref_tokens, atol=1e-6)
    assert torch.allclose(out["pooled"], torch.nn.functional.normalize(ref_pooled, dim=-1), atol=1e-6)


def test_clip_score_with_the_text_encoders_clip(tiny):
    for tower in ("standard", "custom"):  # a diffusion run's text encoder shares its CLIP with the scorer
        enc = FrozenTextEncoder(model_name=tiny[tower])
        ref = reference(enc, tiny[tower])
        with torch.no_grad():
            expected = 100 * (ref.encode_image(images()) * ref.embed_texts(PROMPTS)).sum(1).clamp(min=0)  # (2,)
        metric = CLIPScore(enc.model)
        metric.update(images(), PROMPTS)
        assert torch.allclose(metric.compute(), expected.mean(), atol=1e-4), tower


def test_clip_guidance_with_the_text_encoders_clip(tiny):
    for tower in ("standard", "custom"):  # ClipGuided's default CLIP is the conditioner's text encoder's
        enc = FrozenTextEncoder(model_name=tiny[tower])
        ref = reference(enc, tiny[tower])
        x = images().requires_grad_(True)
        sim = clip_similarity(enc.model, x, PROMPTS)  # (2,)
        (grad,) = torch.autograd.grad(sim.sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, tower
        with torch.no_grad():
            expected = (ref.encode_image(images()) * ref.embed_texts(PROMPTS)).sum(1)
        assert torch.allclose(sim.detach(), expected, atol=1e-5), tower


@pytest.mark.parametrize("tower", ["custom", "standard"])
def test_mask_uses_the_tokenizers_pad_id(tiny, tower):
    enc = FrozenTextEncoder(model_name=tiny[tower])
    real = enc.tokenizer(PROMPTS + [""]) != 0  # (3, 16): start, words, end of the zero-padding tokenizer
    enc.model.tokenizer = PaddingTokenizer(enc.model.tokenizer, pad=1, eos=49407)  # '"' pads; id 1 unused below
    tokens = enc.tokenizer(PROMPTS + [""])
    assert (tokens == 1).any() and not (tokens == 0).any()
    out = enc(tokens)
    assert torch.equal(out["mask"], tokens != 1) and torch.equal(out["mask"], real)
    with torch.no_grad():
        assert torch.allclose(out["pooled"], enc.model.encode_text(tokens), atol=1e-6)


def test_mask_keeps_the_end_token_when_it_is_also_the_pad_token(tiny):
    enc = FrozenTextEncoder(model_name=tiny["custom"])
    eot, real = enc.tokenizer.eot_token_id, enc.tokenizer(PROMPTS + [""]) != 0  # (3, 16)
    enc.model.tokenizer = PaddingTokenizer(enc.model.tokenizer, pad=eot, eos=eot)  # as SigLIP's T5 vocabulary
    tokens = enc.tokenizer(PROMPTS + [""])
    out = enc(tokens)
    expected = tokens != eot
    expected[torch.arange(3), expected.sum(1)] = True  # the first end token
    assert torch.equal(out["mask"], expected) and torch.equal(out["mask"], real)
