"""Data: shard writing, synthetic captioned scenes, the WebDataset DataModule.

``ShardDataModule`` (a LightningDataModule) is imported when first used (PEP 562), so the pure parts
(``ldm.data.shapes``, ``ldm.data.transforms``, which ``ldm.metrics`` uses) do not load Lightning.
"""

from ldm.data.batch import Batch, collate
from ldm.data.urls import ShardPattern, expand_urls

__all__ = ["Batch", "ShardDataModule", "ShardPattern", "collate", "expand_urls"]


def __getattr__(name: str):
    if name == "ShardDataModule":
        from ldm.data.datamodule import ShardDataModule

        return ShardDataModule
    raise AttributeError(f"module 'ldm.data' has no attribute {name!r}")
