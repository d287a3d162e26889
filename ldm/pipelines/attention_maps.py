"""Cross-attention maps per prompt token (Tang et al. 2023, "DAAM"): where in the image each word acts.

While one image is sampled, every cross-attention layer of the U-Net reports its attention
weights (B, heads, N, T) through :attr:`ldm.nn.Attention.probe`; for the conditional branch the
weights are averaged over heads, reshaped to the layer's grid, upsampled to the latent grid and
summed over layers and sampling steps. The result is one map per real prompt token (start, end
and padding tokens are left out), upsampled to the image and scaled to [0, 1] per token.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.nn.transformer import Attention
from ldm.pipelines.text_to_image import SamplerSettings, TextToImage


def cross_attention_layers(unet) -> list[Attention]:
    return [m.attn2 for m in unet.modules() if getattr(m, "attn2", None) is not None]


@torch.no_grad()
def attention_maps(pipe: TextToImage, prompt: str, settings: SamplerSettings, *,
                   image_size: int) -> tuple[Tensor, Tensor, list[str]]:
    """(image (3, H, W), maps (words, H, W) in [0, 1], the words) for one prompt."""
    system = pipe.system
    layers = cross_attention_layers(system.unet)
    if not layers:
        raise ValueError("this U-Net has no cross-attention layers (context_dim is None): no per-token maps")
    if not system.conditioner.cross_attends_to_text:
        raise ValueError("this model does not cross-attend to the prompt's tokens (the conditioner's text_context is "
                         "off): no per-word maps")
    tokenizer = system.conditioner.tokenizer
    ids = tokenizer([prompt])[0].tolist()
    end = ids.index(tokenizer.eot_token_id) if tokenizer.eot_token_id in ids else len(ids)
    positions = list(range(1, end))  # the words: after the start token, before the end token
    words = [tokenizer.decode([ids[p]]).strip() for p in positions]
    _, h, w = pipe.latent_shape(image_size)
    total = torch.zeros(len(ids) + system.conditioner.embedding_tokens, h, w)  # CLIP-embedding tokens come last

    def probe(probs: Tensor) -> None:
        cond = probs[-1].float().mean(0)  # (N, T): the conditional branch (last in the guided batch), mean of heads
        side = int(math.isqrt(cond.shape[0]))
        grid = cond.t().reshape(-1, 1, side, cond.shape[0] // side)  # (T, 1, h_l, w_l)
        total.add_(F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[:, 0].cpu())

    for layer in layers:
        layer.probe = probe
    try:
        image = pipe([prompt], settings, image_size=image_size, progress=False)[0]
    finally:
        for layer in layers:
            layer.probe = None
    maps = F.interpolate(total[positions][:, None], size=(image_size, image_size), mode="bilinear",
                         align_corners=False)[:, 0]  # (words, H, W)
    low = maps.flatten(1).min(1).values[:, None, None]
    high = maps.flatten(1).max(1).values[:, None, None]
    return image, (maps - low) / (high - low).clamp(min=1e-12), words


def save_attention_figure(image: Tensor, maps: Tensor, words: list[str], path: str | Path, title: str = "") -> Path:
    """The image, then one heatmap overlay per word, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picture = ((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    fig, axes = plt.subplots(1, len(words) + 1, figsize=(2.2 * (len(words) + 1), 2.6), squeeze=False)
    axes[0, 0].imshow(picture)
    axes[0, 0].set_title("image", fontsize=9)
    for ax, heat, word in zip(axes[0, 1:], maps, words, strict=True):
        ax.imshow(picture)
        ax.imshow(heat.numpy(), cmap="jet", alpha=0.5)
        ax.set_title(word, fontsize=9)
    for ax in axes[0]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
