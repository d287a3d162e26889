"""Representation alignment (REPA, Yu et al. 2025, "Representation Alignment for Generation"): an extra loss term
that trains a diffusion transformer's early tokens to predict a frozen image encoder's patch features.

Read top to bottom:

* :class:`FrozenImageEncoder`: the frozen vision tower of our own CLIP run (``checkpoint``) or of any open_clip model
  with a local weights file (``model_name`` + ``pretrained``); ``forward(images)`` -> its patch tokens after the last
  block and the final LayerNorm (as REPA reads DINOv2's ``x_norm_patchtokens``), (B, C, h, w), of the *clean* images
  resized to the tower's size by :meth:`OpenCLIP.preprocess`. The class token is not used;
* :class:`RepresentationAlignment`: an MLP projector h_phi (D -> hidden -> ... -> C, SiLU between the ``layers``
  linears; REPA's ``build_mlp`` is 3 linears of width 2048) reads the backbone's tokens after block ``depth``
  (1-based: REPA aligns block 8 of DiT-XL's 28) and the loss per sample is the negative cosine similarity
  -sim(y_n, h_phi(h_n)) averaged over the tokens n (eq. 8), in [-1, 1]. The training loss adds ``weight`` times it
  (REPA's lambda = 0.5).

When the encoder's patch grid (h, w) differs from the backbone's token grid, the encoder features are resized to the
backbone's grid (bilinear, antialiased) before the comparison. With patch masking (:class:`~ldm.diffusion.DiT`'s
``mask_ratio``) the blocks see only the kept tokens: only those are aligned, with the encoder features at their
positions (``kept`` indices).

The encoder is frozen (no gradient, always in eval mode, not in the optimizer) and its weights are left out of the
state dict: a checkpoint holds the projector only, and loading rebuilds the encoder from its config (the run or file
it names), as the frozen first stage and text encoder are rebuilt.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.contrastive.model import OpenCLIP


def patch_features(clip: OpenCLIP, images: Tensor, layer: int = -1) -> Tensor:
    """[-1, 1] images (B, 3, H, W) -> the ViT's patch tokens (B, C, h, w) after block ``layer`` (-1 the last), with
    the tower's final LayerNorm (``ln_post``) applied; open_clip's ``VisionTransformer.forward_intermediates``."""
    visual = clip.clip.visual
    if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "ln_post"):
        raise TypeError(f"REPA reads the patch tokens of a ViT image tower; this model's is a {type(visual).__name__}")
    blocks = len(visual.transformer.resblocks)
    if not -blocks <= layer <= -1:
        raise ValueError(f"layer {layer}: the image transformer has {blocks} blocks (-1 to -{blocks})")
    out = visual.forward_intermediates(clip.preprocess(images), indices=[blocks + layer], stop_early=True,
                                       normalize_intermediates=True, intermediates_only=True, output_fmt="NCHW")
    return out["image_intermediates"][0]  # (B, C, h, w)


class FrozenImageEncoder(nn.Module):
    """The frozen ViT image tower REPA aligns to.

    Args:
        checkpoint: a contrastive run folder (or a .ckpt in one): our own CLIP's image tower.
        model_name, pretrained: an open_clip model name (e.g. ``ViT-B-16``) and its local weights file.
        layer: the image block whose tokens are the target (-1 the last).
    """

    def __init__(self, checkpoint: str | None = None, model_name: str | None = None, pretrained: str | None = None,
                 layer: int = -1):
        super().__init__()
        if (checkpoint is None) == (model_name is None):
            raise ValueError("give one of checkpoint (a contrastive run) or model_name (+ a local pretrained file)")
        if checkpoint is not None:
            from ldm.run_parts import load_part

            self.model = load_part(checkpoint, "model", OpenCLIP)
        else:
            self.model = OpenCLIP(model_name=model_name, pretrained=pretrained)
        self.model.eval().requires_grad_(False)
        self.layer = layer
        visual = self.model.clip.visual
        self.width = visual.conv1.out_channels if hasattr(visual, "conv1") else None  # C of the patch tokens
        patch_features(self.model, torch.zeros(1, 3, *self.model.image_size), layer)  # fails early on a non-ViT

    def train(self, mode: bool = True) -> "FrozenImageEncoder":
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return patch_features(self.model, images, self.layer)  # (B, C, h, w)


def projector(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    """REPA's ``build_mlp``: ``layers`` linears in_dim -> hidden -> ... -> out_dim with SiLU between them."""
    if layers < 1:
        raise ValueError(f"the projector needs at least one layer, got {layers}")
    widths = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    modules: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        modules += [nn.Linear(a, b)] + ([nn.SiLU()] if i < layers - 1 else [])
    return nn.Sequential(*modules)


def _drop_encoder_state(module: "RepresentationAlignment", state_dict: dict, prefix: str, local_metadata) -> None:
    """The frozen encoder is rebuilt from its config: keep its weights out of checkpoints."""
    for key in [k for k in state_dict if k.startswith(prefix + "encoder.")]:
        del state_dict[key]


def _fill_encoder_state(module: "RepresentationAlignment", state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints hold no encoder weights: load the rebuilt encoder's own (strict loading then passes)."""
    for key, value in module.encoder.state_dict().items():
        state_dict.setdefault(prefix + "encoder." + key, value)


class RepresentationAlignment(nn.Module):
    """REPA's loss term (Yu et al. 2025, eq. 8): -cos(encoder patch features, projector(backbone tokens)).

    Args:
        encoder: the frozen image encoder, ``encoder(images [-1, 1]) -> (B, C, h, w)`` patch features
            (:class:`FrozenImageEncoder`), with ``width`` = C.
        depth: the backbone block (1-based) whose output tokens are aligned (REPA: 8 of DiT-XL's 28).
        weight: lambda, the factor of the term in the training loss (REPA: 0.5).
        hidden: the projector's hidden width (REPA: 2048).
        layers: the projector's linears (REPA: 3).
        backbone_width: D of the backbone's tokens (default: set by :meth:`fit_to` from the backbone).
    """

    def __init__(self, encoder: nn.Module, depth: int = 1, weight: float = 0.5, hidden: int = 2048, layers: int = 3,
                 backbone_width: int | None = None):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth counts blocks from 1 (REPA aligns an early one, e.g. 8 of 28), got {depth}")
        self.encoder = encoder.eval().requires_grad_(False)
        self.depth, self.weight, self.hidden, self.layers = depth, weight, hidden, layers
        self.backbone_width = backbone_width
        self.projector = (projector(backbone_width, hidden, self._encoder_width(), layers)
                          if backbone_width is not None else None)
        self.register_state_dict_post_hook(_drop_encoder_state)
        self.register_load_state_dict_pre_hook(_fill_encoder_state)

    def _encoder_width(self) -> int:
        width = getattr(self.encoder, "width", None)
        if not isinstance(width, int):
            raise ValueError(f"the REPA encoder ({type(self.encoder).__name__}) must say its feature width C (width)")
        return width

    def train(self, mode: bool = True) -> "RepresentationAlignment":
        super().train(mode)
        self.encoder.eval()  # frozen
        return self

    def fit_to(self, backbone: nn.Module) -> "RepresentationAlignment":
        """Check ``backbone`` is a transformer with ``blocks`` of at least ``depth`` whose tokens form an image grid
        (``last_grid``: :class:`~ldm.diffusion.DiT`, or :class:`~ldm.diffusion.MMDiT`, whose joint blocks' image
        stream is aligned) and build the
        projector for its width (``hidden_size``). Returns self."""
        blocks = getattr(backbone, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or not hasattr(backbone, "last_grid"):
            raise TypeError(f"REPA aligns the image tokens of a transformer backbone with blocks and a token grid "
                            f"(ldm.diffusion.DiT or MMDiT); {type(backbone).__name__} is not one")
        if self.depth > len(blocks):
            raise ValueError(f"REPA depth {self.depth}: the backbone has {len(blocks)} blocks")
        width = getattr(backbone, "hidden_size", None)
        if self.projector is None:
            if width is None:
                raise ValueError(f"{type(backbone).__name__} has no hidden_size: give backbone_width")
            self.backbone_width = width
            self.projector = projector(width, self.hidden, self._encoder_width(), self.layers)
        elif width is not None and width != self.backbone_width:
            raise ValueError(f"backbone_width {self.backbone_width} but the backbone's tokens are {width} wide")
        return self

    @contextmanager
    def capture(self, backbone: nn.Module) -> Iterator[dict[str, Tensor]]:
        """Within the block, ``captured["tokens"]`` holds the output (B, N, D) of the backbone's block ``depth`` of
        its last forward (a forward hook on ``backbone.blocks[depth - 1]``; of an MMDiT's joint block, the image
        stream)."""
        captured: dict[str, Tensor] = {}

        def hook(module: nn.Module, args, output: Tensor | tuple[Tensor, Tensor | None]) -> None:
            captured["tokens"] = output[0] if isinstance(output, tuple) else output  # an MMDiT block: image stream

        handle = backbone.blocks[self.depth - 1].register_forward_hook(hook)
        try:
            yield captured
        finally:
            handle.remove()

    def targets(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """The encoder's patch features of [-1, 1] ``images`` (B, 3, H, W) on the backbone's token grid
        (rows, cols): (B, rows * cols, C), row-major like the backbone's tokens."""
        feats = self.encoder(images).float()  # (B, C, h, w)
        if tuple(feats.shape[-2:]) != tuple(grid):  # another patch grid: resize the features to the backbone's
            feats = F.interpolate(feats, size=grid, mode="bilinear", align_corners=False, antialias=True)
        return feats.flatten(2).transpose(1, 2)  # (B, N, C)

    def forward(self, tokens: Tensor, images: Tensor, grid: tuple[int, int], kept: Tensor | None = None) -> Tensor:
        """Per-sample alignment loss (B,): -cos(y_n, h_phi(h_n)) averaged over tokens, in [-1, 1] (unweighted).

        tokens: the backbone's tokens after block ``depth`` (B, N', D): all N = rows * cols tokens, or the kept ones
        with ``kept`` (B, N') their indices (patch masking). images: the clean images (B, 3, H, W) in [-1, 1].
        """
        if self.projector is None:
            raise RuntimeError("call fit_to(backbone) first (LatentDiffusion does): the projector's width is unset")
        target = self.targets(images, grid)  # (B, N, C)
        if kept is not None:
            target = target.gather(1, kept[..., None].expand(-1, -1, target.shape[-1]))  # (B, N', C)
        if target.shape[1] != tokens.shape[1]:
            raise ValueError(f"{tokens.shape[1]} backbone tokens but a grid of {grid[0]} x {grid[1]} encoder targets")
        pred = self.projector(tokens)  # (B, N', C)
        cos = F.cosine_similarity(pred.float(), target, dim=-1)  # (B, N')
        return -cos.mean(dim=1)  # (B,)


__all__ = ["FrozenImageEncoder", "RepresentationAlignment", "patch_features", "projector"]
