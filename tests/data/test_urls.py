import pytest

from ldm.data.urls import (
    ShardPattern,
    count_tar_samples,
    expand_urls,
    shard_sample_counts,
)


def test_brace_glob_and_list_expansion(tmp_path):
    for name in ["a-000.tar", "a-001.tar", "a-002.tar", "b-x.tar"]:
        (tmp_path / name).write_bytes(b"")
    assert expand_urls(f"{tmp_path}/a-{{000..002}}.tar") == [str(tmp_path / f"a-00{i}.tar") for i in range(3)]
    assert expand_urls(f"{tmp_path}/a-{{000,002}}.tar") == [str(tmp_path / "a-000.tar"), str(tmp_path / "a-002.tar")]
    assert expand_urls(f"{tmp_path}/a-*.tar::{tmp_path}/b-x.tar") == [
        *(str(tmp_path / f"a-00{i}.tar") for i in range(3)), str(tmp_path / "b-x.tar")]
    assert expand_urls("pipe:curl -s http://host/a-{0..1}.tar") == [
        "pipe:curl -s http://host/a-0.tar", "pipe:curl -s http://host/a-1.tar"]


def test_shard_pattern_names_missing_files(tmp_path):
    (tmp_path / "a-0.tar").write_bytes(b"")
    ShardPattern(f"{tmp_path}/a-0.tar").check()
    with pytest.raises(ValueError, match=r"1 of 2 shard files do not exist: .*a-1\.tar"):
        ShardPattern(f"{tmp_path}/a-{{0..1}}.tar").check()
    with pytest.raises(ValueError, match="matches no files"):
        ShardPattern(f"{tmp_path}/nothing-*.tar").check()
    ShardPattern("pipe:cat /nowhere.tar").check()  # remote sources are not checked
    with pytest.raises(ValueError, match="non-empty"):
        ShardPattern("  ")


def test_counts_from_stats_and_from_headers(shapes_dir):
    urls = expand_urls(str(shapes_dir / "train-*.tar"))
    assert shard_sample_counts(urls) == [50, 50, 20]
    assert [count_tar_samples(u) for u in urls] == [50, 50, 20]
