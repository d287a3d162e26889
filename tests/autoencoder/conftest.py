import pytest
import torch


@pytest.fixture(scope="session")
def vgg16_file(tmp_path_factory):
    """A torchvision VGG16 state dict (the format of ``vgg16-397923af.pth``) with random values: tests the LPIPS
    loading path; LPIPS values computed with it are not meaningful. LPIPS uses the convolutional part only, so
    the classifier's 120M weights are zero-stride views of one zero (the right shapes in a file of ~60 MB)."""
    from torchvision.models import vgg16

    path = tmp_path_factory.mktemp("weights") / "vgg16-random.pth"
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in vgg16(weights=None).state_dict().items()}
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in vgg16(weights=None).features.state_dict().items()}
    state.update({k: torch.zeros(()).expand(shape) for k, shape in shapes.items() if k not in state})
    torch.save(state, path)
    return path
