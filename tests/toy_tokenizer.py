"""The toy system's tokenizer, in a module of its own: loader workers unpickle it, and the fork server they start
from imports the modules their dataset names (``ldm.data.workers.start_forkserver``); this one needs torch only,
not Lightning."""

from __future__ import annotations

import torch


class CharTokenizer:
    """Bytes of the caption, padded / cut to ``length`` (0 = padding)."""

    def __init__(self, length: int = 32):
        self.length = length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.length, dtype=torch.long)
        for i, t in enumerate(texts):
            codes = list(t.encode("utf-8"))[: self.length]
            out[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
        return out
