"""A run folder written before the conditioner (issue 15) still loads: its config's conditioning keys and its
checkpoint's weights are moved to where they are now, and the rebuilt system equals today's."""

from __future__ import annotations

import shutil

import torch
import yaml

from ldm.diffusion import Conditioner, UNet
from ldm.systems import LatentDiffusion, load_system
from ldm.systems.config_upgrades import upgrade_model_config


def _as_before_issue_15(run_dir, old_dir) -> None:
    """Rewrite a copy of a run folder as an earlier version wrote it."""
    shutil.copytree(run_dir, old_dir)
    config = yaml.safe_load((old_dir / "config.yaml").read_text())
    args = config["model"]["init_args"]
    moved = args.pop("conditioner")["init_args"]
    moved["vector_cond"] = moved.pop("vector")
    for later in ("null", "mask_padding"):  # options the conditioner got after issue 15 (issue 17)
        moved.pop(later)
    args.update(moved)
    (old_dir / "config.yaml").write_text(yaml.safe_dump(config))
    for ckpt in (old_dir / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True)
        for key in ("state_dict", "current_model_state"):
            if key in state:
                state[key] = {k.removeprefix("conditioner."): v for k, v in state[key].items()}
        torch.save(state, ckpt)


def test_a_run_from_before_the_conditioner_loads_with_the_same_weights(ldm_run, tmp_path):
    old = tmp_path / "old"
    _as_before_issue_15(ldm_run.run_dir, old)
    assert "text_encoder" in yaml.safe_load((old / "config.yaml").read_text())["model"]["init_args"]
    before, now = load_system(old), load_system(ldm_run.run_dir)
    assert isinstance(before.conditioner.text_encoder, torch.nn.Module)
    assert before.state_dict().keys() == now.state_dict().keys()
    assert all(torch.equal(v, now.state_dict()[k]) for k, v in before.state_dict().items())


def test_old_embedding_projection_weights_load_into_the_conditioner():
    unet = UNet(in_channels=3, channels=16, channel_mult=[1], num_res_blocks=1, attention_levels=[0], heads=2,
                context_dim=8, y_dim=6, groups=8)
    system = LatentDiffusion(unet, conditioner=Conditioner(vector="clip_image", embedding_tokens=2, embedding_dim=6))
    old = {k.removeprefix("conditioner."): torch.randn_like(v) for k, v in system.state_dict().items()}
    assert "embedding_proj.weight" in old
    system.load_state_dict(old)
    assert torch.equal(system.conditioner.embedding_proj.weight, old["embedding_proj.weight"])


def test_upgrade_leaves_todays_and_other_configs_alone():
    today = {"class_path": "ldm.systems.LatentDiffusion", "init_args": {"conditioner": {"class_path": "x"}}}
    assert upgrade_model_config(today) is today
    other = {"class_path": "ldm.systems.DiffusionPrior", "init_args": {"text_encoder": 1}}
    assert upgrade_model_config(other) is other
    unconditional = {"class_path": "ldm.systems.LatentDiffusion", "init_args": {"vector_cond": None, "inpainting": False}}
    assert "conditioner" not in upgrade_model_config(unconditional)["init_args"]
