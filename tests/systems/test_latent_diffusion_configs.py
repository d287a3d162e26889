"""Every config under configs/ldm/ parses, and builds with stage runs the test makes."""

from __future__ import annotations

import open_clip
import pytest
import torch
import yaml

from ldm.cli import LDMCLI, main
from ldm.diffusion import UNet
from ldm.diffusion.unet import count_parameters
from tests.conftest import REPO
from tests.stages import DEBUG, stage_args

CONFIGS = sorted(p.name for p in (REPO / "configs/ldm").glob("*.yaml"))


def _base(config: str) -> list[str]:
    """An overlay (no model class_path of its own, e.g. debug-eps.yaml) composes after the debug preset."""
    model = (yaml.safe_load((REPO / "configs/ldm" / config).read_text()) or {}).get("model") or {}
    return [] if "class_path" in model else ["-c", str(REPO / "configs/ldm/debug.yaml")]


@pytest.mark.parametrize("config", CONFIGS)
def test_every_ldm_config_parses(config, shapes_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", *DEBUG, *_base(config), "-c", str(REPO / "configs/ldm" / config),
              f"--data.train={shapes_dir}/train-*.tar", "--print_config"])
    assert exc.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["class_path"] == "ldm.systems.LatentDiffusion"


@pytest.mark.parametrize("base, overlays, precond, sampler", [
    ("ldm/debug.yaml", [], "ldm.diffusion.FlowPrecond", "ldm.diffusion.LogitNormalSigmas"),  # the recipe study's choice
    ("ldm/debug.yaml", ["ldm/debug-eps.yaml"], "ldm.diffusion.EpsPrecond", "ldm.diffusion.UniformTimesteps"),  # before
    # the unCLIP decoder too (docs/unclip.md: its eps recipe drew noise in make demo's 200 steps)
    ("unclip/debug.yaml", [], "ldm.diffusion.FlowPrecond", "ldm.diffusion.LogitNormalSigmas"),
    ("unclip/debug.yaml", ["ldm/debug-eps.yaml"], "ldm.diffusion.EpsPrecond", "ldm.diffusion.UniformTimesteps")])
def test_the_debug_presets_are_rectified_flows_and_the_eps_overlay_restores_eps(base, overlays, precond, sampler,
                                                                                 shapes_dir, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", *DEBUG, "-c", str(REPO / "configs" / base),
              *[a for o in overlays for a in ("-c", str(REPO / "configs" / o))],
              f"--data.train={shapes_dir}/train-*.tar", "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert model["precond"]["class_path"] == precond
    assert model["loss"]["init_args"]["sigma_sampler"]["class_path"] == sampler


def _build(config: str, shapes_dir, *extra: str):
    return LDMCLI(args=["-c", *DEBUG, "-c", str(REPO / "configs/ldm" / config), f"--data.train={shapes_dir}/train-*.tar",
                        *extra], run=False)


@pytest.mark.parametrize("config", ["debug.yaml", "shapes-kl-f4.yaml"])
def test_shapes_configs_instantiate_on_the_stage_runs(config, shapes_dir, stage_runs):
    system = _build(config, shapes_dir, *stage_args(stage_runs)).model
    assert system.unet.context_dim == system.conditioner.text_encoder.width == 64
    assert system.first_stage.latent_channels == system.unet.in_channels == 4
    callbacks = yaml.safe_load((REPO / "configs/ldm" / config).read_text())["trainer"]["callbacks"]
    assert callbacks[0]["class_path"] in ("ldm.callbacks.EMA", "ldm.callbacks.EMAWarmup")  # both keep the raw weights


def test_pixel_config_instantiates_in_pixel_space(shapes_dir, tmp_path):
    # the config names a CLIP ViT-B/32 run; the same towers, untrained, stand in for it here (a YAML override: on the
    # command line jsonargparse reads a nested "checkpoint=null" as the string "None")
    untrained = tmp_path / "untrained.yaml"
    untrained.write_text("model:\n  init_args:\n    conditioner:\n      init_args:\n        text_encoder:\n"
                         "          init_args: {checkpoint: null, model_name: ViT-B-32}\n")
    system = _build("pixel-64.yaml", shapes_dir, "-c", str(untrained)).model
    assert system.first_stage.downsample_factor == 1 and system.unet.in_channels == 3
    assert system.conditioner.text_encoder.width == system.unet.context_dim == 512
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(system.latents({"image": x}), x)


def test_sd15_config_has_the_sd15_shape():
    """Building the full SD-1.5 system needs a KL-f8 run and ViT-L/14 weights; check its parts' shapes instead."""
    args = yaml.safe_load((REPO / "configs/ldm/sd15-256.yaml").read_text())["model"]["init_args"]
    with torch.device("meta"):
        unet = UNet(**args["unet"]["init_args"])
    assert count_parameters(unet) == 859_520_964
    text = args["conditioner"]["init_args"]["text_encoder"]["init_args"]
    assert open_clip.get_model_config(text["model_name"])["text_cfg"]["width"] == unet.context_dim == 768
