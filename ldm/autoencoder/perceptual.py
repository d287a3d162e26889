"""LPIPS perceptual distance (Zhang et al. 2018): torchmetrics' VGG LPIPS with locally loaded VGG16 weights.

torchmetrics' :class:`~torchmetrics.image.lpip.LearnedPerceptualImagePatchSimilarity` (``net_type="vgg"``)
ships LPIPS' linear calibration layers in the package and builds its VGG16 backbone from torchvision's
ImageNet weights, which torchvision reads from the torch hub cache (``<hub dir>/checkpoints/vgg16-397923af.pth``)
and downloads when they are missing there. The backbone here comes from a local file (torchvision's
``vgg16-397923af.pth`` state dict, any path): the metric is built with the hub cache pointed at a folder
holding that file (``torch.hub.set_dir``), so training works offline; a missing file is an error that names it.

The loss calls the metric's LPIPS network (``metric.net``, torchmetrics' ``feature_network``) directly:
``update`` rejects inputs below -1, which an unclamped decoder output produces, and a metric would also keep
every score (with its graph) in its state. Checkpoints keep the network under ``lpips.`` as before.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

VGG16_FILE = "vgg16-397923af.pth"


def default_vgg16_path() -> Path:
    """Where torchvision keeps its VGG16 weights: the torch hub cache (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def lpips_metric(vgg16_weights: str | os.PathLike, **kwargs):
    """torchmetrics' VGG LPIPS metric with its backbone read from ``vgg16_weights`` (torchvision's state dict)."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    path = Path(vgg16_weights).resolve()
    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as hub:
        (Path(hub) / "checkpoints").mkdir()
        (Path(hub) / "checkpoints" / VGG16_FILE).symlink_to(path)  # the name torchvision looks for
        torch.hub.set_dir(hub)
        try:
            return LearnedPerceptualImagePatchSimilarity(net_type="vgg", **kwargs)
        finally:
            torch.hub.set_dir(previous)


class LPIPS(nn.Module):
    """Per-sample LPIPS distance (B,) between images in [-1, 1]; frozen, always in eval mode; differentiable
    in the images (the autoencoder's perceptual loss)."""

    def __init__(self, vgg16_weights: str | os.PathLike | None = None):
        super().__init__()
        path = Path(vgg16_weights) if vgg16_weights else default_vgg16_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS needs the VGG16 ImageNet weights at {path} (torchvision's {VGG16_FILE}); "
                "copy the file there or set loss.perceptual_weights, or set loss.perceptual_weight: 0 "
                "to train without the perceptual term"
            )
        try:  # a plain tensor file (torchvision itself unpickles it unrestricted), with VGG16's layers
            torch.load(path, map_location="cpu", weights_only=True)
            self.lpips = lpips_metric(path).net  # torchmetrics' LPIPS network: VGG16 slices + linear layers
        except (RuntimeError, KeyError, AttributeError, EOFError, pickle.UnpicklingError) as e:
            raise ValueError(f"{path} is not a torchvision VGG16 state dict: {str(e)[:500]}") from e
        self.lpips.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.lpips(x, y).flatten()  # (B, 1, 1, 1) -> (B,)
