"""Hugging Face ``transformers`` CLIP text models -> open_clip's text tower (``TextTransformer``).

Stable Diffusion 1.x conditions on the per-token output of OpenAI's CLIP ViT-L/14 text model, which diffusers
pipelines store as a ``transformers`` ``CLIPTextModel`` (``text_encoder/config.json`` + ``model.safetensors``);
the original single-file checkpoints hold the same keys under ``cond_stage_model.transformer.``. This maps them to
open_clip's ``TextTransformer`` (:class:`ldm.contrastive.text_tower.TextTower`), which computes the same function:

==========================================================  ==============================================
transformers ``text_model.``                                open_clip ``TextTransformer``
==========================================================  ==============================================
``embeddings.token_embedding.weight``                       ``token_embedding.weight``
``embeddings.position_embedding.weight``                    ``positional_embedding``
``encoder.layers.i.self_attn.{q,k,v}_proj``                 ``transformer.resblocks.i.attn.in_proj_*`` (stacked)
``encoder.layers.i.self_attn.out_proj``                     ``transformer.resblocks.i.attn.out_proj``
``encoder.layers.i.layer_norm1 / layer_norm2``              ``transformer.resblocks.i.ln_1 / ln_2``
``encoder.layers.i.mlp.fc1 / fc2``                          ``transformer.resblocks.i.mlp.c_fc / c_proj``
``final_layer_norm``                                        ``ln_final``
``text_projection.weight`` (``CLIPTextModelWithProjection``) ``text_projection`` (transposed); none otherwise
==========================================================  ==============================================

Pooling: transformers takes the first end token (or, for old configs with ``eos_token_id == 2``, the highest id),
open_clip ``pool_type`` ``eos`` / ``argmax``. ``hidden_act`` ``quick_gelu`` is OpenAI's activation.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

SUPPORTED_ACTIVATIONS = {"quick_gelu": True, "gelu": False}


def text_config_from_transformers(config: Mapping) -> tuple[dict, bool]:
    """(open_clip ``CLIPTextCfg`` fields, quick_gelu) of a transformers ``CLIPTextConfig`` dict (config.json)."""
    arch = (config.get("architectures") or ["CLIPTextModel"])[0]
    if config.get("model_type", "clip_text_model") != "clip_text_model":
        raise ValueError(f"text_encoder config: model_type {config.get('model_type')!r} is not a CLIP text model "
                         "(clip_text_model); only CLIP text encoders can be imported")
    act = config.get("hidden_act", "quick_gelu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"text_encoder config: hidden_act {act!r} is not supported (use one of "
                         f"{', '.join(SUPPORTED_ACTIVATIONS)})")
    width, eps = int(config["hidden_size"]), float(config.get("layer_norm_eps", 1e-5))
    if eps != 1e-5:
        raise ValueError(f"text_encoder config: layer_norm_eps {eps} (open_clip's text tower uses 1e-05)")
    eos = int(config.get("eos_token_id", 2))
    with_projection = arch == "CLIPTextModelWithProjection"
    text = {
        "context_length": int(config.get("max_position_embeddings", 77)),
        "vocab_size": int(config["vocab_size"]),
        "width": width,
        "heads": int(config["num_attention_heads"]),
        "layers": int(config["num_hidden_layers"]),
        "mlp_ratio": int(config["intermediate_size"]) / width,
        "pool_type": "argmax" if eos == 2 else "eos",
        "eos_id": eos,
        "proj_type": "linear" if with_projection else "none",
    }
    if with_projection:
        text["embed_dim"] = int(config["projection_dim"])
    return text, SUPPORTED_ACTIVATIONS[act]


def text_state_from_transformers(state: Mapping[str, Tensor], layers: int) -> dict[str, Tensor]:
    """open_clip ``TextTransformer`` state dict of a transformers ``CLIPTextModel`` state dict (keys with or without
    the ``text_model.`` prefix; ``text_projection.weight`` of a ``CLIPTextModelWithProjection`` included)."""
    src = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: dict[str, Tensor] = {}
    used = set()

    def take(key: str) -> Tensor:
        if key not in src:
            raise KeyError(f"text encoder weights: {key!r} is missing")
        used.add(key)
        return src[key]

    out["token_embedding.weight"] = take("embeddings.token_embedding.weight")
    out["positional_embedding"] = take("embeddings.position_embedding.weight")
    for i in range(layers):
        a, b = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[b + f"attn.in_proj_{kind}"] = torch.cat([take(a + f"self_attn.{p}_proj.{kind}") for p in "qkv"])
            out[b + f"attn.out_proj.{kind}"] = take(a + f"self_attn.out_proj.{kind}")
            out[b + f"ln_1.{kind}"] = take(a + f"layer_norm1.{kind}")
            out[b + f"ln_2.{kind}"] = take(a + f"layer_norm2.{kind}")
            out[b + f"mlp.c_fc.{kind}"] = take(a + f"mlp.fc1.{kind}")
            out[b + f"mlp.c_proj.{kind}"] = take(a + f"mlp.fc2.{kind}")
    out["ln_final.weight"] = take("final_layer_norm.weight")
    out["ln_final.bias"] = take("final_layer_norm.bias")
    if "text_projection.weight" in src:
        out["text_projection"] = take("text_projection.weight").t().contiguous()  # (W, D): x @ proj
    unused = sorted(k for k in src if k not in used and not k.endswith("position_ids"))
    if unused:
        raise KeyError(f"text encoder weights: {len(unused)} keys were not mapped, e.g. {unused[:3]} "
                       "(more layers than the config says?)")
    return out


def text_state_to_transformers(state: Mapping[str, Tensor], layers: int) -> dict[str, Tensor]:
    """The inverse of :func:`text_state_from_transformers`: a ``CLIPTextModel`` state dict (``text_model.`` keys)."""
    out: dict[str, Tensor] = {
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
    }
    for i in range(layers):
        a, b = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            for p, chunk in zip("qkv", state[b + f"attn.in_proj_{kind}"].chunk(3)):
                out[a + f"self_attn.{p}_proj.{kind}"] = chunk.contiguous()
            out[a + f"self_attn.out_proj.{kind}"] = state[b + f"attn.out_proj.{kind}"]
            out[a + f"layer_norm1.{kind}"] = state[b + f"ln_1.{kind}"]
            out[a + f"layer_norm2.{kind}"] = state[b + f"ln_2.{kind}"]
            out[a + f"mlp.fc1.{kind}"] = state[b + f"mlp.c_fc.{kind}"]
            out[a + f"mlp.fc2.{kind}"] = state[b + f"mlp.c_proj.{kind}"]
    return out


def text_config_to_transformers(text: Mapping, quick_gelu: bool) -> dict:
    """A ``CLIPTextConfig`` dict (config.json of ``CLIPTextModel``) of an open_clip text-tower config without
    projection (the inverse of :func:`text_config_from_transformers`)."""
    if text.get("proj_type", "linear") != "none":
        raise ValueError("only a text tower without projection (proj_type: none) exports as a CLIPTextModel")
    width = int(text["width"])
    eos = int(text.get("eos_id", 2)) if text.get("pool_type", "argmax") == "eos" else 2
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "hidden_act": "quick_gelu" if quick_gelu else "gelu", "hidden_size": width,
            "intermediate_size": int(round(float(text.get("mlp_ratio", 4.0)) * width)),
            "num_attention_heads": int(text["heads"]), "num_hidden_layers": int(text["layers"]),
            "max_position_embeddings": int(text.get("context_length", 77)), "vocab_size": int(text["vocab_size"]),
            "layer_norm_eps": 1e-5, "bos_token_id": 49406 if eos != 2 else 0, "eos_token_id": eos,
            "pad_token_id": 1, "torch_dtype": "float32"}
