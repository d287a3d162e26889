"""The conditional U-Net's weights in diffusers' and in the CompVis / Stability layouts, both ways.

Pure functions on state dicts (no diffusers import): a diffusers ``UNet2DConditionModel`` folder is its
``config.json`` and its ``diffusion_pytorch_model.safetensors``; a Stable Diffusion single-file checkpoint
(``.ckpt`` / ``.safetensors``) holds the U-Net under ``model.diffusion_model.``.

Our :class:`ldm.diffusion.UNet` is the CompVis U-Net (Rombach et al. 2022; ``openaimodel.UNetModel``) with
module names of our own, so the CompVis map renames inside each layer and keeps every block index:

====================================  ====================================  ======================================
ours                                  CompVis (``model.diffusion_model.``)  diffusers
====================================  ====================================  ======================================
time_embed.linear_1 / linear_2        time_embed.0 / time_embed.2           time_embedding.linear_1 / linear_2
y_embed.0 / y_embed.2 (vector y)      label_emb.0.0 / label_emb.0.2         class_embedding.linear_1 / linear_2
y_embed (class labels)                label_emb                             class_embedding
input_blocks.0.0                      input_blocks.0.0                      conv_in
input_blocks.N.0 (ResBlock)           input_blocks.N.0                      down_blocks.l.resnets.j
  norm1, conv1, emb, norm2,             in_layers.0, in_layers.2,             norm1, conv1, time_emb_proj, norm2,
  conv2, skip                           emb_layers.1, out_layers.0,           conv2, conv_shortcut
                                        out_layers.3, skip_connection
input_blocks.N.1 (SpatialTransformer) input_blocks.N.1                      down_blocks.l.attentions.j
  norm, proj_in, blocks.i, proj_out     norm, proj_in, transformer_blocks.i,  norm, proj_in, transformer_blocks.i,
                                        proj_out                              proj_out
input_blocks.N.0.conv (Downsample)    input_blocks.N.0.op                   down_blocks.l.downsamplers.0.conv
middle_block.0 / .1 / .2              middle_block.0 / .1 / .2              mid_block.resnets.0 / attentions.0 /
                                                                            resnets.1
output_blocks.N.K                     output_blocks.N.K                     up_blocks.i.resnets.j / attentions.j /
                                                                            upsamplers.0
out.0 / out.2                         out.0 / out.2                         conv_norm_out / conv_out
====================================  ====================================  ======================================

with ``N = 1 + l (R + 1) + j`` on the way down (``R = num_res_blocks``, level ``l``, block ``j``; ``j = R`` is the
downsample) and ``N = i (R + 1) + j`` on the way up (``i = 0`` the deepest level). Inside a transformer block
(norm1, attn1.to_q/k/v/to_out.0, norm2, attn2, norm3, ff.net.0.proj, ff.net.2) the three layouts agree. The
transformers' ``proj_in`` / ``proj_out`` are Linear layers here, 1x1 convs in SD 1.x (diffusers
``use_linear_projection=False``) and Linear in SD 2.x: they convert by reshaping (C, C, 1, 1) <-> (C, C).

diffusers' ``attention_head_dim`` is, for this model, the number of heads per level (its legacy meaning;
``num_attention_heads`` defaults to it): SD 1.x has 8 at every level (our ``heads=8``), SD 2.x 5-10-20-20 at
widths 320-640-1280-1280, one head width of 64 (our ``head_dim=64``). Configs that neither describes are
refused, as is every option our U-Net does not have (the error names the key).

The GroupNorms of the ResBlocks and of the output use ``norm_eps`` (1e-5 in SD, diffusers and CompVis), which
is carried into our ``UNet(norm_eps=...)``; the spatial transformers' GroupNorm is 1e-6 in all three.

``upcast_attention=True`` (the SD 2.1 U-Net config; CompVis' ``ATTN_PRECISION=fp32``) is accepted: it changes
no weight and, in float32, not the function either. It is a numerics choice under reduced precision: diffusers
then computes the attention scores and softmax in float32, while our attention runs
``scaled_dot_product_attention`` in the autocast dtype (bf16 / fp16 kernels accumulate in float32 themselves,
but the scores are rounded to that dtype). Sampling SD 2.1 in float16 can differ from diffusers' by more than
the usual half-precision noise; bfloat16 or float32 avoid the overflow the option guards against.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ldm.diffusion.unet import UNet

COMPVIS_PREFIX = "model.diffusion_model."

# ----------------------------------------------------------------------------------------------------------------
# shared helpers (also used by ldm.interop.autoencoder)


def _fit(value: Tensor, shape: Iterable[int], key: str) -> Tensor:
    """``value`` as ``shape``: a 1x1 conv weight (O, I, 1, 1) and a Linear weight (O, I) convert by reshaping."""
    shape = tuple(shape)
    if tuple(value.shape) == shape:
        return value
    conv_linear = {value.ndim, len(shape)} == {2, 4} and tuple(value.shape[:2]) == shape[:2]
    if conv_linear and all(s == 1 for s in (*value.shape[2:], *shape[2:])):
        return value.reshape(shape)
    raise ValueError(f"{key}: a tensor of shape {tuple(value.shape)} where {shape} is expected")


def _check_keys(expected: Iterable[str], got: Iterable[str], what: str) -> None:
    """Raise a ValueError naming (up to 8 of) the missing and the unexpected keys of a state dict."""
    expected, got = set(expected), set(got)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise ValueError(f"this state dict does not match {what}: {len(missing)} missing keys {missing[:8]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:8]}")


def _rename(rest: str, table: Iterable[tuple[str, str]], key: str) -> str:
    """``rest`` with the first matching prefix of ``table`` (pairs old -> new) replaced."""
    for old, new in table:
        if rest.startswith(old):
            return new + rest[len(old):]
    raise ValueError(f"no conversion rule for the key {key!r}")


def _swap(table: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((b, a) for a, b in table)


def _strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix`` (prefix removed) when any key has it, else the whole state."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def _refuse(config: Mapping, supported: Mapping[str, tuple], what: str) -> None:
    """Raise a ValueError naming every key of ``config`` whose value is not one of ``supported[key]``."""
    bad = {k: config[k] for k, ok in supported.items() if k in config and config[k] not in ok}
    if bad:
        detail = "; ".join(f"{k}={v!r} (supported: {', '.join(map(repr, supported[k]))})" for k, v in bad.items())
        raise ValueError(f"{what} config not supported: {detail}")


def _refuse_unknown(config: Mapping, known: Iterable[str], what: str) -> None:
    unknown = sorted(k for k in config if not k.startswith("_") and k not in set(known))
    if unknown:
        raise ValueError(f"{what} config has keys this converter does not know: {unknown}")


def _one(value, key: str, n: int):
    """An int, or a list of ``n`` equal per-level entries, as one value (a ValueError naming ``key`` otherwise)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{key}={value!r}: expected {n} entries, one per level")
        if len({repr(v) for v in value}) != 1:
            raise ValueError(f"{key}={value!r}: per-level values that differ are not supported (ours takes one)")
        return value[0]
    return value


def _state(module_or_state: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    return dict(module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state)


# ----------------------------------------------------------------------------------------------------------------
# the renames inside a layer (ours -> theirs)

_RES_DIFFUSERS = (("norm1.", "norm1."), ("conv1.", "conv1."), ("emb.", "time_emb_proj."), ("norm2.", "norm2."),
                  ("conv2.", "conv2."), ("skip.", "conv_shortcut."))
_RES_COMPVIS = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("emb.", "emb_layers.1."),
                ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("skip.", "skip_connection."))
_TRANSFORMER = (("norm.", "norm."), ("proj_in.", "proj_in."), ("blocks.", "transformer_blocks."),
                ("proj_out.", "proj_out."))
_TOP_DIFFUSERS = (("time_embed.linear_1.", "time_embedding.linear_1."),
                  ("time_embed.linear_2.", "time_embedding.linear_2."),
                  ("y_embed.0.", "class_embedding.linear_1."), ("y_embed.2.", "class_embedding.linear_2."),
                  ("y_embed.weight", "class_embedding.weight"), ("input_blocks.0.0.", "conv_in."),
                  ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."))
_TOP_COMPVIS = (("time_embed.linear_1.", "time_embed.0."), ("time_embed.linear_2.", "time_embed.2."),
                ("y_embed.0.", "label_emb.0.0."), ("y_embed.2.", "label_emb.0.2."),
                ("y_embed.weight", "label_emb.weight"), ("input_blocks.0.0.", "input_blocks.0.0."),
                ("out.0.", "out.0."), ("out.2.", "out.2."))
_BLOCK = re.compile(r"(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.(\d+)\.(.+)")


def _kind(rest: str) -> str:
    """The layer a key inside one of our U-Net blocks belongs to, from its first name."""
    first = rest.split(".")[0]
    if first in ("norm1", "conv1", "emb", "norm2", "conv2", "skip"):
        return "res"
    if first in ("norm", "proj_in", "blocks", "proj_out"):
        return "transformer"
    if first == "conv":
        return "sample"
    raise ValueError(f"no conversion rule for {rest!r}")


def _compvis_kind(rest: str) -> str:
    first = rest.split(".")[0]
    if first in ("in_layers", "emb_layers", "out_layers", "skip_connection"):
        return "res"
    if first in ("norm", "proj_in", "transformer_blocks", "proj_out"):
        return "transformer"
    if first in ("op", "conv"):
        return "sample"
    raise ValueError(f"no conversion rule for {rest!r}")


def _is_projection(key: str) -> bool:
    """A spatial transformer's proj_in / proj_out weight (Linear here, a 1x1 conv in SD 1.x)."""
    return bool(re.search(r"(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+\.proj_(in|out)\.weight$", key))


def _to_diffusers_key(key: str, num_res_blocks: int) -> str:
    for old, new in _TOP_DIFFUSERS:
        if key.startswith(old):
            return new + key[len(old):]
    m = _BLOCK.fullmatch(key)
    if m is None:
        raise ValueError(f"no conversion rule for the key {key!r}")
    block, index, rest = m.group(1), int(m.group(2)), m.group(3)
    kind = _kind(rest)
    if block == "middle_block":
        prefix = {"res": f"mid_block.resnets.{min(index, 1)}.", "transformer": "mid_block.attentions.0."}[kind]
    else:
        down = block.startswith("input")
        n = int(block.split(".")[1])
        level, j = divmod(n - 1 if down else n, num_res_blocks + 1)
        prefix = f"{'down' if down else 'up'}_blocks.{level}." + {
            "res": f"resnets.{j}.", "transformer": f"attentions.{j}.",
            "sample": "downsamplers.0." if down else "upsamplers.0."}[kind]
    table = {"res": _RES_DIFFUSERS, "transformer": _TRANSFORMER, "sample": (("conv.", "conv."),)}[kind]
    return prefix + _rename(rest, table, key)


def _to_compvis_key(key: str) -> str:
    for old, new in _TOP_COMPVIS:
        if key.startswith(old):
            return new + key[len(old):]
    m = _BLOCK.fullmatch(key)
    if m is None:
        raise ValueError(f"no conversion rule for the key {key!r}")
    kind = _kind(m.group(3))
    sample = (("conv.", "op." if m.group(1).startswith("input") else "conv."),)
    table = {"res": _RES_COMPVIS, "transformer": _TRANSFORMER, "sample": sample}[kind]
    return f"{m.group(1)}.{m.group(2)}." + _rename(m.group(3), table, key)


def _from_compvis_key(key: str) -> str:
    for new, old in _TOP_COMPVIS:
        if key.startswith(old):
            return new + key[len(old):]
    m = _BLOCK.fullmatch(key)
    if m is None:
        raise ValueError(f"no conversion rule for the CompVis U-Net key {key!r}")
    kind = _compvis_kind(m.group(3))
    table = {"res": _swap(_RES_COMPVIS), "transformer": _swap(_TRANSFORMER),
             "sample": (("op.", "conv."), ("conv.", "conv."))}[kind]
    return f"{m.group(1)}.{m.group(2)}." + _rename(m.group(3), table, key)


# ----------------------------------------------------------------------------------------------------------------
# diffusers config <-> our constructor arguments

# option: the values our U-Net can express (diffusers' defaults are among them, so absent keys are fine)
_UNET_SUPPORTED: dict[str, tuple] = {
    "center_input_sample": (False,), "flip_sin_to_cos": (True,), "freq_shift": (0,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False), "downsample_padding": (1,), "mid_block_scale_factor": (1,),
    "act_fn": ("silu",), "reverse_transformer_layers_per_block": (None,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "num_attention_heads": (None,), "dual_cross_attention": (False,),
    "class_embed_type": (None, "projection"), "addition_embed_type": (None,),
    "upcast_attention": (False, True),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",), "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "cross_attention_norm": (None,),
}
_UNET_READ = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
              "layers_per_block", "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
              "attention_head_dim", "use_linear_projection", "projection_class_embeddings_input_dim",
              "num_class_embeds", "dropout", "time_embedding_dim")
_UNET_IGNORED = ("sample_size", "addition_time_embed_dim", "addition_embed_type_num_heads")


def unet_kwargs_from_diffusers(config: Mapping, concat_channels: int = 0) -> dict:
    """Our ``UNet(**kwargs)`` for a diffusers ``UNet2DConditionModel`` config (its config.json as a dict).

    ``concat_channels``: how many of the config's ``in_channels`` are conditioning channels stacked onto the
    noisy latent (5 for SD inpainting: mask and masked-image latents), our ``UNet(concat_channels=)``.
    Raises a ValueError naming the key for anything our U-Net cannot express.
    """
    what = "UNet2DConditionModel"
    _refuse_unknown(config, (*_UNET_SUPPORTED, *_UNET_READ, *_UNET_IGNORED), what)
    _refuse(config, _UNET_SUPPORTED, what)
    only = config.get("only_cross_attention", False)
    if isinstance(only, (list, tuple)) and any(only):
        raise ValueError(f"{what} config not supported: only_cross_attention={only!r}")
    boc = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(boc)
    down = list(config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = list(config.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    if len(down) != n or any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        raise ValueError(f"{what} config not supported: down_block_types={down!r} (one CrossAttnDownBlock2D or "
                         f"DownBlock2D per entry of block_out_channels)")
    attention_levels = [i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D"]
    mirror = ["CrossAttnUpBlock2D" if i in attention_levels else "UpBlock2D" for i in reversed(range(n))]
    if up != mirror:
        raise ValueError(f"{what} config not supported: up_block_types={up!r} (ours mirrors down_block_types: "
                         f"{mirror})")
    channels = boc[0]
    if any(c % channels for c in boc):
        raise ValueError(f"{what} config not supported: block_out_channels={boc} are not multiples of the first")
    time_dim = config.get("time_embedding_dim")
    if time_dim not in (None, 4 * channels):
        raise ValueError(f"{what} config not supported: time_embedding_dim={time_dim} (ours is 4 x "
                         f"block_out_channels[0] = {4 * channels})")
    groups = config.get("norm_num_groups", 32)
    if groups is None:
        raise ValueError(f"{what} config not supported: norm_num_groups=None (no output GroupNorm)")
    context_dim = _one(config.get("cross_attention_dim", 1280), "cross_attention_dim", n)
    if context_dim is None:
        raise ValueError(f"{what} config not supported: cross_attention_dim=None")
    depth = _one(config.get("transformer_layers_per_block", 1), "transformer_layers_per_block", n)
    if not isinstance(depth, int):
        raise ValueError(f"{what} config not supported: transformer_layers_per_block={depth!r}")

    # heads: diffusers' attention_head_dim is the number of heads per level; the middle block uses the last level's
    head_cfg = config.get("attention_head_dim", 8)
    heads = list(head_cfg) if isinstance(head_cfg, (list, tuple)) else [head_cfg] * n
    if len(heads) != n:
        raise ValueError(f"attention_head_dim={head_cfg!r}: expected {n} entries, one per level")
    used = sorted({*attention_levels, n - 1})
    kw_heads: dict = {}
    if len({heads[i] for i in used}) == 1:
        kw_heads = {"heads": heads[used[0]], "head_dim": None}
    elif all(boc[i] % heads[i] == 0 for i in used) and len({boc[i] // heads[i] for i in used}) == 1:
        kw_heads = {"heads": None, "head_dim": boc[used[0]] // heads[used[0]]}
    else:
        widths = [boc[i] // heads[i] for i in used]
        raise ValueError(f"{what} config not supported: attention_head_dim={head_cfg!r} gives neither one number of "
                         f"heads nor one head width (widths {widths}) across the attention levels {used}")

    y_dim = num_classes = None
    if config.get("class_embed_type") == "projection":
        y_dim = config.get("projection_class_embeddings_input_dim")
        if y_dim is None:
            raise ValueError("class_embed_type='projection' needs projection_class_embeddings_input_dim")
    elif config.get("num_class_embeds") is not None:
        num_classes = config["num_class_embeds"]
    in_channels = config.get("in_channels", 4)
    if not 0 <= concat_channels < in_channels:
        raise ValueError(f"concat_channels={concat_channels} must be below the config's in_channels={in_channels}")
    return {
        "in_channels": in_channels - concat_channels, "out_channels": config.get("out_channels", 4),
        "channels": channels, "channel_mult": [c // channels for c in boc],
        "num_res_blocks": _one(config.get("layers_per_block", 2), "layers_per_block", n),
        "attention_levels": attention_levels, **kw_heads, "transformer_depth": depth, "context_dim": context_dim,
        "y_dim": y_dim, "num_classes": num_classes, "concat_channels": concat_channels, "mid_attention": True,
        "dropout": float(config.get("dropout", 0.0)), "groups": groups, "norm_eps": float(config.get("norm_eps", 1e-5)),
    }


def unet_export_options(config: Mapping) -> dict:
    """The keyword arguments of :func:`unet_to_diffusers` that reproduce a diffusers config's layout choices."""
    return {"use_linear_projection": bool(config.get("use_linear_projection", False)),
            "sample_size": config.get("sample_size")}


def _skeleton(kwargs: Mapping) -> UNet:
    """Our U-Net on the meta device: its key names and shapes, no memory."""
    with torch.device("meta"):
        return UNet(**kwargs)


def unet_state_from_diffusers(config: Mapping, state_dict: Mapping[str, Tensor], concat_channels: int = 0
                              ) -> dict[str, Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict -> ours, for ``UNet(**unet_kwargs_from_diffusers(config))``."""
    kwargs = unet_kwargs_from_diffusers(config, concat_channels)
    shapes = {k: v.shape for k, v in _skeleton(kwargs).state_dict().items()}
    names = {k: _to_diffusers_key(k, kwargs["num_res_blocks"]) for k in shapes}
    _check_keys(names.values(), state_dict, "a diffusers UNet2DConditionModel of this config")
    return {k: _fit(state_dict[names[k]], shapes[k], names[k]) for k in shapes}


def unet_from_diffusers(config: Mapping, state_dict: Mapping[str, Tensor], concat_channels: int = 0) -> UNet:
    """Our U-Net with the weights of a diffusers ``UNet2DConditionModel`` (config.json dict, state dict)."""
    unet = UNet(**unet_kwargs_from_diffusers(config, concat_channels))
    unet.load_state_dict(unet_state_from_diffusers(config, state_dict, concat_channels))
    return unet


def unet_to_diffusers(unet: UNet, use_linear_projection: bool = False, sample_size: int | None = None
                      ) -> tuple[dict, dict[str, Tensor]]:
    """Our U-Net -> (config, state dict) of a diffusers ``UNet2DConditionModel``.

    The config loads with ``UNet2DConditionModel.from_config`` and the state dict with ``load_state_dict(strict=True)``.
    ``use_linear_projection``: the transformers' proj_in / proj_out as Linear (SD 2.x) or 1x1 convs (SD 1.x);
    ``sample_size``: the latent size recorded in the config (pipelines default their image size to it).
    """
    if not unet.mid_attention:
        raise ValueError("a U-Net without mid_attention has no diffusers counterpart (UNetMidBlock2D has one ResBlock)")
    if unet.context_dim is None:
        raise ValueError("a U-Net without cross-attention (context_dim=None) has no UNet2DConditionModel counterpart")
    odd = sorted({m.num_channels for m in unet.modules() if isinstance(m, nn.GroupNorm) and m.num_groups != unet.groups})
    if odd:
        raise ValueError(f"widths {odd} are not divisible by groups={unet.groups}: diffusers' GroupNorms need them to be")
    boc = [unet.channels * m for m in unet.channel_mult]
    n = len(boc)
    if unet.heads is not None:
        head_cfg: int | list[int] = unet.heads
    else:
        bad = [c for c in boc if c % unet.head_dim]
        if bad:
            raise ValueError(f"widths {bad} are not multiples of head_dim={unet.head_dim}: diffusers can't express it")
        head_cfg = [c // unet.head_dim for c in boc]
    config: dict = {
        "_class_name": "UNet2DConditionModel", "sample_size": sample_size,
        "in_channels": unet.in_channels + unet.concat_channels, "out_channels": unet.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if i in unet.attention_levels else "DownBlock2D" for i in range(n)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if i in unet.attention_levels else "UpBlock2D"
                           for i in reversed(range(n))],
        "block_out_channels": boc, "layers_per_block": unet.num_res_blocks,
        "transformer_layers_per_block": unet.transformer_depth, "attention_head_dim": head_cfg,
        "cross_attention_dim": unet.context_dim, "use_linear_projection": use_linear_projection,
        "norm_num_groups": unet.groups, "norm_eps": unet.norm_eps, "dropout": unet.dropout,
        "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    }
    if unet.y_dim is not None:
        config.update(class_embed_type="projection", projection_class_embeddings_input_dim=unet.y_dim)
    elif unet.num_classes is not None:
        config.update(num_class_embeds=unet.num_classes)
    state = {}
    for key, value in unet.state_dict().items():
        if _is_projection(key) and not use_linear_projection:
            value = value[:, :, None, None]  # Linear (C_out, C_in) -> 1x1 conv (C_out, C_in, 1, 1)
        state[_to_diffusers_key(key, unet.num_res_blocks)] = value
    return config, state


# ----------------------------------------------------------------------------------------------------------------
# the CompVis / Stability single-file layout


def unet_state_from_compvis(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The U-Net of a CompVis / Stability checkpoint (``model.diffusion_model.`` keys, prefix stripped or not;
    other keys of a full checkpoint are ignored) -> our U-Net's state dict. 1x1-conv (SD 1.x) and Linear (SD 2.x)
    transformer projections both become our Linear weights."""
    out = {}
    for key, value in _strip_prefix(state, COMPVIS_PREFIX).items():
        ours = _from_compvis_key(key)
        if _is_projection(ours) and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv (C_out, C_in, 1, 1) -> Linear (C_out, C_in)
        out[ours] = value
    return out


def unet_state_to_compvis(unet: UNet | Mapping[str, Tensor], use_linear_projection: bool = False,
                          prefix: str = "") -> dict[str, Tensor]:
    """Our U-Net (or its state dict) -> CompVis / Stability key names (``prefix`` e.g. ``"model.diffusion_model."``).

    ``use_linear_projection``: keep the transformers' proj_in / proj_out as Linear (SD 2.x files) instead of
    1x1 convs (SD 1.x files).
    """
    out = {}
    for key, value in _state(unet).items():
        if _is_projection(key) and not use_linear_projection:
            value = value[:, :, None, None]  # Linear -> 1x1 conv
        out[prefix + _to_compvis_key(key)] = value
    return out
