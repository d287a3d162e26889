"""Loading a trained stage for a later one: rebuild it from its run's config, load the weights.

Every ``ldm fit`` run folder holds ``config.yaml`` (the fully resolved config) and
``checkpoints/*.ckpt``. :func:`load_system` rebuilds the LightningModule from the
``model`` section of that config (so no class names or sizes are repeated anywhere) and
loads the checkpoint's weights; later stages use it frozen and in eval mode. Checkpoints are
read with ``weights_only=True`` (:func:`ldm.checkpoints.load_checkpoint_file`): a crafted file
cannot run code.

EMA or raw weights: a run trained with an EMA callback (:class:`ldm.callbacks.ema.EMA`,
:class:`ldm.callbacks.EMAWarmup`, Lightning's ``EMAWeightAveraging``) writes the average into ``state_dict``
and the weights the optimizer trained into ``current_model_state``. ``weights="ema"`` (the default) loads
``state_dict``: the average where there is one, the only weights otherwise. ``weights="raw"`` loads
``current_model_state``; a checkpoint without EMA has one set of weights, which both choices load (and the
log says so). Lightning's own callback loses the raw weights in checkpoints written after training ended
(the final ``last.ckpt``): asking for them there is an error, never the average in their place.
"""

from __future__ import annotations

import logging
import os

import pytorch_lightning as L
import torch
import yaml
from torch import nn
from jsonargparse import ArgumentParser

from ldm.checkpoint_files import find_checkpoint, find_config, load_checkpoint_file, run_config  # noqa: F401
from ldm.systems.config_upgrades import upgrade_model_config, upgrade_optimizer_config

log = logging.getLogger(__name__)

#: the weights :func:`load_system` can load from a checkpoint
WEIGHTS = ("ema", "raw")


def run_image_size(path: str | os.PathLike) -> int | None:
    """``data.init_args.image_size`` of a run's config, or None."""
    return ((run_config(path).get("data") or {}).get("init_args") or {}).get("image_size")


def checkpoint_weights(state: dict, weights: str = "ema", *, source: str | os.PathLike = "the checkpoint") -> dict:
    """The model state of a loaded Lightning checkpoint: ``"ema"`` (``state_dict``) or ``"raw"``.

    Raises ``ValueError`` for another choice, and for ``"raw"`` where the checkpoint's raw weights are only
    the average (a checkpoint written after training ended by Lightning's own ``EMAWeightAveraging``, which
    copies the average into the model first; :class:`ldm.callbacks.ema.EMA` keeps them).
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if "current_model_state" not in state:
        log.log(logging.WARNING if weights == "raw" else logging.INFO,
                "%s holds no EMA weights (trained without an EMA callback): weights=%r loads its only weights, "
                "raw and EMA are the same", source, weights)
        return state["state_dict"]
    if weights == "ema":
        return state["state_dict"]
    raw, ema = state["current_model_state"], state["state_dict"]
    if raw.keys() == ema.keys() and all(torch.equal(raw[k], ema[k]) for k in raw):
        raise ValueError(
            f"{source} holds only EMA weights: its raw weights (current_model_state) are the average too, because "
            "it was written after training ended by an EMA callback that does not keep them (Lightning's "
            "EMAWeightAveraging copies the average into the model at the end of training). Load weights='ema' "
            "(--weights ema), or an earlier checkpoint of the run; runs trained with ldm.callbacks.ema.EMA or "
            "ldm.callbacks.EMAWarmup keep the raw weights in every checkpoint")
    return raw


def build_system(model_cfg: dict) -> L.LightningModule:
    """A system from the ``model`` section of a run config (``class_path`` + ``init_args``), freshly initialised:
    checked and built by jsonargparse as ``ldm fit`` does (older configs upgraded first)."""
    model_cfg = upgrade_optimizer_config(upgrade_model_config(model_cfg))
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model")
    return parser.instantiate_classes(parser.parse_object({"model": model_cfg})).model


def load_weights_into(system: nn.Module, path: str | os.PathLike, weights: str = "ema") -> None:
    """Load the weights of a run (folder or .ckpt) into ``system`` (same architecture), e.g. to fine-tune it."""
    ckpt = find_checkpoint(path)
    state = checkpoint_weights(load_checkpoint_file(ckpt, map_location="cpu"), weights, source=ckpt)
    try:
        system.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"init_from {path}: its weights do not fit this model ({str(e)[:600]})") from None


def load_system(path: str | os.PathLike, *, freeze: bool = True, map_location: str | torch.device = "cpu",
                weights: str = "ema") -> L.LightningModule:
    """Rebuild the system of a run folder (or of a checkpoint inside one) with its trained weights.

    ``weights``: ``"ema"`` (the default: the EMA average where the run kept one, else its only weights) or
    ``"raw"`` (the weights the optimizer trained); see :func:`checkpoint_weights`.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    ckpt = find_checkpoint(path)
    config_path = find_config(ckpt)
    model_cfg = yaml.safe_load(config_path.read_text()).get("model")
    if not model_cfg:
        raise ValueError(f"{config_path} has no model section")
    system = build_system(model_cfg)
    state = load_checkpoint_file(ckpt, map_location=map_location)
    system.load_state_dict(checkpoint_weights(state, weights, source=ckpt))
    if freeze:
        system.eval()
        system.requires_grad_(False)
    return system


def load_latent_diffusion(path: str | os.PathLike, **kwargs):
    """The frozen :class:`~ldm.systems.LatentDiffusion` of a latent-diffusion (or unCLIP-decoder) run."""
    from ldm.systems.latent_diffusion import LatentDiffusion

    system = load_system(path, **kwargs)
    if not isinstance(system, LatentDiffusion):
        raise TypeError(f"{path} is a {type(system).__name__} run, not a latent-diffusion run "
                        "(ldm sample needs a checkpoint of ldm.systems.LatentDiffusion)")
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
