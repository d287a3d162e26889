import pytest
import torch


@pytest.fixture(scope="session")
def vgg16_file(tmp_path_factory):
    """A torchvision-format VGG16 state dict (features only) with random values: tests the LPIPS
    loading path; LPIPS values computed with it are not meaningful."""
    from torchvision.models import vgg16

    path = tmp_path_factory.mktemp("weights") / "vgg16-random.pth"
    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in vgg16(weights=None).features.state_dict().items()}, path)
    return path
