"""OpenAI's CLIP releases (TorchScript archives, float16, QuickGELU) load as open_clip models and text encoders."""

import open_clip
import pytest
import torch
from torch import nn

from ldm.contrastive import FrozenTextEncoder, OpenCLIP
from ldm.contrastive.model import is_torchscript

NAME = "ViT-B-32-quickgelu"  # the smallest OpenAI-shaped model open_clip names


class _Archive(nn.Module):
    """A module with the CLIP's parameters under OpenAI's names, scripted: the layout of OpenAI's .pt files."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.fixture(scope="module")
def openai_file(tmp_path_factory):
    torch.manual_seed(0)
    clip = open_clip.create_model(NAME, pretrained=None).half()  # OpenAI ships float16 weights
    archive = _Archive()
    for name, child in clip.named_children():
        archive.add_module(name, child)
    for name, p in clip.named_parameters(recurse=False):
        archive.register_parameter(name, p)
    archive.register_buffer("input_resolution", torch.tensor(224))  # OpenAI's extra entries
    path = tmp_path_factory.mktemp("openai") / "ViT-B-32.pt"
    torch.jit.script(archive).save(str(path))
    return path, clip.float().eval()


@pytest.mark.slow  # make test-all (keeps make test within its 15 minutes)
def test_an_openai_archive_loads_with_its_weights(openai_file):
    path, reference = openai_file
    assert is_torchscript(path)
    with pytest.raises(RuntimeError, match="TorchScript"):
        torch.load(path, weights_only=True)  # what open_clip.load_checkpoint does: refused
    model = OpenCLIP(model_name=NAME, pretrained=str(path))
    tokens = model.tokenizer(["a red circle", "a photo of a dog"])
    with torch.no_grad():
        assert torch.equal(model.clip.encode_text(tokens), reference.encode_text(tokens))
    encoder = FrozenTextEncoder(model_name=NAME, pretrained=str(path))
    assert encoder.width == 512 and encoder.has_image_tower


@pytest.mark.slow  # make test-all (keeps make test within its 15 minutes)
def test_an_openai_archive_under_a_gelu_model_name_is_refused(openai_file):
    path, _ = openai_file
    with pytest.raises(ValueError, match="QuickGELU.*ViT-B-32-quickgelu|-quickgelu"):
        OpenCLIP(model_name="ViT-B-32", pretrained=str(path))
