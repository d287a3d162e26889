"""Random streams seeded per training step, so a resumed run draws what the uninterrupted one drew.

Lightning checkpoints hold no RNG state, and even a saved state would not do: validation, sample
logging or a different number of DataLoader iterations consume random numbers between steps, and
under DDP only rank 0's state would be saved. Instead, every training batch starts by seeding
Python's ``random``, NumPy and torch (CPU and all CUDA devices) from (run seed, epoch, batch index,
rank), as JAX's ``fold_in(key, step)`` does: the draws of a step (noise levels, noise, condition
dropout, dropout masks) depend only on where the step is, not on what ran before it. The run seed is
stored in the checkpoint, so a resumed run keeps it even if started with another ``seed_everything``.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
from typing import Any

import numpy as np
import pytorch_lightning as L
import torch
from pytorch_lightning.callbacks import Callback

log = logging.getLogger(__name__)


def step_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """A 63-bit seed mixing the four numbers (NumPy's SeedSequence: nearby inputs give unrelated seeds)."""
    state = np.random.SeedSequence([seed % 2**63, epoch, batch_idx, rank]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class StepSeed(Callback):
    """Seeds every RNG at the start of each training batch; on by default in ``ldm fit``.

    Args:
        seed: the run seed (default: ``seed_everything``'s, from ``PL_GLOBAL_SEED``; else a random one,
            logged and kept in the checkpoint).
    """

    def __init__(self, seed: int | None = None):
        self.seed = seed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.seed is None:
            env = os.environ.get("PL_GLOBAL_SEED")
            self.seed = int(env) if env else secrets.randbits(31)
            if not env:
                log.info("no seed_everything: training steps are seeded from %d", self.seed)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        seed = step_seed(int(self.seed or 0), trainer.current_epoch, batch_idx, trainer.global_rank)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # seeds every CUDA device as well

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])
