"""A tiny random Stable-Diffusion-shaped diffusers pipeline (every weight random) and the settings both import
tests (diffusers folders, single files) sample it with."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.interop.tokenizer import write_clip_tokenizer
from ldm.pipelines.text_to_image import initial_noise

PROMPTS = ["a red circle on top of a blue square", "an astronaut riding a horse"]
SIZE, STEPS, CFG = 16, 8, 5.0


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every weight random (zero-initialised layers would hide a wrong mapping); norm scales about 1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        p.data = 1 + 0.1 * noise if p.ndim == 1 and name.endswith("weight") else 0.05 * noise


def ddim():
    import diffusers

    return diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")


def tiny_sd_pipeline(root: Path):
    """U-Net 32-64 channels (cross-attention on the first level), KL VAE 32-64 (f = 2), a 2-layer CLIP text model,
    OpenAI's BPE tokenizer padding with the end token, DDIM: a StableDiffusionPipeline."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        sample_size=SIZE)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    for i, m in enumerate((unet, vae, text)):
        randomise(m, i)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(root / "tok"))
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=ddim(), safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def reference_images(pipe, scheduler=None) -> torch.Tensor:
    """diffusers' images (N, 3, H, W) in [0, 1], from the noise ldm draws for seed 0 (default: DDIM)."""
    pipe.scheduler = scheduler or ddim()
    latents = initial_noise(len(PROMPTS), (4, SIZE // 2, SIZE // 2), seed=0)
    with torch.no_grad():
        out = pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG, latents=latents,
                   output_type="pt")
    return out.images
