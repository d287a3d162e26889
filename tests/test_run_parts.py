"""Loading a trained part of a run without Lightning (ldm.run_parts): the same weights as the whole system's."""

from __future__ import annotations

import pytest
import torch

from ldm.autoencoder import AutoencoderFirstStage
from ldm.autoencoder.model import Autoencoder
from ldm.contrastive import FrozenTextEncoder, OpenCLIP
from ldm.run_parts import load_part
from ldm.systems import load_autoencoder, load_clip


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_part_equals_the_same_part_of_the_loaded_system(stage_runs):
    _same_state(load_part(stage_runs["ae"], "autoencoder", Autoencoder), load_autoencoder(stage_runs["ae"]))
    _same_state(load_part(stage_runs["clip"], "model", OpenCLIP), load_clip(stage_runs["clip"]))
    first = AutoencoderFirstStage(str(stage_runs["ae"]))
    assert float(first.autoencoder.scale_factor) == float(load_autoencoder(stage_runs["ae"]).scale_factor)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(first.encode(images), load_autoencoder(stage_runs["ae"]).encode(images))
    _same_state(FrozenTextEncoder(checkpoint=str(stage_runs["clip"])).model, load_clip(stage_runs["clip"]))


def test_a_run_without_the_part_is_named_in_the_error(stage_runs):
    with pytest.raises(TypeError, match="ContrastiveSystem run without a 'autoencoder' part"):
        load_part(stage_runs["clip"], "autoencoder", Autoencoder)
    with pytest.raises(TypeError, match="its 'model' part is not a Autoencoder"):
        load_part(stage_runs["clip"], "model", Autoencoder)
