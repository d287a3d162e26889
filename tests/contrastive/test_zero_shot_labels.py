"""ZeroShotTask labels: class names or class indices; anything else fails clearly (issue 15, defect 5)."""

import pytest
import torch

from ldm.contrastive import ZeroShotTask
from ldm.metrics import zero_shot_accuracy

TASK = ZeroShotTask("digit", classes=["zero", "one", "two"], label="label")


def test_integer_labels_are_class_indices():
    assert [TASK.label_of({"label": i}) for i in (0, 1, 2)] == [0, 1, 2]


def test_integer_label_column_gives_a_finite_accuracy():
    labels = torch.tensor([TASK.label_of({"label": i % 3}) for i in range(6)])  # was -1 for every row: NaN
    assert zero_shot_accuracy(torch.eye(3)[labels], torch.eye(3), labels) == 1.0


def test_class_names_and_unlabelled_samples():
    assert [TASK.label_of({"label": c}) for c in ("two", "zero")] == [2, 0]
    assert TASK.label_of({}) == TASK.label_of({"label": None}) == -1  # no label: not counted
    colour = ZeroShotTask("colour", classes=["red", "blue"], label="objects.0.color", single="objects")
    assert colour.label_of({"objects": [{"color": "blue"}]}) == 1
    assert colour.label_of({"objects": [{"color": "blue"}, {"color": "red"}]}) == -1  # not a single object


@pytest.mark.parametrize("value, problem", [
    (3, "out of range"), (-1, "out of range"), ("three", "not one of its 3 classes"), ("One", "not one of"),
    (1.0, "is a float"), (True, "is a bool"), (["one"], "is a list"),
])
def test_other_labels_fail_naming_the_task_the_column_and_the_value(value, problem):
    with pytest.raises(ValueError) as e:
        TASK.label_of({"label": value})
    message = str(e.value)
    assert "'digit'" in message and "'label'" in message and repr(value) in message and problem in message, message
