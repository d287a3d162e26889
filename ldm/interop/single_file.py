"""An original Stable Diffusion single-file checkpoint (CompVis / Stability ``.ckpt`` or ``.safetensors``) -> an ldm
run folder, in the layout :func:`ldm.interop.pipeline.import_diffusers` writes (``ldm convert single-file``).

The file holds three models under fixed prefixes, and no config:

============================================  =====================================  ================================
keys                                          model                                  converted by
============================================  =====================================  ================================
``model.diffusion_model.*``                   the U-Net                              ``unet_state_from_compvis``
``first_stage_model.*``                       the KL autoencoder                     ``autoencoder_state_from_compvis``
``cond_stage_model.transformer.*`` (SD 1.x)   OpenAI CLIP ViT-L/14 text, as          :mod:`ldm.interop.text`
                                              transformers' ``CLIPTextModel``
``cond_stage_model.model.*`` (SD 2.x)         OpenCLIP ViT-H/14, text part, in       (open_clip's own names)
                                              open_clip's ``CLIP`` names
============================================  =====================================  ================================

Every architecture number the tensor shapes tell is read from them: the U-Net's width, channel multipliers,
ResBlocks per level, attention levels, transformer depth, context width, input / output channels (an input wider
than the output by latent channels + 1 is SD's inpainting concat); the autoencoder's widths, levels, latent channels;
the text model's width, layers, MLP width, vocabulary and context length. What shapes cannot tell comes from the
version (``auto`` reads it from the text-encoder keys): SD 1.x 8 attention heads per U-Net level, SD 2.x one head
width of 64; the text model's heads width / 64 (both released text encoders; ``text_heads`` overrides it); GroupNorm
groups 32 and eps 1e-5; the latent scale factor 0.18215; scaled-linear betas 0.00085 - 0.012 over 1000 steps; and
the prediction, which only the user knows (``prediction``: SD 2.x 768-v models predict v, every other release eps).

SD 1.x conditions on the last layer of its text model, with a tokenizer that pads with the end token (a Hugging Face
tokenizer folder is written offline: :func:`~ldm.interop.tokenizer.write_clip_tokenizer`); SD 2.x on the penultimate
layer (``FrozenTextEncoder(layer=-2)``) through open_clip's ``SimpleTokenizer``, which pads with 0 as SD 2 does.
``.ckpt`` files are read weights-only (``torch.load(weights_only=True)``): one that pickles other Python objects is
refused, not executed. SDXL (``conditioner.embedders.*``) and files of other models are refused with what was found.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from open_clip.model import CLIPTextCfg, _build_text_tower
from torch import Tensor

from ldm.interop.unet import _check_keys, _strip_prefix

log = logging.getLogger(__name__)

VERSIONS = ("auto", "sd1", "sd2")
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction"}
SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
SD_GROUPS, SD_NORM_EPS = 32, 1e-5
SD1_HEADS, SD2_HEAD_DIM, TEXT_HEAD_DIM = 8, 64, 64
UNET, AUTOENCODER = "model.diffusion_model.", "first_stage_model."
SD1_TEXT, SD2_TEXT, SDXL_TEXT = "cond_stage_model.transformer.", "cond_stage_model.model.", "conditioner.embedders."
EMA_PREFIX = "model_ema."


# ----------------------------------------------------------------------------------------------------------------
# reading the file


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a single-file checkpoint: a ``.safetensors`` file, or a ``torch.save`` file (``.ckpt``) read
    weights-only, its ``state_dict`` when it has one. Floating-point tensors come back as float32."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            reason = f"found {found.group(1)}" if found else str(e).strip().splitlines()[-1][:200]
            raise ValueError(f"{path} was refused: it is read weights-only (torch.load(weights_only=True)) and pickles "
                             f"Python objects other than tensors: {reason}. Use the .safetensors release of the "
                             "model, or re-save only its state_dict where you trust the file") from None
        except (RuntimeError, EOFError) as e:
            raise ValueError(f"{path} is not a readable torch checkpoint: {e}") from None
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict (or a dict with 'state_dict')")
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def _found(state: Mapping[str, Tensor]) -> str:
    """What a state dict holds, by key prefix: ``model.diffusion_model (686 keys), first_stage_model (248 keys)``."""
    nested = ("model", "cond_stage_model", "conditioner")  # (model_ema.* names have their dots removed)
    count = Counter(".".join(k.split(".")[:2]) if k.split(".")[0] in nested and "." in k else k.split(".")[0]
                    for k in state)
    if any(k.startswith(SDXL_TEXT) for k in state):  # name SDXL's embedders by their index: conditioner.embedders.0
        count = Counter({**{p: n for p, n in count.items() if p != "conditioner.embedders"},
                         **Counter(".".join(k.split(".")[:3]) for k in state if k.startswith(SDXL_TEXT))})
    return ", ".join(f"{p} ({n} keys)" for p, n in count.most_common(8)) + (" ..." if len(count) > 8 else "")


def detect_version(state: Mapping[str, Tensor]) -> str:
    """``sd1`` or ``sd2``, from the text encoder's keys; a ValueError naming what was found for anything else."""
    if any(k.startswith(SDXL_TEXT) for k in state):
        raise ValueError(f"this is an SDXL-style checkpoint (conditioner.embedders.* keys: two text encoders and "
                         f"size conditioning), which ldm does not import; found {_found(state)}")
    for part, what in ((UNET, "U-Net"), (AUTOENCODER, "autoencoder")):
        if not any(k.startswith(part) for k in state):
            raise ValueError(f"not a Stable Diffusion 1.x / 2.x checkpoint: no {part}* keys (the {what}); "
                             f"found {_found(state)}")
    sd1, sd2 = (any(k.startswith(p) for k in state) for p in (SD1_TEXT, SD2_TEXT))
    if sd1 == sd2:
        raise ValueError(f"cannot tell Stable Diffusion 1.x ({SD1_TEXT}* keys: a CLIPTextModel) from 2.x "
                         f"({SD2_TEXT}* keys: OpenCLIP) by the text encoder; found {_found(state)}")
    return "sd1" if sd1 else "sd2"


# ----------------------------------------------------------------------------------------------------------------
# architecture from shapes


def _indices(state: Mapping[str, Tensor], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def _need(state: Mapping[str, Tensor], key: str, where: str) -> Tensor:
    if key not in state:
        raise ValueError(f"{where}: {key!r} is missing (is this a Stable Diffusion 1.x / 2.x checkpoint?)")
    return state[key]


def unet_kwargs_from_compvis(state: Mapping[str, Tensor], version: str) -> dict:
    """Our ``UNet(**kwargs)`` for the CompVis U-Net ``state`` (``model.diffusion_model.`` stripped): numbers from the
    tensor shapes, heads from ``version`` (``sd1``: 8 per level, ``sd2``: 64 wide). ``concat_channels`` is the input
    beyond the latent (5 for the inpainting models: masked-image latent and mask)."""
    where = "the U-Net (model.diffusion_model.*)"
    if any(k.startswith("label_emb.") for k in state):
        raise ValueError(f"{where} has label_emb.* (class or vector conditioning: the x4 upscaler, unCLIP); only "
                         "text-conditioned Stable Diffusion U-Nets are imported")
    conv_in = _need(state, "input_blocks.0.0.weight", where)  # (C, C_in, 3, 3)
    channels, in_total = conv_in.shape[:2]
    out_channels = _need(state, "out.2.weight", where).shape[0]
    if tuple(_need(state, "time_embed.0.weight", where).shape) != (4 * channels, channels):
        raise ValueError(f"{where}: time_embed.0.weight is {tuple(state['time_embed.0.weight'].shape)}, ours is "
                         f"(4 x {channels}, {channels})")
    n_in = len(_indices(state, r"input_blocks\.(\d+)\."))
    levels = 1 + len(_indices(state, r"input_blocks\.(\d+)\.0\.op\.weight"))
    if n_in % levels:
        raise ValueError(f"{where}: {n_in} input blocks do not split into {levels} levels of equal depth")
    res = n_in // levels - 1
    first = [1 + level * (res + 1) for level in range(levels)]  # the first ResBlock of each level
    mult = [_need(state, f"input_blocks.{n}.0.out_layers.3.weight", where).shape[0] // channels for n in first]
    attention_levels = [level for level, n in enumerate(first) if f"input_blocks.{n}.1.proj_in.weight" in state]
    attn2 = sorted(k for k in state if k.endswith(".transformer_blocks.0.attn2.to_k.weight"))
    if not attn2:
        raise ValueError(f"{where} has no cross-attention: not a text-conditioned Stable Diffusion U-Net")
    depths = {len(_indices(state, re.escape(k.split(".transformer_blocks.")[0]) + r"\.transformer_blocks\.(\d+)\."))
              for k in attn2}
    if len(depths) != 1:
        raise ValueError(f"{where}: transformer depths {sorted(depths)} differ between blocks (ours takes one)")
    concat = in_total - out_channels
    if concat not in (0, out_channels + 1):
        raise ValueError(f"{where} takes {in_total} input channels for {out_channels} output channels: only "
                         f"text-to-image ({out_channels}) and inpainting ({2 * out_channels + 1}) models are imported")
    heads = {"heads": SD1_HEADS, "head_dim": None} if version == "sd1" else {"heads": None, "head_dim": SD2_HEAD_DIM}
    return {"in_channels": out_channels, "out_channels": out_channels, "channels": channels, "channel_mult": mult,
            "num_res_blocks": res, "attention_levels": attention_levels, **heads, "transformer_depth": depths.pop(),
            "context_dim": state[attn2[0]].shape[1], "y_dim": None, "num_classes": None, "concat_channels": concat,
            "mid_attention": "middle_block.1.proj_in.weight" in state, "dropout": 0.0, "groups": SD_GROUPS,
            "norm_eps": SD_NORM_EPS}


def autoencoder_kwargs_from_compvis(state: Mapping[str, Tensor]) -> dict:
    """``{"encoder", "decoder", "bottleneck"}`` constructor arguments of our KL autoencoder for the CompVis
    autoencoder ``state`` (``first_stage_model.`` stripped), from its tensor shapes."""
    where = "the autoencoder (first_stage_model.*)"
    conv_in = _need(state, "encoder.conv_in.weight", where)  # (C, 3, 3, 3)
    channels, in_channels = conv_in.shape[:2]
    levels = _indices(state, r"encoder\.down\.(\d+)\.")
    res = len(_indices(state, r"encoder\.down\.0\.block\.(\d+)\."))
    mult = [_need(state, f"encoder.down.{lv}.block.0.conv2.weight", where).shape[0] // channels for lv in levels]
    latent = _need(state, "decoder.conv_in.weight", where).shape[1]
    moments = _need(state, "quant_conv.weight", where).shape[0]
    if moments != 2 * latent or state["encoder.conv_out.weight"].shape[0] != moments:
        raise ValueError(f"{where}: {moments} moment channels for {latent} latent channels: not a KL autoencoder "
                         "(a VQ first stage is not imported)")
    common = {"channels": channels, "channel_mult": mult, "num_res_blocks": res,
              "mid_attention": any(k.startswith("encoder.mid.attn_1.") for k in state), "groups": SD_GROUPS}
    attention = lambda part, side: [lv for lv in levels if any(k.startswith(f"{part}.{side}.{lv}.attn.")  # noqa: E731
                                                               for k in state)]
    return {"encoder": {"in_channels": in_channels, "out_channels": moments, **common,
                        "attention_levels": attention("encoder", "down")},
            "decoder": {"in_channels": latent, "out_channels": _need(state, "decoder.conv_out.weight", where).shape[0],
                        **common, "attention_levels": attention("decoder", "up"),
                        "latent_projection": "post_quant_conv.weight" in state},
            "bottleneck": {"in_channels": moments, "latent_channels": latent}}


def text_from_compvis(state: Mapping[str, Tensor], version: str, heads: int | None = None
                      ) -> tuple[dict, bool, dict[str, Tensor]]:
    """(open_clip ``CLIPTextCfg`` fields, quick_gelu, ``TextTransformer`` state dict) of a checkpoint's text encoder:
    ``cond_stage_model.transformer.*`` (SD 1.x, transformers' names) or ``cond_stage_model.model.*`` (SD 2.x,
    open_clip's). ``heads`` defaults to the width / 64 of both released text encoders."""
    from ldm.interop.text import text_config_from_transformers, text_state_from_transformers

    def n_heads(width: int) -> int:
        h = heads or max(1, width // TEXT_HEAD_DIM)
        if width % h:
            raise ValueError(f"the text encoder is {width} wide, which {h} heads do not divide (pass text_heads)")
        return h

    if version == "sd1":
        src = {k[len(SD1_TEXT):].removeprefix("text_model."): v for k, v in state.items() if k.startswith(SD1_TEXT)}
        where = f"the text encoder ({SD1_TEXT}*)"
        vocab, width = _need(src, "embeddings.token_embedding.weight", where).shape
        config = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
                  "hidden_size": width, "vocab_size": vocab, "num_attention_heads": n_heads(width),
                  "num_hidden_layers": len(_indices(src, r"encoder\.layers\.(\d+)\.")),
                  "intermediate_size": _need(src, "encoder.layers.0.mlp.fc1.weight", where).shape[0],
                  "max_position_embeddings": _need(src, "embeddings.position_embedding.weight", where).shape[0],
                  "eos_token_id": vocab - 1}  # OpenAI's BPE: the end token is the last id, pooled by position
        text, quick_gelu = text_config_from_transformers(config)
        return text, quick_gelu, text_state_from_transformers(src, text["layers"])

    src = {k[len(SD2_TEXT):]: v for k, v in state.items() if k.startswith(SD2_TEXT)}
    where = f"the text encoder ({SD2_TEXT}*)"
    ignored = [k for k in src if k in ("logit_scale", "logit_bias", "attn_mask") or k.startswith("visual.")]
    src = {k: v for k, v in src.items() if k not in ignored}
    vocab, width = _need(src, "token_embedding.weight", where).shape
    text = {"context_length": _need(src, "positional_embedding", where).shape[0], "vocab_size": vocab, "width": width,
            "heads": n_heads(width), "layers": len(_indices(src, r"transformer\.resblocks\.(\d+)\.")),
            "mlp_ratio": _need(src, "transformer.resblocks.0.mlp.c_fc.weight", where).shape[0] / width,
            "pool_type": "argmax", "proj_type": "none"}
    proj = src.pop("text_projection", None)
    if proj is not None and tuple(proj.shape) == (width, width):
        text["proj_type"] = "linear"  # kept: the pooled embedding (a text tower's embed_dim is its width)
        src["text_projection"] = proj
    return text, False, src


# ----------------------------------------------------------------------------------------------------------------
# the import


def import_single_file(checkpoint: str | os.PathLike, out: str | os.PathLike, *, version: str = "auto",
                       prediction: str | None = None, image_size: int | None = None, overwrite: bool = False,
                       text_heads: int | None = None, ema: bool = False) -> Path:
    """Import a Stable Diffusion 1.x / 2.x single-file checkpoint into the run folder ``out`` (the layout of
    :func:`~ldm.interop.pipeline.import_diffusers`); returns ``out``.

    ``version``: ``auto`` (from the text-encoder keys), ``sd1`` or ``sd2``; ``prediction``: ``epsilon`` (default) or
    ``v`` (SD 2.x 768-v); ``image_size``: the run's default sampling size (SD 1.x 512; SD 2.x 768 for v, else 512);
    ``text_heads``: the text model's attention heads (default width / 64); ``ema``: the U-Net's ``model_ema.*``
    weights instead of ``model.*`` (files that hold both, e.g. ``v1-5-pruned.ckpt``).
    """
    from safetensors.torch import save_file

    from ldm.autoencoder import Autoencoder, Decoder, DiagonalGaussian, Encoder
    from ldm.diffusion.unet import UNet
    from ldm.interop.autoencoder import SD_SCALE_FACTOR, autoencoder_state_from_compvis
    from ldm.interop.pipeline import prepare_output, schedule_spec, write_sd_run
    from ldm.interop.tokenizer import END, write_clip_tokenizer
    from ldm.interop.unet import unet_state_from_compvis

    if version not in VERSIONS:
        raise ValueError(f"version {version!r}: use one of {', '.join(VERSIONS)}")
    if prediction not in (None, *PREDICTIONS):
        raise ValueError(f"prediction {prediction!r}: use one of {', '.join(PREDICTIONS)}")
    src = Path(checkpoint).expanduser()
    state = read_checkpoint(src)
    detected = detect_version(state)
    if version != "auto" and version != detected:
        text_keys = SD1_TEXT if version == "sd1" else SD2_TEXT
        raise ValueError(f"--version {version}: this file has no {text_keys}* keys (its text encoder is {detected}'s); "
                         f"found {_found(state)}")
    version = detected
    if prediction is None:
        prediction = "epsilon"
        if version == "sd2":
            log.warning("an SD 2.x checkpoint imported as an eps-prediction model: the 768-px 2.x models (768-v) "
                        "predict v; pass prediction='v' / --prediction v for them")

    # the U-Net
    unet_state = _strip_prefix({k: v for k, v in state.items() if k.startswith(UNET)}, UNET)  # (prefix removed)
    if ema:
        ema_keys = {k: EMA_PREFIX + ("diffusion_model." + k).replace(".", "") for k in unet_state}
        missing = [v for v in ema_keys.values() if v not in state]
        if len(missing) == len(ema_keys):
            raise ValueError(f"ema: this file has no {EMA_PREFIX}* U-Net weights; found {_found(state)}")
        if missing:
            raise ValueError(f"ema: {len(missing)} U-Net tensors have no {EMA_PREFIX} copy, e.g. {missing[:3]}")
        unet_state = {k: state[v] for k, v in ema_keys.items()}
    unet_kwargs = unet_kwargs_from_compvis(unet_state, version)
    with torch.device("meta"):
        skeleton = UNet(**unet_kwargs).state_dict()
    ours = unet_state_from_compvis(unet_state)
    _check_keys(skeleton, ours, f"a U-Net with the numbers read from its shapes ({unet_kwargs})")
    concat = unet_kwargs["concat_channels"]
    if concat:  # SD: [noisy latent, mask, masked-image latent]; ours: [noisy latent, masked latent, mask]
        c = unet_kwargs["in_channels"]
        order = [*range(c), *range(c + 1, 2 * c + 1), c]
        ours["input_blocks.0.0.weight"] = ours["input_blocks.0.0.weight"][:, order]
    unet = UNet(**unet_kwargs)
    unet.load_state_dict(ours)

    # the autoencoder
    ae_state = {k: v for k, v in _strip_prefix({k: v for k, v in state.items() if k.startswith(AUTOENCODER)},
                                               AUTOENCODER).items() if not k.startswith("loss.")}
    ae_kwargs = autoencoder_kwargs_from_compvis(ae_state)
    autoencoder = Autoencoder(Encoder(**ae_kwargs["encoder"]), Decoder(**ae_kwargs["decoder"]),
                              DiagonalGaussian(**ae_kwargs["bottleneck"]))
    ae_ours = autoencoder_state_from_compvis(ae_state, SD_SCALE_FACTOR)
    _check_keys(autoencoder.state_dict(), ae_ours,
                f"an autoencoder with the numbers read from its shapes ({ae_kwargs})")
    autoencoder.load_state_dict(ae_ours)
    latent = ae_kwargs["bottleneck"]["latent_channels"]
    if unet_kwargs["out_channels"] != latent:
        raise ValueError(f"the U-Net predicts {unet_kwargs['out_channels']} channels, the autoencoder's latent has "
                         f"{latent}")

    # the text encoder
    text, quick_gelu, text_state = text_from_compvis(state, version, text_heads)
    with torch.device("meta"):
        tower = _build_text_tower(text["width"], CLIPTextCfg(**text), quick_gelu=quick_gelu).state_dict()
    _check_keys(tower, text_state, f"an open_clip text tower with the numbers read from its shapes ({text})")
    if unet_kwargs["context_dim"] != text["width"]:
        raise ValueError(f"the U-Net cross-attends to {unet_kwargs['context_dim']}-wide features, the text encoder's "
                         f"are {text['width']} wide")

    out = prepare_output(out, overwrite)
    (out / "text_encoder").mkdir()
    weights = out / "text_encoder" / "model.safetensors"
    save_file({k: v.contiguous() for k, v in text_state.items()}, str(weights))
    encoder: dict = {"text": text, "quick_gelu": quick_gelu, "pretrained": str(weights)}
    if version == "sd1":
        encoder["tokenizer"] = str(write_clip_tokenizer(out / "text_encoder" / "tokenizer", pad_token=END,
                                                        context_length=text["context_length"]))
    else:
        encoder["layer"] = -2

    factor = 2 ** (len(ae_kwargs["encoder"]["channel_mult"]) - 1)
    size = image_size or (768 if version == "sd2" and prediction == "v" else 512)
    linear = any(k.endswith(".proj_in.weight") and v.ndim == 2 for k, v in unet_state.items())  # SD 2.x: Linear
    write_sd_run(out, autoencoder=autoencoder, unet=unet, unet_kwargs=unet_kwargs, text_encoder=encoder,
                 precond=schedule_spec({**SD_SCHEDULER, "prediction_type": PREDICTIONS[prediction]}),
                 image_size=size, source=str(src), autoencoder_source=f"{src} ({AUTOENCODER}*)",
                 unet_options={"use_linear_projection": linear, "sample_size": size // factor},
                 inpainting=bool(concat))
    (out / "IMPORTED.md").write_text(_note(src, state, version, prediction, size, bool(concat), ema))
    return out


def _note(src: Path, state: Mapping[str, Tensor], version: str, prediction: str, size: int, inpainting: bool,
          ema: bool) -> str:
    text = {"sd1": "the CLIP ViT-L/14 text model (last layer; tokenizer padding with the end token)",
            "sd2": "the OpenCLIP text tower (penultimate layer; open_clip's tokenizer, padding with 0)"}[version]
    ignored = sorted({p for p in _found(state).split(", ") if not p.startswith(("model.diffusion_model",
                      "first_stage_model", "cond_stage_model"))})
    lines = [
        f"# Imported from {src}\n",
        f"- a Stable Diffusion {version[-1]}.x single-file checkpoint: U-Net ({'model_ema' if ema else 'model'}."
        f"diffusion_model.*), KL autoencoder (first_stage_model.*), {text}",
        f"- prediction {prediction} (given at import; a file does not say), scaled_linear betas 0.00085 - 0.012 over "
        "1000 steps, latent scale factor 0.18215; `ldm sample --sampler ddim --spacing trailing` equals diffusers' "
        "`DDIMScheduler(timestep_spacing='trailing', set_alpha_to_one=True)`",
        f"- default image size: {size} px",
        "- not imported: the autoencoder's discriminator and loss (freshly initialised)"
        + (f"; other keys of the file: {', '.join(ignored)}" if ignored else ""),
    ]
    if not ema and any(k.startswith(EMA_PREFIX + "diffusion_model") for k in state):
        lines.append("- the file also holds EMA weights of the U-Net (model_ema.*): `ldm convert single-file --ema` "
                     "imports those instead")
    if inpainting:
        lines.append("- an inpainting U-Net: its concat input is [masked-image latent, mask] here (the first conv's "
                     "input channels were reordered from SD's [mask, masked-image latent]); ldm's inpainting masks "
                     "the image's latent, where SD encodes the masked image, so results differ from SD's pipeline")
    return "\n".join(lines) + "\n"
