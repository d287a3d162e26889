"""Loading a trained stage for a later one: rebuild it from its run's config, load the weights.

Every ``ldm fit`` run folder holds ``config.yaml`` (the fully resolved config) and
``checkpoints/*.ckpt``. :func:`load_system` rebuilds the LightningModule from the
``model`` section of that config (so no class names or sizes are repeated anywhere) and
loads the checkpoint's weights; later stages use it frozen and in eval mode. Checkpoints are
read with ``weights_only=True`` (:func:`ldm.checkpoints.load_checkpoint_file`): a crafted file
cannot run code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytorch_lightning as L
import torch
import yaml
from jsonargparse import ArgumentParser

from ldm.checkpoint_files import find_checkpoint, find_config, load_checkpoint_file, run_config  # noqa: F401

log = logging.getLogger(__name__)


def run_image_size(path: str | os.PathLike) -> int | None:
    """``data.init_args.image_size`` of a run's config, or None."""
    return ((run_config(path).get("data") or {}).get("init_args") or {}).get("image_size")


def load_system(path: str | os.PathLike, *, freeze: bool = True, map_location: str | torch.device = "cpu") -> L.LightningModule:
    """Rebuild the system of a run folder (or of a checkpoint inside one) with its trained weights."""
    ckpt = find_checkpoint(path)
    config_path = find_config(ckpt)
    model_cfg = yaml.safe_load(config_path.read_text()).get("model")
    if not model_cfg:
        raise ValueError(f"{config_path} has no model section")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model")
    parsed = parser.parse_object({"model": model_cfg})
    system = parser.instantiate_classes(parsed).model
    state = load_checkpoint_file(ckpt, map_location=map_location)
    system.load_state_dict(state["state_dict"])
    if freeze:
        system.eval()
        system.requires_grad_(False)
    return system


def load_autoencoder(path: str | os.PathLike, **kwargs):
    """The frozen :class:`~ldm.autoencoder.Autoencoder` (with its scale factor) of an autoencoder run."""
    system = load_system(path, **kwargs)
    if not hasattr(system, "autoencoder"):
        raise TypeError(f"{path} is a {type(system).__name__} run, not an autoencoder run")
    return system.autoencoder


def load_clip(path: str | os.PathLike, **kwargs):
    """The frozen :class:`~ldm.contrastive.OpenCLIP` of a contrastive (CLIP / SigLIP) run."""
    from ldm.contrastive.model import OpenCLIP

    system = load_system(path, **kwargs)
    if not isinstance(getattr(system, "model", None), OpenCLIP):
        raise TypeError(f"{path} is a {type(system).__name__} run, not a contrastive (CLIP / SigLIP) run")
    return system.model


def load_prior(path: str | os.PathLike, **kwargs):
    """The frozen :class:`~ldm.systems.DiffusionPrior` of a diffusion-prior run."""
    from ldm.systems.prior import DiffusionPrior

    system = load_system(path, **kwargs)
    if not isinstance(system, DiffusionPrior):
        raise TypeError(f"{path} is a {type(system).__name__} run, not a diffusion-prior run")
    return system
