"""LPIPS from torchmetrics' public metric with a local VGG16 file: LPIPS' formula, gradients, checkpoint layout."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchmetrics.functional.image.lpips as tm_lpips
from torchvision.models import vgg16

from ldm.autoencoder.perceptual import LPIPS, lpips_metric

TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of VGG16's features


def lpips_by_hand(weights: Path, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS (Zhang et al. 2018, eq. 1), written out: VGG16 features from ``weights``, LPIPS' linear layers as
    torchmetrics bundles them; the formula of the implementation before issue 18, (B,)."""
    features = vgg16(weights=None).features.eval()
    features.load_state_dict({k.removeprefix("features."): v for k, v in torch.load(weights).items()
                              if k.startswith("features.")})
    lins = torch.load(Path(tm_lpips.__file__).parent / "lpips_models/vgg.pth", map_location="cpu")  # lin{k}.model.1.weight (1, C, 1, 1)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(img):
        h, out = (img - shift) / scale, []
        for i, layer in enumerate(features):
            h = layer(h)
            if i in TAPS:
                out.append(h / torch.sqrt(1e-8 + (h ** 2).sum(1, keepdim=True)))  # unit length over channels
        return out

    total = 0
    for k, (a, b) in enumerate(zip(taps(x), taps(y))):
        total = total + F.conv2d((a - b) ** 2, lins[f"lin{k}.model.1.weight"]).mean((2, 3))  # (B, 1)
    return total.flatten()


def test_lpips_equals_the_formula_with_the_local_file_and_passes_gradients(vgg16_file):
    torch.manual_seed(1)
    x = torch.rand(3, 3, 48, 48) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1.2, 1.2)  # an unclamped decoder output may leave [-1, 1]
    lpips = LPIPS(vgg16_file)
    with torch.no_grad():
        ref = lpips_by_hand(vgg16_file, x, y)
    y.requires_grad_(True)
    ours = lpips(x, y)
    print("LPIPS by hand", ref.tolist(), "ours", ours.tolist())
    assert ours.shape == (3,) and (ref > 0).all()
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6)
    ours.sum().backward()  # the perceptual loss: gradients reach the reconstruction, not the frozen network
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert not any(p.requires_grad or p.grad is not None for p in lpips.parameters())
    # checkpoints keep the layout of the module before issue 18
    keys = set(lpips.state_dict())
    assert {"lpips.net.slice1.0.weight", "lpips.net.slice5.28.bias", "lpips.lin4.model.1.weight"} <= keys


def test_lpips_metric_is_torchmetrics_public_metric_on_the_local_file(vgg16_file):
    """The same network as a metric (mean over images in [-1, 1]), built offline from the file, hub dir restored."""
    before = torch.hub.get_dir()
    metric = lpips_metric(vgg16_file)
    assert torch.hub.get_dir() == before
    torch.manual_seed(2)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    metric.update(x[:2], y[:2])
    metric.update(x[2:], y[2:])
    assert torch.allclose(metric.compute(), lpips_by_hand(vgg16_file, x, y).mean(), rtol=1e-6, atol=1e-6)


def test_lpips_names_a_file_that_is_not_vgg16(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a torchvision VGG16 state dict"):
        LPIPS(bad)
