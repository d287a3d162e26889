"""Metrics usable by every stage: retrieval recall@k, zero-shot accuracy, CLIP score."""

from ldm.metrics.clip_score import CLIPScore
from ldm.metrics.retrieval import class_embeddings, recall_at_k, zero_shot_accuracy

__all__ = ["CLIPScore", "class_embeddings", "recall_at_k", "zero_shot_accuracy"]
