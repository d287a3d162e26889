"""Old run folders keep loading: the ``model`` section of a run's ``config.yaml`` written by an earlier version is
rewritten to today's keys before the system is rebuilt (:func:`ldm.systems.load_system`).

* Issue 15 moved the conditioning options of ``LatentDiffusion`` (``text_encoder``, ``vector_cond``, ``text_context``,
  ``embedding_tokens``, ``embedding_dim``, ``inpainting``) into its injected ``conditioner``
  (:class:`ldm.diffusion.Conditioner`; ``vector_cond`` is its ``vector``). The weights follow by a load hook of
  the system (``embedding_proj.*`` -> ``conditioner.embedding_proj.*``).
"""

from __future__ import annotations

import copy
import logging

log = logging.getLogger(__name__)

#: LatentDiffusion's init args that moved into the conditioner (old name -> the conditioner's)
CONDITIONER_KEYS = {"text_encoder": "text_encoder", "vector_cond": "vector", "text_context": "text_context",
                    "embedding_tokens": "embedding_tokens", "embedding_dim": "embedding_dim",
                    "inpainting": "inpainting"}


def upgrade_model_config(model: dict) -> dict:
    """A run's ``model`` section with keys of earlier versions moved to where they are now (a copy)."""
    if not isinstance(model, dict) or not str(model.get("class_path", "")).endswith("LatentDiffusion"):
        return model
    args = model.get("init_args") or {}
    moved = {new: args[old] for old, new in CONDITIONER_KEYS.items() if old in args}
    if not moved or "conditioner" in args:
        return model
    model = copy.deepcopy(model)
    args = model["init_args"]
    for old in CONDITIONER_KEYS:
        args.pop(old, None)
    if any(v not in (None, False, 0) for k, v in moved.items() if k != "text_context") or moved.get("text_context") is False:
        args["conditioner"] = {"class_path": "ldm.diffusion.Conditioner",
                               "init_args": {k: v for k, v in moved.items() if v is not None}}
    log.info("upgraded a run config from before the conditioner: %s moved into model.init_args.conditioner",
             ", ".join(sorted(moved)))
    return model


#: default optimizers of earlier versions, named by import path in the configs they resolved
OLD_OPTIMIZERS = {
    "ldm.systems.autoencoder._adam": "ldm.systems.autoencoder.ldm_adam",
    "ldm.systems.prior._adamw": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1.1e-4, "weight_decay": 6e-2}},
    "ldm.systems.latent_diffusion._adamw": {"class_path": "torch.optim.AdamW",
                                            "init_args": {"lr": 1e-4, "weight_decay": 0.0}},
}


def upgrade_optimizer_config(model: dict) -> dict:
    """A run's ``model`` section from before this convention (a copy), rewritten to it: ``warmup_steps`` becomes a
    :class:`LinearWarmup` ``lr_scheduler``; the contrastive system's ``lr``, ``weight_decay``, ``betas``, ``eps``
    and ``warmup_steps`` its AdamW ``optimizer`` and :class:`WarmupCosine` schedule; renamed default optimizers
    their new names. Anything else is returned as it is."""
    args = model.get("init_args") if isinstance(model, dict) else None
    if not isinstance(args, dict) or "lr_scheduler" in args:
        return model
    contrastive = str(model.get("class_path", "")).endswith("ContrastiveSystem")
    old = {"warmup_steps"} | ({"lr", "weight_decay", "betas", "eps"} if contrastive else set())
    if not old & set(args) and not any(isinstance(v, str) and v in OLD_OPTIMIZERS for v in args.values()):
        return model
    model = copy.deepcopy(model)
    args = model["init_args"]
    for key, value in args.items():
        if isinstance(value, str) and value in OLD_OPTIMIZERS:
            args[key] = copy.deepcopy(OLD_OPTIMIZERS[value])
    if contrastive:
        hp = {k: args.pop(k, d) for k, d in (("lr", 5e-4), ("weight_decay", 0.2), ("betas", [0.9, 0.98]),
                                              ("eps", 1e-6), ("warmup_steps", 100))}
        args["optimizer"] = {"class_path": "torch.optim.AdamW",
                             "init_args": {"lr": hp["lr"], "weight_decay": hp["weight_decay"],
                                           "betas": list(hp["betas"]), "eps": hp["eps"]}}
        args["lr_scheduler"] = {"class_path": "ldm.systems.optim.WarmupCosine",
                                "init_args": {"warmup_steps": hp["warmup_steps"]}}
    elif "warmup_steps" in args:
        args["lr_scheduler"] = {"class_path": "ldm.systems.optim.LinearWarmup",
                                "init_args": {"warmup_steps": args.pop("warmup_steps")}}
    return model
