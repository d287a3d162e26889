"""The KL autoencoder's weights in diffusers' (``AutoencoderKL``) and in the CompVis layout, both ways.

Pure functions on state dicts (no diffusers import). Our :class:`ldm.autoencoder.Autoencoder` with a
:class:`DiagonalGaussian` bottleneck is the LDM "KL" autoencoder (Rombach et al. 2022, appendix G):

=================================  =================================  ====================================
ours                               CompVis (``first_stage_model.``)   diffusers ``AutoencoderKL``
=================================  =================================  ====================================
encoder.down.K (flat list)         encoder.down.l.block.j / attn.j /  encoder.down_blocks.l.resnets.j /
                                   downsample.conv                    downsamplers.0.conv
encoder.mid.0 / .1 / .2            encoder.mid.block_1 / attn_1 /     encoder.mid_block.resnets.0 /
                                   block_2                            attentions.0 / resnets.1
encoder.norm_out                   encoder.norm_out                   encoder.conv_norm_out
bottleneck.to_moments              quant_conv                         quant_conv
decoder.latent_proj                post_quant_conv                    post_quant_conv
decoder.up.K (flat list, deepest   decoder.up.l.block.j / attn.j /    decoder.up_blocks.(L-1-l).resnets.j /
level first)                       upsample.conv (l = resolution      upsamplers.0.conv (first block the
                                   level: up.{L-1} runs first)        deepest)
ResBlock skip                      nin_shortcut                       conv_shortcut
attention norm, qkv (1x1 conv      norm, q, k, v, proj_out            group_norm, to_q, to_k, to_v
3C), proj                          (1x1 convs)                        (Linear), to_out.0
scale_factor (buffer)              (the LDM config's scale_factor)    config scaling_factor
=================================  =================================  ====================================

Our attention is one 1x1 conv to q, k, v stacked (3C, C, 1, 1); the others' are three layers: the weights are
concatenated / split along the output channels. All three use GroupNorm eps 1e-6 and one attention head in
the middle blocks, so converted weights compute the same function.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ldm.autoencoder.bottlenecks import DiagonalGaussian
from ldm.autoencoder.model import Autoencoder
from ldm.autoencoder.networks import Decoder, Encoder
from ldm.interop.unet import _check_keys, _fit, _refuse, _refuse_unknown, _state, _strip_prefix

COMPVIS_PREFIX = "first_stage_model."
SD_SCALE_FACTOR = 0.18215  # Stable Diffusion 1.x / 2.x (the LDM config's scale_factor; diffusers' scaling_factor)

_RES = ("norm1.", "conv1.", "norm2.", "conv2.", "skip.")


def _kind(rest: str) -> str:
    first = rest.split(".")[0] + "."
    if first in _RES:
        return "res"
    if first in ("norm.", "qkv.", "proj."):
        return "attn"
    if first == "conv.":
        return "sample"
    raise ValueError(f"no conversion rule for {rest!r}")


def _layers(keys, part: str) -> list[tuple[int, str]]:
    """(index K, kind) of the layers of our ``encoder.down`` / ``decoder.up`` list, in order."""
    found: dict[int, str] = {}
    for key in keys:
        m = re.fullmatch(rf"{part}\.(\d+)\.(.+)", key)
        if m:
            found.setdefault(int(m.group(1)), _kind(m.group(2)))
    return sorted(found.items())


def _modules(our_keys) -> list[tuple[str, str, int, int, str]]:
    """Every layer of our autoencoder as (our prefix, part, level, j, kind); ``level`` is the resolution level
    (0 = full resolution, CompVis' numbering) and ``j`` the block within it; mid layers have level -1."""
    keys = list(our_keys)
    out = []
    for part in ("encoder", "decoder"):
        name = f"{part}.down" if part == "encoder" else f"{part}.up"
        layers = _layers(keys, name)
        samplers = sum(kind == "sample" for _, kind in layers)
        level, j = (0, 0) if part == "encoder" else (samplers, 0)
        for index, kind in layers:
            if kind == "sample":
                out.append((f"{name}.{index}.", part, level, 0, kind))
                level, j = (level + 1, 0) if part == "encoder" else (level - 1, 0)
            elif kind == "res":
                out.append((f"{name}.{index}.", part, level, j, kind))
                j += 1
            else:  # attention after the (j-1)-th ResBlock
                out.append((f"{name}.{index}.", part, level, j - 1, kind))
        for index, kind in _layers(keys, f"{part}.mid"):
            out.append((f"{part}.mid.{index}.", part, -1, index, kind))
    return out


def _compvis_prefix(part: str, level: int, j: int, kind: str) -> str:
    side = "down" if part == "encoder" else "up"
    if level < 0:
        return f"{part}.mid." + {"res": f"block_{1 + min(j, 1)}.", "attn": "attn_1."}[kind]
    return f"{part}.{side}.{level}." + {"res": f"block.{j}.", "attn": f"attn.{j}.",
                                         "sample": "downsample." if side == "down" else "upsample."}[kind]


def _diffusers_prefix(part: str, level: int, j: int, kind: str, levels: int) -> str:
    if level < 0:
        return f"{part}.mid_block." + {"res": f"resnets.{min(j, 1)}.", "attn": "attentions.0."}[kind]
    if part == "encoder":
        return f"encoder.down_blocks.{level}." + {"res": f"resnets.{j}.", "attn": f"attentions.{j}.",
                                                  "sample": "downsamplers.0."}[kind]
    return f"decoder.up_blocks.{levels - 1 - level}." + {"res": f"resnets.{j}.", "attn": f"attentions.{j}.",
                                                         "sample": "upsamplers.0."}[kind]


_TOP_COMPVIS = {"encoder.conv_in.": "encoder.conv_in.", "encoder.norm_out.": "encoder.norm_out.",
                "encoder.conv_out.": "encoder.conv_out.", "decoder.conv_in.": "decoder.conv_in.",
                "decoder.norm_out.": "decoder.norm_out.", "decoder.conv_out.": "decoder.conv_out.",
                "bottleneck.to_moments.": "quant_conv.", "decoder.latent_proj.": "post_quant_conv."}
_TOP_DIFFUSERS = {**_TOP_COMPVIS, "encoder.norm_out.": "encoder.conv_norm_out.",
                  "decoder.norm_out.": "decoder.conv_norm_out."}
_ATTN_NAMES = {"compvis": ("norm.", "q.", "k.", "v.", "proj_out."),
               "diffusers": ("group_norm.", "to_q.", "to_k.", "to_v.", "to_out.0.")}


def _layer_to(kind: str, sub: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    """One of our layers' tensors (keys relative to the layer) -> the other layout's names (relative)."""
    if kind == "sample":
        return dict(sub)
    if kind == "res":
        skip = "nin_shortcut." if layout == "compvis" else "conv_shortcut."
        return {(skip + k[5:] if k.startswith("skip.") else k): v for k, v in sub.items()}
    norm, q, k, v, out = _ATTN_NAMES[layout]
    linear = layout == "diffusers"
    w = sub["qkv.weight"]  # (3C, C, 1, 1)
    c = w.shape[1]
    res = {norm + "weight": sub["norm.weight"], norm + "bias": sub["norm.bias"]}
    for i, name in enumerate((q, k, v)):
        wi = w[i * c:(i + 1) * c]  # (C, C, 1, 1)
        res[name + "weight"] = wi[:, :, 0, 0] if linear else wi
        res[name + "bias"] = sub["qkv.bias"][i * c:(i + 1) * c]
    res[out + "weight"] = sub["proj.weight"][:, :, 0, 0] if linear else sub["proj.weight"]
    res[out + "bias"] = sub["proj.bias"]
    return res


def _layer_from(kind: str, sub: Mapping[str, Tensor], layout: str, where: str) -> dict[str, Tensor]:
    """The other layout's tensors of one layer (keys relative) -> ours (relative)."""
    if kind == "sample":
        return dict(sub)
    if kind == "res":
        skip = "nin_shortcut." if layout == "compvis" else "conv_shortcut."
        return {("skip." + k[len(skip):] if k.startswith(skip) else k): v for k, v in sub.items()}
    norm, q, k, v, out = _ATTN_NAMES[layout]
    need = [n + p for n in (norm, q, k, v, out) for p in ("weight", "bias")]
    _check_keys(need, sub, f"an attention layer at {where}")
    c = sub[norm + "weight"].shape[0]
    conv = lambda t, name: _fit(t, (c, c, 1, 1), where + name)  # noqa: E731  Linear or 1x1 conv -> 1x1 conv
    return {"norm.weight": sub[norm + "weight"], "norm.bias": sub[norm + "bias"],
            "qkv.weight": torch.cat([conv(sub[n + "weight"], n + "weight") for n in (q, k, v)]),  # (3C, C, 1, 1)
            "qkv.bias": torch.cat([sub[n + "bias"] for n in (q, k, v)]),
            "proj.weight": conv(sub[out + "weight"], out + "weight"), "proj.bias": sub[out + "bias"]}


def _split(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _to_layout(state: Mapping[str, Tensor], layout: str, levels: int) -> dict[str, Tensor]:
    top = _TOP_COMPVIS if layout == "compvis" else _TOP_DIFFUSERS
    out, done = {}, set()
    for prefix, part, level, j, kind in _modules(state):
        theirs = (_compvis_prefix(part, level, j, kind) if layout == "compvis"
                  else _diffusers_prefix(part, level, j, kind, levels))
        sub = _split(state, prefix)
        done.update(prefix + k for k in sub)
        out.update({theirs + k: v for k, v in _layer_to(kind, sub, layout).items()})
    for key, value in state.items():
        if key in done or key == "scale_factor":
            continue
        name = next((new + key[len(old):] for old, new in top.items() if key.startswith(old)), None)
        if name is None:
            raise ValueError(f"no conversion rule for the autoencoder key {key!r}")
        out[name] = value
    return out


def _from_layout(state: Mapping[str, Tensor], modules, layout: str, levels: int) -> dict[str, Tensor]:
    """Their state -> ours, for our layers ``modules`` (from :func:`_modules` of the target's keys)."""
    top = _TOP_COMPVIS if layout == "compvis" else _TOP_DIFFUSERS
    out, used = {}, set()
    for prefix, part, level, j, kind in modules:
        theirs = (_compvis_prefix(part, level, j, kind) if layout == "compvis"
                  else _diffusers_prefix(part, level, j, kind, levels))
        sub = _split(state, theirs)
        used.update(theirs + k for k in sub)
        out.update({prefix + k: v for k, v in _layer_from(kind, sub, layout, theirs).items()})
    for ours, theirs in top.items():
        for k, v in _split(state, theirs).items():
            if theirs + k not in used:
                out[ours + k] = v
                used.add(theirs + k)
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"autoencoder keys without a conversion rule: {left[:8]}{' ...' if len(left) > 8 else ''}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# diffusers AutoencoderKL

_AE_SUPPORTED: dict[str, tuple] = {"act_fn": ("silu",), "shift_factor": (None,), "latents_mean": (None,),
                                   "latents_std": (None,), "use_quant_conv": (True, False),
                                   "use_post_quant_conv": (True, False), "mid_block_add_attention": (True, False)}
_AE_READ = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
            "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor")
_AE_IGNORED = ("sample_size", "force_upcast")


def autoencoder_kwargs_from_diffusers(config: Mapping) -> dict:
    """Constructor arguments ``{"encoder": {...}, "decoder": {...}, "bottleneck": {...}}`` of our Encoder,
    Decoder and DiagonalGaussian for a diffusers ``AutoencoderKL`` config (its config.json as a dict).
    Raises a ValueError naming the key for anything we cannot express."""
    what = "AutoencoderKL"
    _refuse_unknown(config, (*_AE_SUPPORTED, *_AE_READ, *_AE_IGNORED), what)
    _refuse(config, _AE_SUPPORTED, what)
    boc = list(config.get("block_out_channels", (64,)))
    n = len(boc)
    down = list(config.get("down_block_types", ("DownEncoderBlock2D",)))
    up = list(config.get("up_block_types", ("UpDecoderBlock2D",)))
    if down != ["DownEncoderBlock2D"] * n:
        raise ValueError(f"{what} config not supported: down_block_types={down!r} (DownEncoderBlock2D per level)")
    if up != ["UpDecoderBlock2D"] * n:
        raise ValueError(f"{what} config not supported: up_block_types={up!r} (UpDecoderBlock2D per level)")
    channels = boc[0]
    if any(c % channels for c in boc):
        raise ValueError(f"{what} config not supported: block_out_channels={boc} are not multiples of the first")
    latent = config.get("latent_channels", 4)
    common = {"channels": channels, "channel_mult": [c // channels for c in boc],
              "num_res_blocks": config.get("layers_per_block", 1), "attention_levels": [],
              "mid_attention": bool(config.get("mid_block_add_attention", True)),
              "groups": config.get("norm_num_groups", 32)}
    return {"encoder": {"in_channels": config.get("in_channels", 3), "out_channels": 2 * latent, **common},
            "decoder": {"in_channels": latent, "out_channels": config.get("out_channels", 3), **common,
                        "latent_projection": bool(config.get("use_post_quant_conv", True))},
            "bottleneck": {"in_channels": 2 * latent, "latent_channels": latent}}


def _build(kwargs: Mapping) -> Autoencoder:
    return Autoencoder(Encoder(**kwargs["encoder"]), Decoder(**kwargs["decoder"]), DiagonalGaussian(**kwargs["bottleneck"]))


def autoencoder_state_from_diffusers(config: Mapping, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ``AutoencoderKL`` state dict -> ours (``scale_factor`` from the config's ``scaling_factor``)."""
    kwargs = autoencoder_kwargs_from_diffusers(config)
    with torch.device("meta"):
        skeleton = _build(kwargs).state_dict()
    state = dict(state_dict)
    if not config.get("use_quant_conv", True):  # no quant_conv: the moments are the encoder's output, an identity 1x1
        c = kwargs["bottleneck"]["in_channels"]
        state["quant_conv.weight"] = torch.eye(c)[:, :, None, None]
        state["quant_conv.bias"] = torch.zeros(c)
    ours = _from_layout(state, _modules(skeleton), "diffusers", len(kwargs["encoder"]["channel_mult"]))
    ours["scale_factor"] = torch.tensor(float(config.get("scaling_factor", SD_SCALE_FACTOR)))
    _check_keys(skeleton, ours, "our autoencoder for this AutoencoderKL config")
    return {k: _fit(v, skeleton[k].shape, k) for k, v in ours.items()}


def autoencoder_from_diffusers(config: Mapping, state_dict: Mapping[str, Tensor]) -> Autoencoder:
    """Our KL autoencoder with the weights (and the latent scale factor) of a diffusers ``AutoencoderKL``."""
    ae = _build(autoencoder_kwargs_from_diffusers(config))
    ae.load_state_dict(autoencoder_state_from_diffusers(config, state_dict))
    return ae


def autoencoder_spec(ae: Autoencoder) -> dict:
    """The ``class_path`` / ``init_args`` config of our KL autoencoder ``ae`` (what a run's config.yaml holds)."""
    if not isinstance(ae.bottleneck, DiagonalGaussian):
        raise ValueError("autoencoder_spec describes KL autoencoders (a DiagonalGaussian bottleneck)")
    e, d, b = ae.encoder, ae.decoder, ae.bottleneck

    def net(m: Encoder | Decoder) -> dict:
        return {"in_channels": m.conv_in.in_channels, "out_channels": m.conv_out.out_channels,
                "channels": m.channels, "channel_mult": list(m.channel_mult), "num_res_blocks": m.num_res_blocks,
                "attention_levels": list(m.attention_levels), "mid_attention": m.mid_attention, "groups": m.groups}

    return {"class_path": "ldm.autoencoder.Autoencoder", "init_args": {
        "encoder": {"class_path": "ldm.autoencoder.Encoder", "init_args": net(e)},
        "decoder": {"class_path": "ldm.autoencoder.Decoder",
                    "init_args": {**net(d), "latent_projection": d.latent_proj is not None}},
        "bottleneck": {"class_path": "ldm.autoencoder.DiagonalGaussian",
                       "init_args": {"in_channels": b.in_channels, "latent_channels": b.latent_channels}}}}


def autoencoder_to_diffusers(ae: Autoencoder) -> tuple[dict, dict[str, Tensor]]:
    """Our KL autoencoder -> (config, state dict) of a diffusers ``AutoencoderKL`` (``from_config`` +
    ``load_state_dict(strict=True)``); ``scaling_factor`` is our ``scale_factor``."""
    if not isinstance(ae.bottleneck, DiagonalGaussian):
        raise ValueError("only KL autoencoders (a DiagonalGaussian bottleneck) have an AutoencoderKL counterpart")
    e, d, b = ae.encoder, ae.decoder, ae.bottleneck
    latent = b.latent_channels
    same = ("channels", "channel_mult", "num_res_blocks", "mid_attention", "groups")
    diff = [k for k in same if getattr(e, k) != getattr(d, k)]
    if diff:
        raise ValueError(f"encoder and decoder differ in {diff}: AutoencoderKL has one value for both")
    if e.attention_levels or d.attention_levels:
        raise ValueError("attention_levels other than the middle block have no AutoencoderKL counterpart")
    if e.conv_out.out_channels != 2 * latent or b.in_channels != 2 * latent or d.conv_in.in_channels != latent:
        raise ValueError(f"AutoencoderKL needs encoder out_channels = bottleneck in_channels = 2 x latent_channels "
                         f"({2 * latent}) and decoder in_channels = latent_channels")
    odd = sorted({m.num_channels for m in ae.modules() if isinstance(m, nn.GroupNorm) and m.num_groups != e.groups})
    if odd:
        raise ValueError(f"widths {odd} are not divisible by groups={e.groups}: diffusers' GroupNorms need them to be")
    n = len(e.channel_mult)
    config = {"_class_name": "AutoencoderKL", "in_channels": e.conv_in.in_channels,
              "out_channels": d.conv_out.out_channels, "down_block_types": ["DownEncoderBlock2D"] * n,
              "up_block_types": ["UpDecoderBlock2D"] * n, "block_out_channels": [e.channels * m for m in e.channel_mult],
              "layers_per_block": e.num_res_blocks, "act_fn": "silu", "latent_channels": latent,
              "norm_num_groups": e.groups, "scaling_factor": float(ae.scale_factor), "shift_factor": None,
              "use_quant_conv": True, "use_post_quant_conv": d.latent_proj is not None,
              "mid_block_add_attention": e.mid_attention}
    return config, _to_layout(ae.state_dict(), "diffusers", n)


# ----------------------------------------------------------------------------------------------------------------
# the CompVis single-file layout


def _compvis_modules(state: Mapping[str, Tensor]) -> list[tuple[str, str, int, int, str]]:
    """Our layers (prefix, part, level, j, kind) for a CompVis autoencoder state, read from its keys."""
    out = []
    for part, side in (("encoder", "down"), ("decoder", "up")):
        levels = sorted({int(m.group(1)) for k in state if (m := re.match(rf"{part}\.{side}\.(\d+)\.", k))})
        index = 0
        for level in (levels if side == "down" else levels[::-1]):
            blocks = sorted({int(m.group(1)) for k in state
                             if (m := re.match(rf"{part}\.{side}\.{level}\.block\.(\d+)\.", k))})
            for j in blocks:
                out.append((f"{part}.{side}.{index}.", part, level, j, "res"))
                index += 1
                if any(k.startswith(f"{part}.{side}.{level}.attn.{j}.") for k in state):
                    out.append((f"{part}.{side}.{index}.", part, level, j, "attn"))
                    index += 1
            sample = "downsample" if side == "down" else "upsample"
            if any(k.startswith(f"{part}.{side}.{level}.{sample}.") for k in state):
                out.append((f"{part}.{side}.{index}.", part, level, 0, "sample"))
                index += 1
        for name, index, kind in (("block_1", 0, "res"), ("attn_1", 1, "attn"), ("block_2", 2, "res")):
            if any(k.startswith(f"{part}.mid.{name}.") for k in state):
                out.append((f"{part}.mid.{index}.", part, -1, index, kind))
    return out


def autoencoder_state_from_compvis(state: Mapping[str, Tensor], scale_factor: float = SD_SCALE_FACTOR
                                   ) -> dict[str, Tensor]:
    """The KL autoencoder of a CompVis / Stability checkpoint (``first_stage_model.`` keys, prefix stripped or
    not; other keys of a full checkpoint are ignored) -> our Autoencoder's state dict. The file does not hold
    the latent scale factor (the LDM config does): ``scale_factor`` (SD 1.x / 2.x: 0.18215) is stored with it.
    A file with ``post_quant_conv`` needs ``Decoder(latent_projection=True)``."""
    state = _strip_prefix(state, COMPVIS_PREFIX)
    out = _from_layout(state, _compvis_modules(state), "compvis", 0)
    out["scale_factor"] = torch.tensor(float(scale_factor))
    return out


def autoencoder_state_to_compvis(ae: Autoencoder | Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Our KL autoencoder (or its state dict) -> CompVis key names (``prefix`` e.g. ``"first_stage_model."``);
    attention q / k / v / proj_out as 1x1 convs, as in the LDM code. The scale factor is not part of it."""
    return {prefix + k: v for k, v in _to_layout(_state(ae), "compvis", 0).items()}
