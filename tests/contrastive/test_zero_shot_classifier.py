"""Zero-shot class embeddings through open_clip.build_zero_shot_classifier equal the prompt ensemble by hand."""

import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from ldm.contrastive import OpenCLIP, ZeroShotTask
from ldm.metrics import class_embeddings

TASK = ZeroShotTask("shape", classes=["circle", "square", "triangle"],
                    templates=["a {}", "a photo of a {}", "a drawing of a {} shape"])


def ensemble_by_hand(model: OpenCLIP, classes, templates) -> torch.Tensor:
    """The hand-written ensemble before issue 18: per class, the normalised mean of normalised prompt embeddings."""
    prompts = [t.format(c) for c in classes for t in templates]
    emb = model.embed_texts(prompts).reshape(len(classes), len(templates), -1)
    emb = torch.nn.functional.normalize(emb, dim=-1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1)


def test_open_clip_classifier_equals_the_hand_written_ensemble():
    torch.manual_seed(0)
    model = OpenCLIP(32, CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
                     CLIPTextCfg(context_length=16, width=32, heads=2, layers=1)).eval()
    ref = ensemble_by_hand(model, TASK.classes, TASK.templates)
    ours = TASK.classifier(model)
    print("max |difference|", (ours - ref).abs().max().item())
    assert ours.shape == (3, 32)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.equal(class_embeddings(model, TASK.classes, TASK.templates), ours)
