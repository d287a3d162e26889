"""transformers CLIP text models -> open_clip's text tower: the same function (Stable Diffusion's text encoder)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from open_clip.model import CLIPTextCfg  # noqa: E402

from ldm.contrastive.text_encoder import text_features  # noqa: E402
from ldm.contrastive.text_tower import TextTower  # noqa: E402
from ldm.interop.text import (  # noqa: E402
    text_config_from_transformers,
    text_config_to_transformers,
    text_state_from_transformers,
    text_state_to_transformers,
)


def _config(**kw):
    base = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return transformers.CLIPTextConfig(**{**base, **kw})


def _random(model):
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        p.data = 1 + 0.1 * noise if p.ndim == 1 and name.endswith("weight") else 0.1 * noise
    return model.eval()


def _tokens():
    ids = torch.full((3, 77), 49407)
    ids[:, 0] = 49406
    ids[0, 1:4] = torch.tensor([320, 1125, 539])
    ids[1, 1] = 42
    ids[2, 1:76] = torch.arange(100, 175)  # no room for padding: the end token is the last
    return ids


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_text_model_equals_the_open_clip_tower(act):
    config = _config(hidden_act=act)
    model = _random(transformers.CLIPTextModel(config))
    text, quick_gelu = text_config_from_transformers({**config.to_dict(), "architectures": ["CLIPTextModel"]})
    tower = TextTower(CLIPTextCfg(**text), quick_gelu=quick_gelu).eval()
    tower.text.load_state_dict(text_state_from_transformers(model.state_dict(), text["layers"]))
    ids = _tokens()
    with torch.no_grad():
        ref = model(ids)
        pooled, feats = text_features(tower, ids)
    err = (ref.last_hidden_state - feats).abs().max().item(), (ref.pooler_output - pooled).abs().max().item()
    assert max(err) <= 1e-5, f"max abs difference (tokens, pooled): {err}"
    back = text_state_to_transformers(tower.text.state_dict(), text["layers"])  # the file layout: text_model.*
    original = {"text_model." + k.removeprefix("text_model."): v for k, v in model.state_dict().items()
                if not k.endswith("position_ids")}  # (transformers 5 leaves the prefix out of the module's keys)
    assert back.keys() == original.keys() and all(torch.equal(back[k], v) for k, v in original.items())
    again = text_config_to_transformers(text, quick_gelu)
    assert {k: again[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "hidden_act")} == \
        {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "hidden_act")}


def test_with_projection_the_pooled_embedding_is_projected():
    config = _config(projection_dim=24)
    model = _random(transformers.CLIPTextModelWithProjection(config))
    text, quick_gelu = text_config_from_transformers({**config.to_dict(),
                                                      "architectures": ["CLIPTextModelWithProjection"]})
    embed_dim = text.pop("embed_dim")
    tower = TextTower(CLIPTextCfg(**text), embed_dim=embed_dim, quick_gelu=quick_gelu).eval()
    tower.text.load_state_dict(text_state_from_transformers(model.state_dict(), text["layers"]))
    with torch.no_grad():
        ref = model(_tokens())
        pooled, _ = text_features(tower, _tokens())
    assert (ref.text_embeds - pooled).abs().max() <= 1e-5


def test_unsupported_configs_and_missing_weights_are_named():
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        text_config_from_transformers({**_config().to_dict(), "hidden_act": "relu"})
    state = _random(transformers.CLIPTextModel(_config())).state_dict()
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state.pop("final_layer_norm.bias")
    with pytest.raises(KeyError, match="final_layer_norm.bias"):
        text_state_from_transformers(state, 2)
