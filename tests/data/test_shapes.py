import numpy as np
import pytest

from ldm.data import shapes
from ldm.data.shapes import COLORS, SHAPES, SIZES, relation_holds, render, sample_scene


def test_scene_is_deterministic_in_seed_split_index():
    a, b = sample_scene(7, 11, 64), sample_scene(7, 11, 64)
    assert a.to_json() == b.to_json()
    assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
    assert sample_scene(7, 11, 64, split="val").to_json() != a.to_json()
    assert sample_scene(8, 11, 64).to_json() != a.to_json()


def test_vocabulary_is_large_enough_and_used():
    scenes = [sample_scene(0, i, 64) for i in range(600)]
    objs = [o for s in scenes for o in s.objects]
    assert len(SHAPES) >= 5 and len(COLORS) >= 8 and len(SIZES) == 2
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.color for o in objs} == set(COLORS)
    assert {o.size for o in objs} == set(SIZES)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert len({s.meta["template"] for s in scenes}) >= 10  # varied phrasing


@pytest.mark.parametrize("size", [32, 64, 256])
def test_metadata_matches_pixels_and_relations_hold(size):
    for i in range(40):
        scene = sample_scene(1, i, size)
        image = np.asarray(render(scene)).astype(int)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            # the centre pixel of every shape (the triangle's lower centre) has the object's exact colour
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2 + (obj.bbox[3] - obj.bbox[1]) // 6 * (obj.shape == "triangle")
            assert np.abs(image[cy, cx] - np.array(COLORS[obj.color])).max() <= 2, (scene.caption, obj)
            # nothing is drawn outside the union of the boxes
        mask = np.ones((size, size), bool)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            mask[y0:y1, x0:x1] = False
        assert (np.abs(image[mask] - np.array(shapes.BACKGROUND)).max(initial=0)) == 0
        for rel in scene.relations:
            assert relation_holds(scene.objects[rel.subject], rel.relation, scene.objects[rel.object])
        # boxes never overlap
        for a in range(len(scene.objects)):
            for b in range(a + 1, len(scene.objects)):
                ax0, ay0, ax1, ay1 = scene.objects[a].bbox
                bx0, by0, bx1, by1 = scene.objects[b].bbox
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0


def test_captions_name_every_object_and_the_relation():
    phrases = {"left_of": "left", "right_of": "right", "above": ("above", "on top of", "top to bottom"),
               "below": ("below", "under", "beneath")}
    for i in range(200):
        scene = sample_scene(2, i, 64)
        for obj in scene.objects:
            assert f"{obj.size} {obj.color} {obj.shape}" in scene.caption
        for rel in scene.relations:
            words = phrases[rel.relation]
            assert any(w in scene.caption for w in ((words,) if isinstance(words, str) else words)), scene.caption
        descs = [(o.shape, o.color, o.size) for o in scene.objects]
        assert len(set(descs)) == len(descs)


def test_two_object_caption_order_matches_geometry():
    scene = next(s for i in range(100) if len((s := sample_scene(4, i, 64)).objects) == 2)
    rel = scene.relations[0]
    first = scene.caption.find(scene.objects[0].phrase)
    second = scene.caption.find(scene.objects[1].phrase)
    assert rel.subject == 0 and first < second


@pytest.mark.parametrize("size", [16, 31, 257])
def test_out_of_range_size_is_rejected(size):
    with pytest.raises(ValueError, match="between 32 and 256"):
        sample_scene(0, 0, size)
