"""Zero-shot classification tasks given as data: class names x prompt templates + where the label is.

For the shapes data, the colour or the shape of single-object scenes:
``ZeroShotTask("colour", classes=[...], templates=["a {} shape"], label="objects.0.color", single="objects")``.
The label may be a class name or a class index; any other value fails with a ValueError naming the
task, the label path and the value (a silently unlabelled validation split would log a NaN accuracy).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class ZeroShotTask:
    """Args:
        name: metric name (``val/zero_shot/<name>``).
        classes: class names, inserted into each template.
        templates: prompt templates with one ``{}``.
        label: dotted path of a sample's label in its ``meta`` (list indices allowed): a class name
            (a string among ``classes``) or a class index (an integer in ``[0, len(classes))``).
        single: when set, only samples whose ``meta[single]`` has exactly one element count.
    """

    name: str
    classes: list[str]
    templates: list[str] = field(default_factory=lambda: ["{}"])
    label: str = "label"
    single: str | None = None

    def prompts(self) -> list[str]:
        return [t.format(c) for c in self.classes for t in self.templates]

    def classifier(self, model) -> Tensor:
        """(C, D) normalised class embeddings of ``model`` (an :class:`~ldm.contrastive.OpenCLIP`): the prompt
        ensemble of ``open_clip.build_zero_shot_classifier`` (:func:`ldm.metrics.retrieval.class_embeddings`)."""
        from ldm.metrics.retrieval import class_embeddings

        return class_embeddings(model, self.classes, self.templates)

    def label_of(self, meta: dict[str, Any]) -> int:
        """Class index of a sample, or -1 when it has no label: nothing (or null) at ``label``, or
        ``single`` set and ``meta[single]`` not of exactly one element.

        Raises:
            ValueError: the label is a name not among ``classes``, an index out of range, or neither
                a string nor an integer (a float, a bool, a list, ...).
        """
        if self.single is not None and len(meta.get(self.single, ())) != 1:
            return -1
        value: Any = meta
        for part in self.label.split("."):
            try:
                value = value[int(part)] if isinstance(value, list) else value[part]
            except (KeyError, IndexError, ValueError, TypeError):
                return -1
        return -1 if value is None else self.class_index(value)

    def class_index(self, value: Any) -> int:
        """Index of a label value: a class name or a class index; ValueError on anything else."""
        if isinstance(value, str):
            if value in self.classes:
                return self.classes.index(value)
            shown = ", ".join(map(repr, self.classes[:10])) + (", ..." if len(self.classes) > 10 else "")
            problem = f"is not one of its {len(self.classes)} classes ({shown})"
        elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
            if 0 <= value < len(self.classes):
                return int(value)
            problem = f"is out of range for its {len(self.classes)} classes (indices 0 to {len(self.classes) - 1})"
        else:
            problem = f"is a {type(value).__name__}, neither a class name (str) nor a class index (int)"
        raise ValueError(f"zero-shot task {self.name!r}: label {self.label!r} = {value!r} {problem}")
