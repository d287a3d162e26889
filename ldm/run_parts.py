"""A trained part of a run (the autoencoder of a stage-1 run, the CLIP of a contrastive run), without Lightning.

A run folder's ``config.yaml`` names the system and its parts (``model.init_args.autoencoder``,
``model.init_args.model``), each a plain ``nn.Module`` config; its checkpoint holds the system's
state dict, where a part's weights sit under ``<part>.``. :func:`load_part` builds the part from its
own config and loads those weights: the frozen-stage wrappers of the pure packages
(:class:`~ldm.autoencoder.AutoencoderFirstStage`, :class:`~ldm.contrastive.FrozenTextEncoder`) use
it, so they need neither Lightning nor :mod:`ldm.systems` (which loads whole systems).
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from jsonargparse import ArgumentParser
from torch import nn

from ldm.checkpoint_files import find_checkpoint, find_config, load_checkpoint_file


def load_part(path: str | os.PathLike, part: str, kind: type[nn.Module] = nn.Module, *,
              map_location: Any = "cpu") -> nn.Module:
    """The frozen ``part`` (an attribute of the system, configured as ``model.init_args.<part>``) of the run
    folder (or checkpoint in one) at ``path``, with its trained weights, in eval mode.

    Raises ``TypeError`` naming the run when it has no such part or the part is not a ``kind``.
    """
    ckpt = find_checkpoint(path)
    config = yaml.safe_load(find_config(ckpt).read_text()) or {}
    model = config.get("model") or {}
    spec = (model.get("init_args") or {}).get(part) if isinstance(model, dict) else None
    system = model.get("class_path", "?") if isinstance(model, dict) else "?"
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise TypeError(f"{path} is a {system.rsplit('.', 1)[-1]} run without a {part!r} part")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(kind, "part")
    try:
        module = parser.instantiate_classes(parser.parse_object({"part": spec})).part
    except Exception as e:  # a part of another kind: jsonargparse says why
        raise TypeError(f"{path}: its {part!r} part is not a {kind.__name__} ({e})") from None
    prefix = f"{part}."
    state = load_checkpoint_file(ckpt, map_location=map_location)["state_dict"]
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    module.load_state_dict(weights)
    module.eval().requires_grad_(False)
    return module
