"""Pure-torch building blocks shared by every model (no Lightning here)."""

from ldm.nn.attention import SpatialSelfAttention
from ldm.nn.blocks import Downsample, ResBlock, Upsample, group_norm

__all__ = ["Downsample", "ResBlock", "SpatialSelfAttention", "Upsample", "group_norm"]
