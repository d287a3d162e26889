"""ContrastiveSystem's weight-decay groups are open_clip_train's (issue 15, defect 4)."""

from types import SimpleNamespace

import pytest
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from ldm.contrastive import ClipLoss, OpenCLIP, SigLipLoss
from ldm.systems.contrastive import ContrastiveSystem


def open_clip_train_exclude(n, p):
    """open_clip_train/main.py, verbatim: the parameters without weight decay."""
    return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or 'logit_scale' in n


def _system(siglip: bool, **kwargs) -> ContrastiveSystem:
    model = OpenCLIP(32, CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
                     CLIPTextCfg(context_length=16, width=32, heads=2, layers=1), siglip=siglip)
    return ContrastiveSystem(model, SigLipLoss() if siglip else ClipLoss(), **kwargs)  # AdamW, weight decay 0.2


def _groups(system: ContrastiveSystem) -> dict[float, set[str]]:
    """weight decay -> names (in the open_clip model) of the parameters the optimizer gives it."""
    system.trainer = SimpleNamespace(estimated_stepping_batches=10)  # all configure_optimizers reads of it
    opt = system.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in system.model.clip.named_parameters()}
    groups: dict[float, set[str]] = {}
    for group in opt.param_groups:
        groups.setdefault(group["weight_decay"], set()).update(names[id(p)] for p in group["params"])
    return groups


@pytest.mark.parametrize("siglip", [False, True])
def test_weight_decay_groups_are_open_clip_trains(siglip):
    system = _system(siglip)
    system.model.clip.visual.conv1.weight.requires_grad_(False)  # frozen: in no group, as in open_clip_train
    named = [(n, p) for n, p in system.model.clip.named_parameters() if p.requires_grad]
    expected = {0.0: {n for n, p in named if open_clip_train_exclude(n, p)},
                0.2: {n for n, p in named if not open_clip_train_exclude(n, p)}}
    assert _groups(system) == expected
    assert {"token_embedding.weight", "positional_embedding", "visual.positional_embedding"} <= expected[0.2]


def test_decay_embeddings_false_also_exempts_the_embeddings():
    system = _system(False, decay_embeddings=False)
    named = list(system.model.clip.named_parameters())
    embeddings = {"token_embedding.weight", "positional_embedding", "visual.positional_embedding"}
    groups = _groups(system)
    assert groups[0.0] == {n for n, p in named if open_clip_train_exclude(n, p)} | embeddings
    assert groups[0.2] == {n for n, p in named if not open_clip_train_exclude(n, p)} - embeddings
