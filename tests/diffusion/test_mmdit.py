"""The MMDiT backbone (SD3): parameter counts equal to diffusers' SD3Transformer2DModel (small configs and
SD3-medium, on the meta device), diffusers' weights mapped into ours giving the same output (with and without
qk-norm, SD3's cropped positions), DiT's zero initialisation, the text mattering, padded text tokens hidden from the
joint attention, named shape errors, the GPU presets' configs, and a tiny MMDiT trained by `ldm fit`."""

import pytest
import torch
import yaml

from ldm.diffusion import DiT, MMDiT
from ldm.diffusion.dit import sincos_2d
from ldm.diffusion.mmdit import sincos_positions
from ldm.nn.embeddings import timestep_embedding
from tests.conftest import REPO


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _diffusers_sd3(**kw):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.SD3Transformer2DModel(**kw)


SMALL = [  # (layers, head_dim, heads, qk_norm)
    (2, 16, 2, False), (3, 32, 4, False), (4, 64, 2, True),
]


@pytest.mark.parametrize("layers,head_dim,heads,qk_norm", SMALL)
def test_small_configs_count_what_diffusers_counts(layers, head_dim, heads, qk_norm):
    with torch.device("meta"):
        ref = _diffusers_sd3(sample_size=32, patch_size=2, in_channels=4, num_layers=layers,
                             attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
                             caption_projection_dim=heads * head_dim, pooled_projection_dim=24, out_channels=4,
                             pos_embed_max_size=48, qk_norm="rms_norm" if qk_norm else None)
        ours = MMDiT(in_channels=4, patch_size=2, hidden_size=heads * head_dim, depth=layers, num_heads=heads,
                     context_dim=32, y_dim=24, qk_norm=qk_norm, pos_embed_max_size=48, sample_size=32)
    assert _count(ours) == _count(ref)
    assert not list(ours.buffers())  # positions are computed; diffusers keeps its table as a (non-parameter) buffer
    assert sum(b.numel() for b in ref.buffers()) == 48 * 48 * heads * head_dim


def test_sd3_medium_has_diffusers_parameter_count():
    kw = dict(in_channels=16, patch_size=2, hidden_size=1536, depth=24, num_heads=24, context_dim=4096, y_dim=2048,
              pos_embed_max_size=192, sample_size=128)
    with torch.device("meta"):
        ours, ours_qk = MMDiT(**kw), MMDiT(**kw, qk_norm=True)
        ref = _diffusers_sd3(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
    assert _count(ours) == _count(ref) == 2_028_328_000
    assert _count(ours_qk) == 2_028_328_000 + 24 * 4 * 64  # RMSNorm weights on q, k of both streams
    assert sum(b.numel() for b in ref.buffers()) == 192 * 192 * 1536  # diffusers' position table: not a parameter


def test_timestep_features_equal_diffusers_timesteps():
    diffusers = pytest.importorskip("diffusers")
    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    ref = diffusers.models.embeddings.Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    assert (timestep_embedding(t, 256) - ref).abs().max() < 1e-6


def test_positions_on_the_integer_grid_are_dits():
    rows, cols = torch.arange(5.0), torch.arange(7.0)
    assert torch.allclose(sincos_positions(rows, cols, 64), sincos_2d(7, 5, 64), atol=1e-6)


def _swap(t):  # diffusers' AdaLayerNormContinuous chunks (scale, shift); SD3's code and ours (shift, scale)
    scale, shift = t.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def diffusers_to_ours(sd: dict, depth: int) -> dict:
    """diffusers' SD3Transformer2DModel state dict -> MMDiT's."""
    names = {"pos_embed.proj": "patchify", "time_text_embed.timestep_embedder.linear_1": "time_embed.linear_1",
             "time_text_embed.timestep_embedder.linear_2": "time_embed.linear_2",
             "time_text_embed.text_embedder.linear_1": "y_embed.0",
             "time_text_embed.text_embedder.linear_2": "y_embed.2",
             "context_embedder": "context_embedder", "norm_out.linear": "modulation_out.1", "proj_out": "proj_out"}
    block = {"norm1.linear": "modulation.1", "norm1_context.linear": "modulation_ctx.1", "attn.to_q": "attn.to_q",
             "attn.to_k": "attn.to_k", "attn.to_v": "attn.to_v", "attn.add_q_proj": "attn.ctx_q",
             "attn.add_k_proj": "attn.ctx_k", "attn.add_v_proj": "attn.ctx_v", "attn.to_out.0": "attn.to_out",
             "attn.to_add_out": "attn.ctx_out", "attn.norm_q": "attn.norm_q", "attn.norm_k": "attn.norm_k",
             "attn.norm_added_q": "attn.norm_ctx_q", "attn.norm_added_k": "attn.norm_ctx_k",
             "ff.net.0.proj": "mlp.0", "ff.net.2": "mlp.2", "ff_context.net.0.proj": "mlp_ctx.0",
             "ff_context.net.2": "mlp_ctx.2"}
    for i in range(depth):
        names.update({f"transformer_blocks.{i}.{k}": f"blocks.{i}.{v}" for k, v in block.items()})
    out = {}
    for key, value in sd.items():
        if key == "pos_embed.pos_embed":
            continue
        module, _, leaf = key.rpartition(".")
        if module == "norm_out.linear" or module == f"transformer_blocks.{depth - 1}.norm1_context.linear":
            value = _swap(value)
        out[f"{names[module]}.{leaf}"] = value
    return out


@pytest.mark.parametrize("qk_norm,size", [(False, (16, 16)), (True, (12, 20))])
def test_diffusers_weights_give_diffusers_output(qk_norm, size):
    """SD3's cropped positions on a non-square, smaller-than-sample grid included (12 x 20 latent, table of 24)."""
    torch.manual_seed(0)
    depth, heads, head_dim = 3, 2, 32
    ref = _diffusers_sd3(sample_size=16, patch_size=2, in_channels=4, num_layers=depth, attention_head_dim=head_dim,
                         num_attention_heads=heads, joint_attention_dim=32, caption_projection_dim=heads * head_dim,
                         pooled_projection_dim=24, out_channels=4, pos_embed_max_size=24,
                         qk_norm="rms_norm" if qk_norm else None).eval()
    for name, p in ref.named_parameters():  # as after training: no zero bias; qk-norm weights away from 1
        if ".attn.norm_" in name:
            p.data.uniform_(0.5, 1.5)
        else:
            p.data.normal_(0, 0.05)
    ours = MMDiT(in_channels=4, patch_size=2, hidden_size=heads * head_dim, depth=depth, num_heads=heads,
                 context_dim=32, y_dim=24, qk_norm=qk_norm, pos_embed_max_size=24, sample_size=16).eval()
    missing = ours.load_state_dict(diffusers_to_ours(ref.state_dict(), depth), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    x, t = torch.randn(2, 4, *size), torch.tensor([3.0, 871.5])
    context, pooled = torch.randn(2, 7, 32), torch.randn(2, 24)
    with torch.no_grad():
        expected = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample
        got = ours(x, t, context=context, y=pooled)
    assert got.shape == expected.shape == x.shape
    assert expected.abs().mean() > 0.05
    assert (got - expected).abs().max() < 1e-5


def _small(**kw):
    args = dict(in_channels=4, patch_size=2, hidden_size=64, depth=2, num_heads=4, context_dim=32, y_dim=16)
    return MMDiT(**{**args, **kw})


def _trained_like(model):
    for p in model.parameters():  # as after some training: nothing zero
        p.data.normal_(0, 0.05)
    return model


def test_a_fresh_mmdit_predicts_zero_and_every_block_gets_gradients():
    torch.manual_seed(0)
    model = _small()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0])
    context, y = torch.randn(2, 5, 32), torch.randn(2, 16)
    assert torch.equal(model(x, t, context=context, y=y), torch.zeros_like(x))  # adaLN-Zero, zero final layer
    _trained_like(model)
    out = model(x, t, context=context, y=y)
    assert out.shape == x.shape and out.abs().mean() > 0
    out.square().mean().backward()
    assert all(block.attn.ctx_k.weight.grad.abs().sum() > 0 for block in model.blocks)
    assert model.blocks[0].mlp_ctx[0].weight.grad.abs().sum() > 0  # the text stream of the first block
    last = model.blocks[-1]
    assert last.mlp_ctx is None and last.attn.ctx_out is None  # pre-only text stream
    assert last.modulation_ctx[-1].weight.shape == (2 * 64, 64)


def test_the_text_and_the_pooled_vector_matter():
    torch.manual_seed(0)
    model = _trained_like(_small())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0])
    context, y = torch.randn(2, 5, 32), torch.randn(2, 16)
    with torch.no_grad():
        base = model(x, t, context=context, y=y)
        other_text = model(x, t, context=torch.randn(2, 5, 32), y=y)
        other_y = model(x, t, context=context, y=torch.randn(2, 16))
    assert (base - other_text).abs().mean() > 1e-3 * base.abs().mean()
    assert (base - other_y).abs().mean() > 1e-3 * base.abs().mean()


def test_masked_text_tokens_do_not_change_the_output():
    torch.manual_seed(0)
    model = _trained_like(_small(depth=3))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 16)
    context = torch.randn(2, 7, 32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False  # sample 0: 5 real tokens, 2 padding
    other = context.clone()
    other[0, 5:] = torch.randn(2, 32) * 10
    with torch.no_grad():
        out = model(x, t, context=context, context_mask=mask, y=y)
        assert torch.allclose(out, model(x, t, context=other, context_mask=mask, y=y), atol=1e-5)
        # = the model on the 5 real tokens alone
        alone = model(x[:1], t[:1], context=context[:1, :5], y=y[:1])
        assert (out[:1] - alone).abs().max() < 1e-5
        assert not torch.allclose(out, model(x, t, context=other, y=y), atol=1e-3)  # unmasked, they count


def test_a_null_condition_mask_and_other_interfaces():
    torch.manual_seed(0)
    model = _trained_like(_small(concat_channels=5, num_classes=None))
    x, t = torch.randn(2, 4, 8, 12), torch.tensor([10.0, 500.0])  # a non-square latent, computed positions
    zeros, all_false = torch.zeros(2, 3, 32), torch.zeros(2, 3, dtype=torch.bool)
    out = model(x, t, context=zeros, context_mask=all_false, y=torch.zeros(2, 16), concat=torch.randn(2, 5, 8, 12))
    assert out.shape == x.shape and torch.isfinite(out).all()  # image keys stay: no query without a key
    labels = _small(y_dim=None, num_classes=10)
    assert labels(x, t, context=zeros, y=torch.tensor([3, 10])).shape == x.shape  # 10: the null class
    assert (model.context_dim, model.y_dim, model.num_classes, model.concat_channels) == (32, 16, None, 5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = _trained_like(_small())
    x, t, context, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 32), torch.randn(2, 16)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(x, t, context=context, y=y).square().mean().backward()
        grads.append(model.blocks[0].attn.to_q.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_shape_errors_are_named():
    model = _small(pos_embed_max_size=4, sample_size=8)
    x, t, ctx, y = torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 3, 32), torch.randn(1, 16)
    with pytest.raises(ValueError, match=r"pass context \(B, T, 32\)"):
        model(x, t, y=y)
    with pytest.raises(ValueError, match=r"pass context \(B, T, 32\), got \(1, 3, 16\)"):
        model(x, t, context=torch.randn(1, 3, 16), y=y)
    with pytest.raises(ValueError, match=r"context_mask must be \(B, T\) = \(1, 3\)"):
        model(x, t, context=ctx, context_mask=torch.ones(1, 4, dtype=torch.bool), y=y)
    with pytest.raises(ValueError, match="pass y"):
        model(x, t, context=ctx)
    with pytest.raises(ValueError, match=r"y must be \(B, 16\)"):
        model(x, t, context=ctx, y=torch.randn(1, 8))
    with pytest.raises(ValueError, match="divisible by the patch size 2"):
        model(torch.randn(1, 4, 7, 8), t, context=ctx, y=y)
    with pytest.raises(ValueError, match=r"x must be \(B, 4, H, W\)"):
        model(torch.randn(1, 3, 8, 8), t, context=ctx, y=y)
    with pytest.raises(ValueError, match="5 x 4 patches exceeds pos_embed_max_size 4"):
        model(torch.randn(1, 4, 10, 8), t, context=ctx, y=y)
    with pytest.raises(ValueError, match="give context_dim"):
        MMDiT(context_dim=None)
    with pytest.raises(ValueError, match="pos_embed_max_size needs sample_size"):
        MMDiT(pos_embed_max_size=4)


# -- the GPU presets: they parse as `ldm fit` compositions and build at their published sizes ------------------------

SD15 = str(REPO / "configs/ldm/sd15-256.yaml")
TRAINER = str(REPO / "configs/trainer/debug.yaml")


@pytest.mark.parametrize("preset", ["mmdit-256.yaml", "dit-xl2-256.yaml"])
def test_the_gpu_presets_parse_over_the_sd15_config(preset, tmp_path, capsys):
    from ldm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", TRAINER, "-c", SD15, "-c", str(REPO / "configs/dit" / preset),
              f"--data.train={tmp_path}/train-*.tar", "--print_config"])
    assert exc.value.code == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert model["precond"]["class_path"] == "ldm.diffusion.FlowPrecond"
    assert model["loss"]["init_args"]["sigma_sampler"]["class_path"] == "ldm.diffusion.LogitNormalSigmas"
    assert model["conditioner"]["init_args"]["vector"] == "text"
    unet = model["unet"]
    assert unet["class_path"] == ("ldm.diffusion.MMDiT" if preset.startswith("mmdit") else "ldm.diffusion.DiT")
    assert "channels" not in unet["init_args"]  # nothing of the U-Net left over


def test_the_mmdit_preset_takes_microdits_masking_schedule(tmp_path, capsys):
    from ldm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", TRAINER, "-c", SD15, "-c", str(REPO / "configs/dit/mmdit-256.yaml"),
              f"--data.train={tmp_path}/train-*.tar", "--model.init_args.unet.init_args.mask_ratio=0.75",
              "--model.init_args.unmask_after_steps=200000", "--print_config"])
    assert exc.value.code == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert model["unet"]["init_args"]["mask_ratio"] == 0.75 and model["unmask_after_steps"] == 200000


def _unet_args(preset):
    return yaml.safe_load((REPO / "configs/dit" / preset).read_text())["model"]["init_args"]["unet"]["init_args"]


def test_the_mmdit_preset_is_sd3_medium_shaped():
    with torch.device("meta"):
        model = MMDiT(**_unet_args("mmdit-256.yaml"))
    assert (len(model.blocks), model.hidden_size, model.blocks[0].attn.heads) == (24, 1536, 24)  # SD3-medium's
    assert model.context_dim == model.y_dim == 768  # OpenAI's ViT-L/14 text: token width and pooled width
    # SD3-medium's 2,028,328,000 with ViT-L's 768-wide tokens and pooled vector in place of 4096 / 2048-wide ones,
    # 4 latent channels in and out in place of 16, and qk-norm's RMSNorm weights (4 x 64 a block)
    d, p = 1536, 2
    expected = (2_028_328_000 - (4096 - 768) * d - (2048 - 768) * d - (16 - 4) * p * p * d
                - (16 - 4) * p * p * (d + 1) + 24 * 4 * 64)
    assert _count(model) == expected == 2_021_108_752


def test_the_dit_xl2_preset_is_xl2_with_text():
    with torch.device("meta"):
        model = DiT(**_unet_args("dit-xl2-256.yaml"))
        xl2 = DiT(preset="XL/2", out_channels=8, num_classes=1000)
    assert (len(model.blocks), model.hidden_size, model.patch_size) == (28, 1152, 2)
    assert model.context_dim == model.y_dim == 768
    d = 1152
    # the paper's XL/2 (class labels, learned sigma) with a pooled-text MLP for the label table, 4 output channels
    # for 8, and per block a LayerNorm + cross-attention (q, k, v with biases, from 768-wide tokens; output)
    cross = 2 * d + (d * d + d) + 2 * (768 * d + d) + (d * d + d)
    expected = (674_834_720 - 1001 * d + (768 * d + d + d * d + d) - (8 - 4) * 4 * (d + 1) + 28 * cross)
    assert _count(xl2) == 674_834_720 and _count(model) == expected == 799_933_840


@pytest.mark.slow  # make test-all (keeps make test within its 15 minutes)
def test_a_tiny_mmdit_trains_with_ldm_fit_and_samples(shapes_dir, stage_runs, tmp_path):
    """The DiT debug preset with the backbone swapped for an MMDiT on the command line (the pooled text as y):
    the Conditioner feeds it (tokens, mask, pooled vector, the null condition), `ldm sample` draws from it."""
    from ldm.cli import main
    from ldm.diffusion import FlowPrecond
    from tests.stages import DEBUG, LDM_DEBUG, fit, stage_args

    cli = fit(["-c", *DEBUG, "-c", LDM_DEBUG, "-c", str(REPO / "configs/dit/debug.yaml"), *stage_args(stage_runs),
               "--model.init_args.unet.class_path=ldm.diffusion.MMDiT", "--model.init_args.unet.init_args.y_dim=64",
               "--model.init_args.unet.init_args.qk_norm=true", "--model.init_args.conditioner.init_args.vector=text",
               f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar", "--data.num_workers=0",
               "--data.batch_size=16", "--trainer.max_steps=7", "--trainer.max_epochs=-1",
               "--trainer.val_check_interval=7", "--trainer.limit_val_batches=1", f"--run.root={tmp_path}",
               "--run.version=v"])
    model = cli.model.unet
    assert isinstance(model, MMDiT) and isinstance(cli.model.precond, FlowPrecond)
    assert (model.hidden_size, len(model.blocks), model.context_dim, model.y_dim) == (64, 2, 64, 64)
    assert model.blocks[0].modulation_ctx[-1].weight.abs().sum() > 0  # the text stream's gates left zero
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    out = tmp_path / "samples" / "grid.png"
    assert main(["sample", "--ckpt", str(cli.run_dir), "--prompt", "a red circle", "--sampler", "euler",
                 "--steps", "4", "--out", str(out)]) == 0
    assert out.is_file()


def test_the_shapes_dit_preset_parses_over_the_shapes_unet_preset_and_is_dit_s2(tmp_path, capsys):
    from ldm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", TRAINER, "-c", str(REPO / "configs/ldm/shapes-kl-f4.yaml"),
              "-c", str(REPO / "configs/dit/shapes-dit-s2.yaml"), f"--data.train={tmp_path}/train-*.tar",
              "--print_config"])
    assert exc.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    model = config["model"]["init_args"]
    assert model["unet"]["class_path"] == "ldm.diffusion.DiT" and "channels" not in model["unet"]["init_args"]
    assert model["precond"]["class_path"] == "ldm.diffusion.FlowPrecond"
    assert model["loss"]["init_args"]["weighting"] is None  # the U-Net preset's min-SNR is not carried over
    assert config["data"]["init_args"]["image_size"] == 64  # the shapes preset's data: 4 x 16 x 16 latents
    model = DiT(**_unet_args("shapes-dit-s2.yaml"))
    assert (len(model.blocks), model.hidden_size, model.patch_size) == (12, 384, 2)
    out = model(torch.randn(2, 4, 16, 16), torch.rand(2), context=torch.randn(2, 5, 64))
    assert out.shape == (2, 4, 16, 16) and model.last_grid == (8, 8)
