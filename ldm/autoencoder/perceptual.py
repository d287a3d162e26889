"""LPIPS perceptual distance (Zhang et al. 2018) with locally loaded VGG16 weights.

torchmetrics ships LPIPS' linear calibration layers inside the package, but its VGG16
backbone comes from torchvision's ImageNet weights, which are downloaded. Here the
backbone loads from a local file (torchvision's ``vgg16-397923af.pth`` state dict), so
training works offline; a missing file is an error that names it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

VGG16_FILE = "vgg16-397923af.pth"
DEFAULT_VGG16 = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache/torch")) / "hub/checkpoints" / VGG16_FILE


class LPIPS(nn.Module):
    """Per-sample LPIPS distance (B,) between images in [-1, 1]; frozen, always in eval mode."""

    def __init__(self, vgg16_weights: str | os.PathLike | None = None):
        super().__init__()
        from torchmetrics.functional.image.lpips import _NoTrainLpips
        from torchvision.models import vgg16

        path = Path(vgg16_weights) if vgg16_weights else DEFAULT_VGG16
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS needs the VGG16 ImageNet weights at {path} (torchvision's {VGG16_FILE}); "
                "copy the file there or set loss.perceptual_weights, or set loss.perceptual_weight: 0 "
                "to train without the perceptual term"
            )
        self.lpips = _NoTrainLpips(pretrained=True, net="vgg", pnet_rand=True)  # backbone below, lins bundled
        features = vgg16(weights=None).features  # LPIPS uses the convolutional part only
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()
                                      if k.startswith("features.")})
        except (RuntimeError, KeyError, AttributeError) as e:
            raise ValueError(f"{path} is not a torchvision VGG16 state dict: {e}") from e
        for i in range(1, 6):
            piece = getattr(self.lpips.net, f"slice{i}")
            for name, module in piece.named_children():
                module.load_state_dict(features[int(name)].state_dict())
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.lpips(x, y).flatten()  # (B,)
