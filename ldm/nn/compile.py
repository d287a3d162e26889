"""Regional compilation: ``torch.compile`` each repeated block of a network in place, not the whole network.

Compiling the whole SD-1.5-shape U-Net takes minutes and recompiles the whole graph for every change of shape or
mode; compiling each block (the U-Net's ``UNetBlock``, DiT's ``DiTBlock``, open_clip's ``ResidualAttentionBlock``,
...) with ``module.compile()`` keeps each graph small, reuses one compiled graph for blocks of the same shape
(DiT's 28 blocks compile once) and leaves the glue between blocks (embeddings, skip connections, the loss) eager,
where it costs little. diffusers' ``compile_repeated_blocks`` and the PyTorch tutorial "Reducing torch.compile
cold start compilation time with regional compilation" do the same.

``module.compile()`` compiles the module's ``__call__`` in place: parameter names, state dicts, hooks and
``torch.utils.checkpoint`` around the block are unchanged (no ``_orig_mod.`` prefix), so checkpoints of a compiled
run load into an eager model and back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

#: the repeated blocks of this project's networks and of open_clip's towers, by class name (so this module needs
#: no import of them): the U-Net's level blocks, DiT / MMDiT blocks, transformer blocks, the autoencoder's
#: ResBlocks and attention, open_clip's ViT / text blocks, and the small GAN / LPIPS networks of the autoencoder
#: loss (compiled whole)
DEFAULT_BLOCKS: tuple[str, ...] = ("UNetBlock", "DiTBlock", "JointBlock", "TransformerBlock", "ResBlock",
                                   "SpatialSelfAttention", "ResidualAttentionBlock", "PatchDiscriminator", "LPIPS")


def find_blocks(module: nn.Module, names: Iterable[str] = DEFAULT_BLOCKS) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the outermost submodules whose class name is in ``names``: a block inside a
    matched block (a ``TransformerBlock`` inside a ``UNetBlock``) is compiled as part of it, not again."""
    wanted = set(names)
    found: list[tuple[str, nn.Module]] = []
    for name, sub in module.named_modules():
        if type(sub).__name__ in wanted and not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, sub))
    return found


def compile_blocks(module: nn.Module, names: Iterable[str] = DEFAULT_BLOCKS, **compile_kwargs: Any) -> list[str]:
    """Compile, in place, every outermost block of ``module`` whose class name is in ``names`` (``compile_kwargs``
    go to ``torch.compile``: ``backend``, ``mode``, ``dynamic``, ...); returns the qualified names compiled.

    Blocks of one class share one code object, whose Dynamo cache holds one entry per block shape (the U-Net's
    levels differ): the recompile limit (8 by default) is raised to fit them, or the blocks past it would silently
    run eager.
    """
    blocks = find_blocks(module, names)
    config = torch._dynamo.config
    need = 4 * len(blocks)  # a shape per block, in training and in evaluation, for two batch sizes at most
    config.recompile_limit = max(config.recompile_limit, need)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 2 * need)
    for _, block in blocks:
        block.compile(**compile_kwargs)
    return [name for name, _ in blocks]


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module.compile()`` was called on this module."""
    return getattr(module, "_compiled_call_impl", None) is not None
