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


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    """torch-fidelity's Inception-v3 feature extractor with random weights, saved like the real file.

    The module is built with its weight loading stubbed out (the real file cannot be
    downloaded here); the system then loads this file through the real rFID path. FID values
    computed with it are not meaningful.
    """
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    folder = tmp_path_factory.mktemp("inception")
    stub = folder / "empty.pth"
    torch.save({}, stub)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None):
        torch.manual_seed(0)
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(stub))
    path = folder / "inception-random.pth"
    torch.save(model.state_dict(), path)
    return path
