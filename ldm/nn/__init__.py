"""Pure-torch building blocks shared by every model (no Lightning here)."""

from ldm.nn.attention import SpatialSelfAttention
from ldm.nn.blocks import Downsample, ResBlock, Upsample, group_norm
from ldm.nn.embeddings import TimestepEmbedding, timestep_embedding
from ldm.nn.transformer import (
    Attention,
    FeedForward,
    SpatialTransformer,
    TransformerBlock,
)

__all__ = [
    "Attention", "Downsample", "FeedForward", "ResBlock", "SpatialSelfAttention", "SpatialTransformer",
    "TimestepEmbedding", "TransformerBlock", "Upsample", "group_norm", "timestep_embedding",
]
