"""Data: shard writing, synthetic captioned scenes, the WebDataset DataModule."""

from ldm.data.batch import Batch, collate
from ldm.data.datamodule import ShardDataModule
from ldm.data.urls import ShardPattern, expand_urls

__all__ = ["Batch", "ShardDataModule", "ShardPattern", "collate", "expand_urls"]
