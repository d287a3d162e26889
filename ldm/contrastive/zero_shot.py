"""Zero-shot classification tasks given as data: class names x prompt templates + where the label is.

For the shapes data, the colour or the shape of single-object scenes:
``ZeroShotTask("colour", classes=[...], templates=["a {} shape"], label="objects.0.color", single="objects")``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ZeroShotTask:
    """Args:
        name: metric name (``val/zero_shot/<name>``).
        classes: class names, inserted into each template.
        templates: prompt templates with one ``{}``.
        label: dotted path of the class name in a sample's ``meta`` (list indices allowed).
        single: when set, only samples whose ``meta[single]`` has exactly one element count.
    """

    name: str
    classes: list[str]
    templates: list[str] = field(default_factory=lambda: ["{}"])
    label: str = "label"
    single: str | None = None

    def prompts(self) -> list[str]:
        return [t.format(c) for c in self.classes for t in self.templates]

    def label_of(self, meta: dict[str, Any]) -> int:
        """Class index of a sample, or -1 when it has no (unambiguous) label."""
        if self.single is not None and len(meta.get(self.single, ())) != 1:
            return -1
        value: Any = meta
        for part in self.label.split("."):
            try:
                value = value[int(part)] if isinstance(value, list) else value[part]
            except (KeyError, IndexError, ValueError, TypeError):
                return -1
        return self.classes.index(value) if value in self.classes else -1
