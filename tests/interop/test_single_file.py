"""``ldm convert single-file``: original CompVis / Stability Stable Diffusion checkpoints -> ldm runs.

A small random SD-1-shaped diffusers pipeline is written as a CompVis single file (our ``*_to_compvis`` maps, the
text model under ``cond_stage_model.transformer.text_model.*``), imported, and sampled: the images must equal the
diffusers pipeline's. An SD-2-style file (open_clip text keys, penultimate layer) must give the text features of
the open_clip tower it was made from; SDXL-like, unknown and unsafe files are refused with what was found.
"""

import argparse

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from open_clip.model import CLIPTextCfg, _build_text_tower  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ldm.cli import main  # noqa: E402
from ldm.diffusion import UNet  # noqa: E402
from ldm.interop import (  # noqa: E402
    autoencoder_from_diffusers,
    autoencoder_state_to_compvis,
    unet_from_diffusers,
    unet_state_to_compvis,
)
from ldm.interop.single_file import read_checkpoint  # noqa: E402
from ldm.pipelines.text_to_image import SamplerSettings, TextToImage  # noqa: E402
from tests.interop.tiny_sd import CFG, PROMPTS, SIZE, STEPS, randomise, reference_images, tiny_sd_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(diffusers pipeline, CompVis state dict) of one tiny random SD-1-shaped model."""
    root = tmp_path_factory.mktemp("sd1")
    pipe = tiny_sd_pipeline(root)
    unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
    ours_unet = unet_from_diffusers(dict(unet.config), unet.state_dict())
    ours_vae = autoencoder_from_diffusers(dict(vae.config), vae.state_dict())
    state = {**unet_state_to_compvis(ours_unet, prefix="model.diffusion_model."),
             **autoencoder_state_to_compvis(ours_vae, prefix="first_stage_model.")}
    for k, v in text.state_dict().items():  # transformers 5 leaves text_model. out of the module's keys; files have it
        if not k.endswith("position_ids"):
            state["cond_stage_model.transformer.text_model." + k.removeprefix("text_model.")] = v
    return pipe, state


@pytest.fixture(scope="module")
def sd1_run(sd1, tmp_path_factory):
    _, state = sd1
    root = tmp_path_factory.mktemp("sd1-file")
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "tiny-sd1.safetensors"))
    run = root / "run"
    assert main(["convert", "single-file", str(root / "tiny-sd1.safetensors"), "--out", str(run),
                 "--text-heads", "4", "--size", str(SIZE)]) == 0
    return run


def test_an_sd1_single_file_samples_the_diffusers_pipelines_images(sd1, sd1_run):
    pipe, _ = sd1
    expected = reference_images(pipe)
    t2i = TextToImage.from_checkpoint(str(sd1_run))
    got = t2i(PROMPTS, SamplerSettings(sampler="ddim", steps=STEPS, cfg=CFG, seed=0, spacing="trailing"),
              image_size=SIZE, progress=False)
    err = (((got + 1) / 2).clamp(0, 1) - expected).abs().max().item()
    print(f"single-file SD 1 import, DDIM: max abs difference to diffusers' StableDiffusionPipeline: {err:.2e}")
    assert err <= 1e-4, f"max abs difference to diffusers' StableDiffusionPipeline: {err:.2e}"
    assert expected.std() > 0.01  # a real image, not a constant


def test_the_imported_sd1_run_reads_its_numbers_from_the_shapes(sd1_run):
    from ldm.checkpoint_files import run_config
    from ldm.systems import load_autoencoder, load_system

    args = run_config(sd1_run)["model"]["init_args"]
    unet = args["unet"]["init_args"]
    assert (unet["channels"], unet["channel_mult"], unet["num_res_blocks"], unet["attention_levels"]) == (
        32, [1, 2], 1, [0])
    assert (unet["heads"], unet["context_dim"], unet["transformer_depth"], unet["concat_channels"]) == (8, 32, 1, 0)
    encoder = args["conditioner"]["init_args"]["text_encoder"]["init_args"]
    assert encoder["quick_gelu"] and encoder["text"]["pool_type"] == "eos" and encoder.get("layer", -1) == -1
    assert args["precond"]["class_path"] == "ldm.diffusion.EpsPrecond"
    system = load_system(sd1_run)
    assert system.conditioner.text_encoder.pad_id == 49407  # SD 1.x pads with the end token
    assert float(load_autoencoder(sd1_run / "autoencoder").scale_factor) == pytest.approx(0.18215)
    assert "single-file" in (sd1_run / "IMPORTED.md").read_text()


def test_a_ckpt_reads_as_the_safetensors_does(sd1, tmp_path):
    _, state = sd1
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, tmp_path / "tiny.ckpt")
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(tmp_path / "tiny-fp16.safetensors"))
    from_ckpt = read_checkpoint(tmp_path / "tiny.ckpt")
    assert from_ckpt.keys() == state.keys() and all(torch.equal(from_ckpt[k], v) for k, v in state.items())
    half = read_checkpoint(tmp_path / "tiny-fp16.safetensors")
    assert all(v.dtype == torch.float32 for v in half.values() if v.is_floating_point())
    assert main(["convert", "single-file", str(tmp_path / "tiny.ckpt"), "--out", str(tmp_path / "run"),
                 "--text-heads", "4"]) == 0
    assert (tmp_path / "run" / "text_encoder" / "tokenizer" / "vocab.json").is_file()


def test_ema_imports_the_model_ema_copy_of_the_unet(sd1, tmp_path, capsys):
    from ldm.systems import load_system

    _, state = sd1
    unet = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    ema = {"model_ema." + k.removeprefix("model.").replace(".", ""): v + 0.01 for k, v in unet.items()}  # LitEma names
    path = tmp_path / "with-ema.safetensors"
    save_file({k: v.contiguous() for k, v in {**state, **ema, "model_ema.decay": torch.tensor(0.9999)}.items()},
              str(path))
    assert main(["convert", "single-file", str(path), "--out", str(tmp_path / "ema"), "--text-heads", "4", "--ema"]) == 0
    assert main(["convert", "single-file", str(path), "--out", str(tmp_path / "raw"), "--text-heads", "4"]) == 0
    a, b = load_system(tmp_path / "ema").unet.state_dict(), load_system(tmp_path / "raw").unet.state_dict()
    assert all(torch.allclose(a[k], b[k] + 0.01) for k in a)
    assert "--ema" in (tmp_path / "raw" / "IMPORTED.md").read_text()
    no_ema = tmp_path / "no-ema.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(no_ema))
    assert main(["convert", "single-file", str(no_ema), "--out", str(tmp_path / "x"), "--ema"]) == 2
    assert "model_ema" in capsys.readouterr().err


def test_an_unsafe_ckpt_is_refused_not_unpickled(sd1, tmp_path, capsys):
    _, state = sd1
    torch.save({"state_dict": state, "hyper_parameters": argparse.Namespace(lr=1e-4)}, tmp_path / "pickled.ckpt")
    assert main(["convert", "single-file", str(tmp_path / "pickled.ckpt"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "weights_only" in err and "argparse.Namespace" in err
    assert not (tmp_path / "run").exists()


def test_an_inpainting_file_gets_the_concat_route_in_our_channel_order(sd1, tmp_path):
    """SD inpainting U-Nets take [noisy latent, mask, masked-image latent]; ours [noisy, masked latent, mask]."""
    from ldm.systems import load_system

    _, sd1_state = sd1
    source = UNet(in_channels=4, out_channels=4, channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(0,), heads=8, context_dim=32, concat_channels=5, norm_eps=1e-5)
    randomise(source, 5)  # as SD's: its first conv reads the concat channels in SD's order
    state = {k: v for k, v in sd1_state.items() if not k.startswith("model.diffusion_model.")}
    state.update(unet_state_to_compvis(source, prefix="model.diffusion_model."))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "inpaint.safetensors"))
    assert main(["convert", "single-file", str(tmp_path / "inpaint.safetensors"), "--out", str(tmp_path / "run"),
                 "--text-heads", "4"]) == 0
    system = load_system(tmp_path / "run")
    assert system.conditioner.inpainting and system.unet.concat_channels == 5
    g = torch.Generator().manual_seed(0)
    x, masked, mask = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.ones(2, 1, 8, 8)
    t, context = torch.tensor([10, 900]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        expected = source.eval()(x, t, context=context, concat=torch.cat([mask, masked], 1))
        got = system.unet.eval()(x, t, context=context, concat=torch.cat([masked, mask], 1))
    assert (got - expected).abs().max().item() <= 1e-5
    assert "inpainting" in (tmp_path / "run" / "IMPORTED.md").read_text()


def _sd2_tower(width=64, layers=3):
    tower = _build_text_tower(width, CLIPTextCfg(width=width, heads=4, layers=layers, context_length=77,
                                                 vocab_size=49408), quick_gelu=False)
    randomise(tower, 7)
    return tower.eval()


@pytest.fixture(scope="module")
def sd2_file(sd1, tmp_path_factory):
    """An SD-2-style file: open_clip text keys, a U-Net of 64-wide heads with Linear projections, 64-wide context."""
    _, sd1_state = sd1
    tower = _sd2_tower()
    unet = UNet(in_channels=4, out_channels=4, channels=64, channel_mult=(1, 2), num_res_blocks=1,
                attention_levels=(0, 1), heads=None, head_dim=64, transformer_depth=1, context_dim=64, norm_eps=1e-5)
    randomise(unet, 3)
    state = {k: v for k, v in sd1_state.items() if k.startswith("first_stage_model.")}
    state.update(unet_state_to_compvis(unet, use_linear_projection=True, prefix="model.diffusion_model."))
    state.update({"cond_stage_model.model." + k: v for k, v in tower.state_dict().items()})
    state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    path = tmp_path_factory.mktemp("sd2") / "tiny-sd2.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, tower, unet


def test_an_sd2_file_conditions_on_the_penultimate_layer_of_its_open_clip_tower(sd2_file, tmp_path):
    from ldm.checkpoint_files import run_config
    from ldm.systems import load_system

    path, tower, unet = sd2_file
    run = tmp_path / "run"
    assert main(["convert", "single-file", str(path), "--out", str(run), "--prediction", "v", "--text-heads", "4"]) == 0
    args = run_config(run)["model"]["init_args"]
    assert args["precond"]["class_path"] == "ldm.diffusion.VPrecond"
    assert args["unet"]["init_args"]["head_dim"] == 64 and args["unet"]["init_args"]["heads"] is None
    assert run_config(run)["data"]["init_args"]["image_size"] == 768
    system = load_system(run)
    encoder = system.conditioner.text_encoder
    assert encoder.layer == -2 and encoder.pad_id == 0
    ours = system.unet.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in unet.state_dict().items())

    tokens = encoder.tokenizer(["a red circle on top of a blue square", ""])  # (2, 77), padded with 0
    assert (tokens == 0).any()
    with torch.no_grad():  # SD 2's FrozenOpenCLIPEmbedder: all blocks but the last, then ln_final
        x = tower.token_embedding(tokens) + tower.positional_embedding  # (B, T, W)
        for block in tower.transformer.resblocks[:-1]:
            x = block(x, attn_mask=tower.attn_mask)
        expected = tower.ln_final(x)  # (B, T, W)
        got = encoder(tokens)["tokens"]
    err = (got - expected).abs().max().item()
    print(f"SD 2 text features (penultimate layer): max abs difference to the open_clip tower: {err:.2e}")
    assert err <= 1e-5 and expected.std() > 0.1


def test_an_explicit_version_that_does_not_fit_names_the_keys(sd2_file, tmp_path, capsys):
    path, _, _ = sd2_file
    assert main(["convert", "single-file", str(path), "--out", str(tmp_path / "run"), "--version", "sd1"]) == 2
    err = capsys.readouterr().err
    assert "cond_stage_model.transformer" in err and "cond_stage_model.model" in err


@pytest.mark.parametrize("kind", ["sdxl", "unknown", "no-text"])
def test_sdxl_and_unknown_files_are_refused_naming_what_was_found(sd1, tmp_path, capsys, kind):
    _, sd1_state = sd1
    unet_ae = {k: v for k, v in sd1_state.items() if not k.startswith("cond_stage_model.")}
    state = {
        "sdxl": {**unet_ae, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(4),
                 "conditioner.embedders.1.model.ln_final.weight": torch.ones(4)},
        "unknown": {"double_blocks.0.img_attn.qkv.weight": torch.ones(2, 2), "img_in.weight": torch.ones(2)},
        "no-text": unet_ae,
    }[kind]
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert main(["convert", "single-file", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    expect = {"sdxl": ["SDXL", "conditioner.embedders.0", "conditioner.embedders.1"],
              "unknown": ["model.diffusion_model", "double_blocks", "img_in"],
              "no-text": ["cond_stage_model", "model.diffusion_model (", "first_stage_model ("]}[kind]
    assert all(word in err for word in expect), err


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_the_released_sizes_are_read_back_from_their_shapes(version):
    """SD 1.5 / 2.1 U-Nets and the SD VAE at full size (meta tensors: shapes only): the numbers read from the
    CompVis keys' shapes are the ones that built them."""
    from ldm.autoencoder import Autoencoder, Decoder, DiagonalGaussian, Encoder
    from ldm.interop import autoencoder_kwargs_from_diffusers, unet_kwargs_from_diffusers
    from ldm.interop.single_file import autoencoder_kwargs_from_compvis, unet_kwargs_from_compvis

    config = {"cross_attention_dim": 768, "attention_head_dim": 8} if version == "sd1" else {
        "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True}
    kwargs = unet_kwargs_from_diffusers(config)
    ae_kwargs = autoencoder_kwargs_from_diffusers({
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4})
    with torch.device("meta"):
        unet = UNet(**kwargs)
        ae = Autoencoder(Encoder(**ae_kwargs["encoder"]), Decoder(**ae_kwargs["decoder"]),
                         DiagonalGaussian(**ae_kwargs["bottleneck"]))
    assert unet_kwargs_from_compvis(unet_state_to_compvis(unet, version == "sd2"), version) == kwargs
    assert autoencoder_kwargs_from_compvis(autoencoder_state_to_compvis(ae)) == ae_kwargs
