"""KL autoencoder weights: diffusers' AutoencoderKL and the CompVis layout <-> our Autoencoder.

Random diffusers VAEs (every weight randomised) are converted; the posterior mean of the encoder and the
decoder's image must agree to 1e-5, the scale factor travels, and converting back is exact. The CompVis
map is checked through diffusers' own single-file converter.
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldm.autoencoder import Autoencoder, Decoder, DiagonalGaussian, Encoder  # noqa: E402
from ldm.interop import (  # noqa: E402
    autoencoder_from_diffusers,
    autoencoder_kwargs_from_diffusers,
    autoencoder_spec,
    autoencoder_state_from_compvis,
    autoencoder_state_to_compvis,
    autoencoder_to_diffusers,
)
from ldm.interop.autoencoder import _build  # noqa: E402

from tests.interop.test_unet_convert import randomise  # noqa: E402

TOL = 1e-5
SMALL = {"block_out_channels": [32, 64], "latent_channels": 4, "norm_num_groups": 8, "layers_per_block": 1,
         "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
         "scaling_factor": 0.13025}
CONFIGS = {
    "small": SMALL,
    "three_levels": {**SMALL, "block_out_channels": [32, 32, 64], "layers_per_block": 2, "norm_num_groups": 32,
                     "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3},
    "no_post_quant_conv": {**SMALL, "use_post_quant_conv": False, "mid_block_add_attention": False},
}


@torch.no_grad()
def compare(ref, ae: Autoencoder, seed: int = 2) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 16, generator=g)
    z = torch.randn(2, ref.config.latent_channels, 8 // 2 ** (len(ref.config.block_out_channels) - 2), 8 // 2 ** (
        len(ref.config.block_out_channels) - 2), generator=g)
    mean_ref = ref.encode(x).latent_dist.mean
    _, info = ae.bottleneck(ae.encoder(x), sample=False)
    image_ref, image = ref.decode(z).sample, ae.decoder(z)
    assert mean_ref.abs().mean() > 0.05 and image_ref.abs().mean() > 0.05  # real signals
    assert torch.allclose(ae.encode(x), mean_ref * ref.config.scaling_factor, atol=TOL)
    return (mean_ref - info["mean"]).abs().max().item(), (image_ref - image).abs().max().item()


def test_diffusers_vae_groupnorm_eps_is_ours():
    ref = diffusers.AutoencoderKL(**SMALL)
    eps = {m.eps for m in ref.modules() if isinstance(m, torch.nn.GroupNorm)}
    ours = {m.eps for m in autoencoder_from_diffusers(SMALL, ref.state_dict()).modules()
            if isinstance(m, torch.nn.GroupNorm)}
    assert eps == ours == {1e-6}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_autoencoder_converts_both_ways(name):
    ref = randomise(diffusers.AutoencoderKL(**CONFIGS[name]))
    state = ref.state_dict()
    ae = autoencoder_from_diffusers(dict(ref.config), state).eval()
    assert float(ae.scale_factor) == pytest.approx(0.13025)
    enc_err, dec_err = compare(ref, ae)
    assert enc_err <= TOL and dec_err <= TOL, f"{name}: max abs error encode {enc_err:.2e}, decode {dec_err:.2e}"

    config, back = autoencoder_to_diffusers(ae)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state), "the round trip changed a tensor"
    again = diffusers.AutoencoderKL.from_config(config)
    again.load_state_dict(back, strict=True)
    assert again.config.scaling_factor == pytest.approx(0.13025)
    # the spec rebuilds the same module (what an imported run's config.yaml holds)
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--ae", type=Autoencoder)
    rebuilt = parser.instantiate(parser.parse_object({"ae": autoencoder_spec(ae)})).ae
    rebuilt.load_state_dict(ae.state_dict(), strict=True)


def test_missing_quant_conv_becomes_an_identity():
    config = {**SMALL, "use_quant_conv": False}
    ref = randomise(diffusers.AutoencoderKL(**config))
    ae = autoencoder_from_diffusers(config, ref.state_dict()).eval()
    enc_err, dec_err = compare(ref, ae)
    assert enc_err <= TOL and dec_err <= TOL, f"max abs error encode {enc_err:.2e}, decode {dec_err:.2e}"


@pytest.mark.parametrize("name", ["small", "three_levels"])
def test_compvis_layout_agrees_with_diffusers_single_file_converter(name):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ae = randomise(_build(autoencoder_kwargs_from_diffusers(CONFIGS[name])))
    ckpt = autoencoder_state_to_compvis(ae, prefix="first_stage_model.")
    ckpt["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # the rest of a full checkpoint is ignored
    assert ckpt["first_stage_model.encoder.mid.attn_1.q.weight"].shape[2:] == (1, 1)
    levels = len(CONFIGS[name]["block_out_channels"])
    assert f"first_stage_model.decoder.up.{levels - 1}.upsample.conv.weight" in ckpt  # up levels count from the top
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in ckpt
    config, _ = autoencoder_to_diffusers(ae)
    ref = diffusers.AutoencoderKL.from_config(config)
    ref.load_state_dict(convert_ldm_vae_checkpoint(ckpt, config), strict=True)
    enc_err, dec_err = compare(ref.eval(), ae)
    assert enc_err <= TOL and dec_err <= TOL, f"{name}: max abs error encode {enc_err:.2e}, decode {dec_err:.2e}"

    back = autoencoder_state_from_compvis(ckpt, scale_factor=float(ae.scale_factor))
    ours = ae.state_dict()
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_compvis_layout_with_attention_levels_round_trips():
    ae = randomise(Autoencoder(
        Encoder(out_channels=8, channels=16, channel_mult=(1, 2), num_res_blocks=2, attention_levels=(1,), groups=8),
        Decoder(in_channels=4, channels=16, channel_mult=(1, 2), num_res_blocks=2, attention_levels=(0,), groups=8,
                latent_projection=True),
        DiagonalGaussian(8, 4)))
    ckpt = autoencoder_state_to_compvis(ae)
    assert "encoder.down.1.attn.1.k.weight" in ckpt and "decoder.up.0.attn.2.proj_out.bias" in ckpt
    assert "post_quant_conv.weight" in ckpt
    back = autoencoder_state_from_compvis(ckpt, scale_factor=1.0)
    assert back.keys() == ae.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ae.state_dict().items())


@pytest.mark.parametrize("change,key", [
    ({"shift_factor": 0.1159}, "shift_factor"),
    ({"latents_mean": [0.0] * 4}, "latents_mean"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "down_block_types"),
    ({"block_out_channels": [32, 48]}, "block_out_channels"),
])
def test_unsupported_vae_configs_are_refused_by_name(change, key):
    with pytest.raises(ValueError, match=key):
        autoencoder_kwargs_from_diffusers({**SMALL, **change})
