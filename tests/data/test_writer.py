import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ldm.data.shapes import render, sample_scene
from ldm.data.synthetic import write_synthetic_shards
from ldm.data.urls import expand_urls
from ldm.data.writer import StagedShardDir, brace_pattern


def _read_all(pattern):
    return list(wds.tarfile_to_samples()([{"url": u} for u in expand_urls(pattern)]))


def test_write_then_read_round_trip(tmp_path):
    stats = write_synthetic_shards(tmp_path, train=23, val=7, size=48, seed=5, shard_size=10, progress=False)
    train = stats["splits"]["train"]
    assert train["samples"] == 23
    assert train["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert train["shard_counts"] == {"train-000000.tar": 10, "train-000001.tar": 10, "train-000002.tar": 3}
    assert train["pattern"].endswith("train-{000000..000002}.tar")
    assert json.loads((tmp_path / "stats.json").read_text()) == stats

    samples = _read_all(train["pattern"])
    assert [s["__key__"] for s in samples] == [f"train_{i:08d}" for i in range(23)]
    for i, s in enumerate(samples):
        scene = sample_scene(5, i, 48, split="train")
        image = np.asarray(Image.open(io.BytesIO(s["png"])))
        assert np.array_equal(image, np.asarray(render(scene)))  # PNG is lossless
        assert s["txt"].decode() == scene.caption
        assert json.loads(s["json"]) == json.loads(json.dumps(scene.to_json()))
    assert len(_read_all(stats["splits"]["val"]["pattern"])) == 7


def test_existing_shards_need_overwrite_and_stale_shards_are_removed(tmp_path):
    write_synthetic_shards(tmp_path, train=30, val=5, size=32, shard_size=10, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_synthetic_shards(tmp_path, train=5, val=5, size=32, shard_size=10, progress=False)
    write_synthetic_shards(tmp_path, train=5, val=5, size=32, shard_size=10, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == ["train-000000.tar"]


def test_failure_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with StagedShardDir(out) as staged:
            w = staged.split("train", shard_size=2)
            for i in range(5):
                w.write({"__key__": f"k{i}", "txt": "x"})
            raise RuntimeError("boom")
    assert list(out.iterdir()) == []


def test_brace_pattern():
    assert brace_pattern(["a-000000.tar"]) == "a-000000.tar"
    assert brace_pattern(["a-b-000003.tar", "a-b-000004.tar", "a-b-000010.tar"]) == "a-b-{000003..000010}.tar"
