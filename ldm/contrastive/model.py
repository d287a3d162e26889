"""CLIP / SigLIP models assembled from open_clip (Radford et al. 2021; Zhai et al. 2023).

:class:`OpenCLIP` builds ``open_clip.model.CLIP`` from tower presets written in our configs
(``open_clip.model.CLIPVisionCfg`` / ``CLIPTextCfg``, typed, so every key is checked) or
from any open_clip model name, without downloading anything: ``pretrained`` is a local
checkpoint file (open_clip's format), e.g. the OpenCLIP ViT-H/14 weights Stable Diffusion 2
uses. The tokenizer is open_clip's (its BPE vocabulary ships with the package).

Images arrive as our batches hold them, (B, 3, H, W) in [-1, 1]; :meth:`preprocess`
resizes them to the tower's input size and applies the model's mean / std (OpenAI's for
named models, identity for our own presets, which train on [-1, 1] directly).
"""

from __future__ import annotations

import math
import os

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from torch import Tensor, nn


class OpenCLIP(nn.Module):
    """Args:
        embed_dim: joint embedding width (custom towers).
        vision, text: the towers (custom presets); ignored with ``model_name``.
        model_name: any open_clip model name (e.g. ``ViT-B-32``, ``ViT-H-14``) instead of custom towers.
        pretrained: local open_clip checkpoint to load (a file path; nothing is downloaded).
        siglip: initialise for the sigmoid loss: logit scale log(10) and a learned bias -10 (SigLIP, sec. 3.2);
            otherwise CLIP's log(1 / 0.07) and no bias.
    """

    def __init__(self, embed_dim: int = 512, vision: CLIPVisionCfg | None = None, text: CLIPTextCfg | None = None,
                 model_name: str | None = None, pretrained: str | None = None, siglip: bool = False):
        super().__init__()
        scale = math.log(10.0) if siglip else math.log(1 / 0.07)
        bias = -10.0 if siglip else None
        if pretrained is not None:
            pretrained = os.path.expanduser(pretrained)
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(f"pretrained open_clip checkpoint {pretrained} does not exist "
                                        "(model.init_args.model.init_args.pretrained)")
        if model_name is not None:
            self.clip = open_clip.create_model(model_name, pretrained=None)
            self.tokenizer = open_clip.get_tokenizer(model_name)
            mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        else:
            vision, text = vision or CLIPVisionCfg(), text or CLIPTextCfg()
            self.clip = open_clip.model.CLIP(embed_dim, vision, text, init_logit_scale=scale, init_logit_bias=bias)
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=text.context_length)
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # identity on [-1, 1] inputs
        if pretrained is not None and is_torchscript(pretrained):
            load_openai_archive(self.clip, pretrained, model_name)
        elif pretrained is not None:
            try:
                open_clip.load_checkpoint(self.clip, pretrained)
            except (RuntimeError, KeyError) as e:
                raise ValueError(f"{pretrained} does not match the model ({model_name or 'custom towers'}): {e}") from e
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1), persistent=False)
        size = self.clip.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        return getattr(self.clip, "logit_bias", None)

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] images (B, 3, H, W) -> the tower's input size and normalisation."""
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bicubic", antialias=True, align_corners=False)
        return ((images + 1) / 2 - self.mean) / self.std

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        return self.clip.encode_image(self.preprocess(images), normalize=normalize)  # (B, D)

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        return self.clip.encode_text(tokens, normalize=normalize)  # (B, D)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], normalize: bool = True) -> Tensor:
        device = self.logit_scale.device
        return self.encode_text(self.tokenizer(texts).to(device), normalize=normalize)


def is_torchscript(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (OpenAI's released CLIP files, e.g. ``ViT-L-14.pt``)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


#: entries of OpenAI's archives that are not weights
OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def load_openai_archive(clip: nn.Module, path: str | os.PathLike, model_name: str | None) -> None:
    """Load OpenAI's CLIP release (a TorchScript archive, float16) into an open_clip ``CLIP`` of the same shape.

    ``torch.load(weights_only=True)`` refuses TorchScript archives; ``torch.jit.load`` reads their tensors (what
    open_clip's ``load_openai_model`` does too). OpenAI's models use QuickGELU: the open_clip name must be a
    ``-quickgelu`` one (``ViT-L-14-quickgelu``), or every activation would silently differ.
    """
    config = open_clip.get_model_config(model_name) if model_name else None
    if config is None or not config.get("quick_gelu", False):
        raise ValueError(f"{path} is an OpenAI CLIP release (TorchScript), trained with QuickGELU: use the open_clip "
                         f"model name with -quickgelu (e.g. ViT-L-14-quickgelu), not {model_name!r}")
    state = {k: v.float() if v.is_floating_point() else v
             for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items() if k not in OPENAI_EXTRAS}
    try:
        clip.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} does not match the model {model_name}: {str(e)[:400]}") from None
