"""The compositional checker on the renderer's own images and on perturbed ones."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from ldm.data.shapes import COLORS, SHAPES, Scene, render, sample_scene
from ldm.metrics.compositional import CompositionalAccuracy, CompositionalChecker

CHECKER = CompositionalChecker()


def _scenes(n: int, size: int = 64, objects: int | None = None):
    out, i = [], 0
    while len(out) < n:
        scene = sample_scene(5, i, size, "val")
        i += 1
        if objects is None or len(scene.objects) == objects:
            out.append(scene)
    return out


def _image(scene: Scene) -> np.ndarray:
    return np.asarray(render(scene))


def test_ground_truth_renders_are_judged_correct():
    metric = CompositionalAccuracy()
    scenes = _scenes(300)
    images = torch.stack([torch.from_numpy(_image(s)).permute(2, 0, 1).float() / 127.5 - 1 for s in scenes])
    metric.update(images, [s.to_json() for s in scenes])
    rates = {k: float(v) for k, v in metric.compute().items()}
    assert rates["all_correct"] >= 0.99, rates  # measured 1.0 at 64 and 128 px
    assert min(rates.values()) >= 0.99
    assert int(metric.relations) > 100 and int(metric.images) == 300


@pytest.mark.parametrize("size", [64, 128])
def test_a_wrong_colour_is_rejected(size):
    for scene in _scenes(60, size):
        meta = scene.to_json()
        obj = scene.objects[0]
        new = next(c for c in COLORS if c != obj.color and all(c != o.color for o in scene.objects))
        recoloured = replace(scene, objects=[replace(obj, color=new, rgb=COLORS[new]), *scene.objects[1:]])
        verdict = CHECKER.check(_image(recoloured), meta)
        assert not verdict.color[0] and not verdict.all_correct, (meta["caption"], verdict.summary())


def test_a_wrong_shape_is_rejected():
    for scene in _scenes(60):
        obj = scene.objects[-1]
        new = next(s for s in SHAPES if s != obj.shape and {obj.shape, s} != {"triangle", "diamond"})
        changed = replace(scene, objects=[*scene.objects[:-1], replace(obj, shape=new)])
        verdict = CHECKER.check(_image(changed), scene.to_json())
        assert not verdict.shape[-1] and not verdict.all_correct, (scene.caption, new, verdict.summary())


def test_swapped_positions_break_the_relation():
    for scene in _scenes(60, objects=2):
        a, b = scene.objects
        if (a.color, a.shape) == (b.color, b.shape):
            continue  # swapping their boxes swaps their sizes too: the same picture
        swapped = replace(scene, objects=[replace(a, bbox=b.bbox), replace(b, bbox=a.bbox)])
        verdict = CHECKER.check(_image(swapped), scene.to_json())
        assert verdict.count and all(verdict.binding)  # the objects are all there ...
        assert verdict.relation == [False] and not verdict.all_correct  # ... in the wrong places


def test_missing_and_extra_objects_break_the_count():
    scene = _scenes(1, objects=2)[0]
    meta = scene.to_json()
    missing = CHECKER.check(_image(replace(scene, objects=scene.objects[:1])), meta)
    assert not missing.count and not missing.all_correct
    blank = CHECKER.check(np.full((64, 64, 3), 240, dtype=np.uint8), meta)
    assert not blank.count and blank.color == [False, False] and blank.relation == [False]
    single = _scenes(1, objects=1)[0]
    extra = replace(single, objects=[*single.objects, *scene.objects])
    assert not CHECKER.check(_image(extra), single.to_json()).count


def test_attribute_binding_is_checked_per_object():
    """ "a red X left of a blue Y" drawn as a blue X left of a red Y: colours and shapes all occur, bound wrongly."""
    scene = next(s for s in _scenes(200, objects=2) if s.objects[0].shape != s.objects[1].shape
                 and s.objects[0].color != s.objects[1].color)
    a, b = scene.objects
    rebound = replace(scene, objects=[replace(a, color=b.color, rgb=b.rgb), replace(b, color=a.color, rgb=a.rgb)])
    verdict = CHECKER.check(_image(rebound), scene.to_json())
    assert verdict.count and not all(verdict.binding) and not verdict.all_correct


def test_the_binding_prompt_set_is_judged_correct_on_its_renders():
    from ldm.pipelines.evaluate import binding_eval_set

    evalset = binding_eval_set(60, 64, seed=3)
    assert len(evalset) == 60 and evalset.images.shape == (60, 3, 64, 64)
    assert all(m["objects"][0]["shape"] == m["objects"][1]["shape"] for m in evalset.metas)
    assert all(m["objects"][0]["color"] != m["objects"][1]["color"] for m in evalset.metas)
    assert any(" on top of " in c for c in evalset.captions) and not any(" a orange" in c for c in evalset.captions)
    metric = CompositionalAccuracy()
    metric.update(evalset.images, evalset.metas)
    assert float(metric.compute()["all_correct"]) == 1.0


def test_two_alike_objects_in_the_stated_relation_are_judged_correct_in_any_process():
    """'a red circle left of a red circle' matches either detected circle to either description: the checker must
    find the way round in which the relation holds, and decide the same in every process (it iterated a set of
    tuples holding None, whose order changes with the process, so one checkpoint's relation rate moved between two
    ldm eval calls: 0.216 and 0.311)."""
    scenes = _scenes(40, objects=2)
    for scene in scenes:
        a, b = scene.objects
        alike = replace(scene, objects=[a, replace(b, shape=a.shape, color=a.color, rgb=a.rgb, size=a.size)])
        verdict = CHECKER.check(_image(alike), alike.to_json())
        assert verdict.count and verdict.relation == [True], (scene.caption, verdict.summary())


def test_a_relation_between_objects_the_checker_cannot_identify_is_not_credited():
    """'a red circle left of a blue square' drawn as a green star and a yellow cross: no assignment of the drawn objects
    to the described ones agrees on colour or shape, so the checker cannot tell which is the circle; it must not
    credit the relation by picking the way round in which it holds (it did: relation 1.0 on such images, whatever
    the positions, which lifted a model's relation rate to 0.54 at colour 0.45 / shape 0.17)."""
    checked = 0
    for scene in _scenes(80, objects=2):
        a, b = scene.objects
        if a.size != b.size:
            continue  # sizes would tell them apart
        colors = [c for c in COLORS if c not in (a.color, b.color)]
        shapes = [s for s in SHAPES if s not in (a.shape, b.shape)]
        other = replace(scene, objects=[replace(a, color=colors[0], rgb=COLORS[colors[0]], shape=shapes[0]),
                                        replace(b, color=colors[1], rgb=COLORS[colors[1]], shape=shapes[1])])
        verdict = CHECKER.check(_image(other), scene.to_json())
        assert verdict.count and verdict.relation == [False], (scene.caption, verdict.summary())
        checked += 1
    assert checked >= 10


def test_two_objects_alike_but_for_their_size_are_told_apart_by_it():
    """'a small red circle left of a large red circle': colour and shape cannot tell the two apart, their sizes can."""
    checked = 0
    for scene in _scenes(80, objects=2):
        a, b = scene.objects
        if a.size == b.size:
            continue
        alike = replace(scene, objects=[a, replace(b, shape=a.shape, color=a.color, rgb=a.rgb)])
        verdict = CHECKER.check(_image(alike), alike.to_json())
        assert verdict.count and verdict.relation == [True], (alike.caption, verdict.summary())
        # each drawn at the other's centre, at its own size: the relation no longer holds
        moved = [replace(o, bbox=_centred(o.bbox, p.bbox)) for o, p in zip(alike.objects, alike.objects[::-1])]
        if any(min(o.bbox) < 0 or max(o.bbox) > scene.image_size for o in moved) or _overlap(*moved):
            continue
        assert CHECKER.check(_image(replace(alike, objects=moved)), alike.to_json()).relation == [False], alike.caption
        checked += 1
    assert checked >= 10


def _centred(box, at):
    """``box`` moved so that its centre is ``at``'s (sides kept)."""
    side, (cx, cy) = box[2] - box[0], ((at[0] + at[2]) // 2, (at[1] + at[3]) // 2)
    return (cx - side // 2, cy - side // 2, cx - side // 2 + side, cy - side // 2 + side)


def _overlap(a, b) -> bool:
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.bbox, b.bbox
    return ax0 < bx1 + 2 and bx0 < ax1 + 2 and ay0 < by1 + 2 and by0 < ay1 + 2
