import csv
import json

import pytest
import webdataset as wds
from PIL import Image

from ldm.data.folder import folder_to_shards
from ldm.data.urls import expand_urls


def _images(root, n=4, size=(40, 30)):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (10 * i, 100, 200)).save(root / f"img{i}.png")
    return [f"img{i}.png" for i in range(n)]


def _read(out, split="train"):
    return list(wds.tarfile_to_samples()([{"url": u} for u in expand_urls(str(out / f"{split}-*.tar"))]))


def test_sidecar_captions_and_skips_are_counted(tmp_path):
    src = tmp_path / "src"
    names = _images(src / "sub")
    for i, name in enumerate(names[:3]):
        (src / "sub" / name).with_suffix(".txt").write_text(f"caption {i}\n")
    (src / "sub" / "img2.txt").write_text("   ")  # empty caption
    (src / "broken.jpg").write_bytes(b"not a jpeg at all")
    (src / "broken.txt").write_text("a caption for a broken file")
    report = folder_to_shards(src, tmp_path / "out", size=16, shard_size=1, progress=False)
    assert report.written == 2
    assert report.skipped == {"no caption": 1, "empty caption": 1, "unreadable image: UnidentifiedImageError": 1}
    samples = _read(tmp_path / "out")
    assert [s["txt"].decode() for s in samples] == ["caption 0", "caption 1"]
    assert {Image.open(__import__("io").BytesIO(s["jpg"])).size for s in samples} == {(16, 16)}
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["splits"]["train"]["samples"] == 2 and len(stats["splits"]["train"]["shards"]) == 2
    assert stats["skipped"]["no caption"] == 1


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_caption_tables(tmp_path, fmt):
    src = tmp_path / "src"
    names = _images(src, n=3)
    rows = [{"filename": n, "text": f"picture number {i}"} for i, n in enumerate(names)]
    table = tmp_path / f"captions.{fmt}"
    if fmt == "csv":
        with open(table, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["filename", "text"])
            w.writeheader()
            w.writerows(rows)
    elif fmt == "jsonl":
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), table)
    report = folder_to_shards(src, tmp_path / "out", captions=table, image_format="png", progress=False)
    assert report.written == 3
    samples = _read(tmp_path / "out")
    assert sorted(s["txt"].decode() for s in samples) == [f"picture number {i}" for i in range(3)]
    assert Image.open(__import__("io").BytesIO(samples[0]["png"])).size == (40, 30)  # no --size: kept


def test_unknown_caption_column_is_named(tmp_path):
    src = tmp_path / "src"
    _images(src, n=1)
    table = tmp_path / "c.csv"
    table.write_text("image_file,description\nimg0.png,hello\n")
    with pytest.raises(ValueError, match=r"caption.*columns are \['image_file', 'description'\]"):
        folder_to_shards(src, tmp_path / "out", captions=table, progress=False)
    folder_to_shards(src, tmp_path / "out", captions=table, file_column="image_file",
                     caption_column="description", progress=False)


def test_no_usable_image_fails_cleanly(tmp_path):
    src = tmp_path / "src"
    _images(src, n=2)  # no captions at all
    with pytest.raises(ValueError, match="no usable images"):
        folder_to_shards(src, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*"))  # nothing half-written


def _captioned(src, n=2):
    for name in _images(src, n=n):
        (src / name).with_suffix(".txt").write_text(f"a caption of {name}")


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("split", ["../../x", "a/b", "*", "train?", "", ".hidden", "val x"])
def test_split_names_that_are_not_plain_names_are_refused(tmp_path, split, capsys):
    """A split name is a file-name prefix inside --out: no path parts (writing outside --out) and no glob
    characters (``--split '*' --overwrite`` removed every other split)."""
    from ldm.tools.shards import main

    src, out = tmp_path / "deep/er/src", tmp_path / "deep/er/out"
    _captioned(src)
    folder_to_shards(src, out, split="val", shard_size=1, progress=False)
    before = _files(tmp_path)
    assert main(["from-folder", "--images", str(src), "--out", str(out), "--split", split, "--overwrite",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"invalid split name {split!r}" in err and "[A-Za-z0-9_-]+" in err
    assert _files(tmp_path) == before  # nothing written anywhere, the val split untouched
    with pytest.raises(ValueError, match="invalid split name"):
        folder_to_shards(src, out, split=split, overwrite=True, progress=False)


def test_overwriting_a_split_leaves_splits_with_a_longer_name_alone(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _captioned(src)
    folder_to_shards(src, out, split="train-extra", shard_size=1, progress=False)
    folder_to_shards(src, out, split="train", shard_size=1, progress=False)
    folder_to_shards(src, out, split="train", shard_size=2, overwrite=True, progress=False)
    assert _files(out) == ["stats.json", "train-000000.tar", "train-extra-000000.tar", "train-extra-000001.tar"]
    stats = json.loads((out / "stats.json").read_text())["splits"]
    assert stats["train"]["samples"] == 2 and stats["train-extra"]["samples"] == 2
