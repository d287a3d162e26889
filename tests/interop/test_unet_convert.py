"""U-Net weights: diffusers' UNet2DConditionModel and the CompVis single-file layout <-> our UNet.

Random diffusers models (every weight randomised: zero-initialised layers would hide a wrong map) are
converted and must compute the same outputs to 1e-5; converting back gives the original state dict exactly.
The CompVis map is checked against an independent reference: diffusers' own single-file converter.
"""

import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")

from ldm.diffusion import UNet  # noqa: E402
from ldm.diffusion.unet import count_parameters  # noqa: E402
from ldm.interop import (  # noqa: E402
    unet_export_options,
    unet_from_diffusers,
    unet_kwargs_from_diffusers,
    unet_state_from_compvis,
    unet_state_from_diffusers,
    unet_state_to_compvis,
    unet_to_diffusers,
)

TOL = 1e-5
SMALL = {"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32, "norm_num_groups": 8,
         "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
         "attention_head_dim": 8, "in_channels": 4, "out_channels": 4}
CONFIGS = {
    # SD 1.x style: 8 heads everywhere, 1x1-conv projections
    "heads": SMALL,
    # SD 2.x style: one head width (16) at every level, Linear projections, 2 transformer blocks, 3 levels, 2 blocks
    "head_dim": {**SMALL, "block_out_channels": [32, 64, 64], "layers_per_block": 2, "attention_head_dim": [2, 4, 4],
                 "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"],
                 "use_linear_projection": True, "transformer_layers_per_block": 2, "norm_eps": 1e-5},
    # a vector added to the time embedding (the unCLIP decoder's route)
    "projection": {**SMALL, "class_embed_type": "projection", "projection_class_embeddings_input_dim": 12,
                   "attention_head_dim": 4, "out_channels": 6},
    # class labels, and an inpainting-style input of 4 + 5 channels
    "classes": {**SMALL, "num_class_embeds": 10, "in_channels": 9, "dropout": 0.0},
}
SD15 = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}
SD21 = {"sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True, "upcast_attention": True}  # as stabilityai/stable-diffusion-2-1's config


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random: norms' scales around 1, everything else around 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name, p in m.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g) * 0.1
                scale = isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and name == "weight"
                p.copy_(noise + 1 if scale else noise)
    return model.eval()


def inputs(config: dict, concat: int = 0, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = config["in_channels"]
    out = {"x": torch.randn(2, c - concat, 8, 8, generator=g), "t": torch.tensor([3, 977]),
           "context": torch.randn(2, 7, config["cross_attention_dim"], generator=g)}
    if concat:
        out["concat"] = torch.randn(2, concat, 8, 8, generator=g)
    if config.get("class_embed_type") == "projection":
        out["y"] = torch.randn(2, config["projection_class_embeddings_input_dim"], generator=g)
    elif config.get("num_class_embeds"):
        out["y"] = torch.tensor([2, 9])
    return out


@torch.no_grad()
def reference_output(ref, a: dict) -> torch.Tensor:
    sample = torch.cat([a["x"], a["concat"]], 1) if "concat" in a else a["x"]
    return ref(sample, a["t"], encoder_hidden_states=a["context"], class_labels=a.get("y")).sample


@torch.no_grad()
def our_output(unet: UNet, a: dict) -> torch.Tensor:
    return unet(a["x"], a["t"], context=a["context"], y=a.get("y"), concat=a.get("concat"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_unet_converts_both_ways(name):
    config = CONFIGS[name]
    concat = 5 if name == "classes" else 0
    ref = randomise(diffusers.UNet2DConditionModel(**config))
    state = ref.state_dict()
    unet = unet_from_diffusers(dict(ref.config), state, concat_channels=concat).eval()
    assert unet.norm_eps == config.get("norm_eps", 1e-5)
    a = inputs(config, concat)
    expected, got = reference_output(ref, a), our_output(unet, a)
    err = (expected - got).abs().max().item()
    assert err <= TOL, f"{name}: max abs error {err:.2e} against diffusers"
    assert expected.abs().mean() > 0.05  # a real signal, not zeros compared with zeros

    back_config, back = unet_to_diffusers(unet, **unet_export_options(ref.config))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state), "the round trip changed a tensor"
    again = diffusers.UNet2DConditionModel.from_config(back_config)
    again.load_state_dict(back, strict=True)
    assert torch.equal(reference_output(again.eval(), a), expected)


def test_head_kwargs_follow_diffusers_legacy_meaning():
    assert unet_kwargs_from_diffusers(CONFIGS["heads"])["heads"] == 8
    kw = unet_kwargs_from_diffusers(CONFIGS["head_dim"])
    assert (kw["heads"], kw["head_dim"], kw["transformer_depth"], kw["attention_levels"]) == (None, 16, 2, [0, 2])
    kw = unet_kwargs_from_diffusers({**SD21})
    assert (kw["heads"], kw["head_dim"], kw["context_dim"]) == (None, 64, 1024)


@pytest.mark.parametrize("config", [SD15, SD21], ids=["sd15", "sd21"])
def test_stable_diffusion_shapes_map_one_to_one(config):
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**config)
        ours = UNet(**unet_kwargs_from_diffusers(dict(ref.config)))
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert count_parameters(ours) == count_parameters(ref)
    if config is SD15:
        assert count_parameters(ours) == 859_520_964
    converted = unet_state_from_diffusers(dict(ref.config), ref_state)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in our_state.items()}
    _, exported = unet_to_diffusers(ours, **unet_export_options(ref.config))
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in ref_state.items()}
    compvis = unet_state_to_compvis(ours, use_linear_projection=config.get("use_linear_projection", False))
    assert len(compvis) == len(our_state) == len(ref_state)


@pytest.mark.parametrize("name", ["heads", "head_dim", "projection", "classes"])
def test_compvis_layout_agrees_with_diffusers_single_file_converter(name):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    concat = 5 if name == "classes" else 0
    kwargs = unet_kwargs_from_diffusers(CONFIGS[name], concat_channels=concat)
    unet = randomise(UNet(**kwargs))
    linear = CONFIGS[name].get("use_linear_projection", False)
    ckpt = unet_state_to_compvis(unet, use_linear_projection=linear, prefix="model.diffusion_model.")
    ckpt["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # the rest of a full checkpoint is ignored
    assert any(k.startswith("model.diffusion_model.input_blocks.1.0.in_layers.0") for k in ckpt)
    config, _ = unet_to_diffusers(unet, use_linear_projection=linear)
    ref = diffusers.UNet2DConditionModel.from_config(config)
    ref.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True)
    a = inputs(config, concat)
    err = (reference_output(ref.eval(), a) - our_output(unet, a)).abs().max().item()
    assert err <= TOL, f"{name}: max abs error {err:.2e} through diffusers' CompVis converter"

    back = unet_state_from_compvis(ckpt)
    ours = unet.state_dict()
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_compvis_sd1_projections_are_convs_and_sd2_linear():
    unet = UNet(**unet_kwargs_from_diffusers(CONFIGS["heads"]))
    conv = unet_state_to_compvis(unet)
    assert conv["input_blocks.1.1.proj_in.weight"].shape == (32, 32, 1, 1)
    assert conv["middle_block.1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert conv["input_blocks.2.0.op.weight"].shape == (32, 32, 3, 3)
    assert conv["output_blocks.1.1.conv.weight"].shape == (64, 64, 3, 3)
    assert conv["time_embed.2.weight"].shape == (128, 128)
    linear = unet_state_to_compvis(unet, use_linear_projection=True)
    assert linear["input_blocks.1.1.proj_in.weight"].shape == (32, 32)
    for state in (conv, linear):
        assert all(torch.equal(v, unet.state_dict()[k]) for k, v in unet_state_from_compvis(state).items())


@pytest.mark.parametrize("change,key", [
    ({"addition_embed_type": "text_time"}, "addition_embed_type"),
    ({"time_cond_proj_dim": 256}, "time_cond_proj_dim"),
    ({"dual_cross_attention": True}, "dual_cross_attention"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"center_input_sample": True}, "center_input_sample"),
    ({"flip_sin_to_cos": False}, "flip_sin_to_cos"),
    ({"freq_shift": 1}, "freq_shift"),
    ({"conv_in_kernel": 7}, "conv_in_kernel"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"mid_block_type": None}, "mid_block_type"),
    ({"attention_head_dim": [2, 3]}, "attention_head_dim"),
    ({"layers_per_block": [1, 2]}, "layers_per_block"),
    ({"up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}, "up_block_types"),
    ({"a_future_option": 1}, "a_future_option"),
])
def test_unsupported_configs_are_refused_by_name(change, key):
    with pytest.raises(ValueError, match=key):
        unet_kwargs_from_diffusers({**SMALL, **change})


def test_a_state_dict_that_does_not_match_names_the_keys():
    ref = diffusers.UNet2DConditionModel(**SMALL)
    state = ref.state_dict()
    state.pop("conv_in.bias")
    with pytest.raises(ValueError, match="conv_in.bias"):
        unet_from_diffusers(SMALL, state)


def test_norm_eps_default_is_unchanged_and_sd15_config_uses_diffusers_value():
    unet = UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), heads=2, groups=4,
                context_dim=8)
    assert unet.input_blocks[1][0].norm1.eps == 1e-6 and unet.out[0].eps == 1e-6
    unet = UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), heads=2, groups=4,
                context_dim=8, norm_eps=1e-5)
    assert unet.input_blocks[1][0].norm1.eps == 1e-5 and unet.out[0].eps == 1e-5
    assert unet.input_blocks[3][1].norm.eps == 1e-6  # the spatial transformer keeps 1e-6, as in diffusers
    with open("configs/ldm/sd15-256.yaml") as f:
        args = yaml.safe_load(f)["model"]["init_args"]["unet"]["init_args"]
    assert args["norm_eps"] == 1e-5
