"""The shard DataModule: batches, epoch lengths, rank splits, bad data."""

import io
import math
import tarfile

import pytest
import torch
from PIL import Image

from ldm.data.datamodule import ShardDataModule
from ldm.data.streams import EvalStream, TrainStream, make_decoder
from ldm.data.urls import expand_urls, shard_sample_counts
from tests.toy import CharTokenizer


def _dm(shapes_dir, **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("num_workers", 0)
    kw.setdefault("image_size", 32)
    return ShardDataModule(train=str(shapes_dir / "train-*.tar"), val=str(shapes_dir / "val-*.tar"), **kw)


def test_train_batches_have_documented_keys_and_ranges(shapes_dir):
    dm = _dm(shapes_dir, tokenizer=CharTokenizer(16), crop="random")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() < 0 < batch["image"].max() <= 1.0
    assert len(batch["text"]) == 8 and all(batch["text"])
    assert batch["tokens"].shape == (8, 16) and batch["tokens"].dtype == torch.long
    assert torch.equal(batch["tokens"], CharTokenizer(16)(batch["text"]))
    assert all(m["kind"] == "shapes" for m in batch["meta"])
    assert all(k.startswith("train_") for k in batch["key"])


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_length_is_fixed_and_batches_are_full(shapes_dir, workers):
    dm = _dm(shapes_dir, num_workers=workers, samples_per_epoch=100)
    loader = dm.train_dataloader()
    sizes = [len(b["key"]) for b in loader]
    assert len(loader) == 100 // 8 == len(sizes)
    assert set(sizes) == {8}  # partial=False
    assert len(list(loader)) == len(sizes)  # the next epoch too


def test_per_epoch_seeding_is_deterministic(shapes_dir):
    def keys(epoch, seed=0, workers=0):
        dm = _dm(shapes_dir, seed=seed, num_workers=workers)
        loader = dm.train_dataloader()
        loader.epoch_fn = lambda: epoch
        return [k for b in loader for k in b["key"]]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1)
    assert keys(0) != keys(0, seed=1)
    assert keys(1, workers=2) == keys(1, workers=2)


def test_ranks_get_equal_batch_counts_on_uneven_shards(tmp_path):
    from ldm.data.synthetic import write_synthetic_shards

    for i, n in enumerate([37, 3, 81]):
        write_synthetic_shards(tmp_path / f"s{i}", train=n, val=0, size=32, seed=i, shard_size=1000, progress=False)
    urls = expand_urls(f"{tmp_path}/s*/train-*.tar")
    decoder = make_decoder(32)
    counts = []
    for rank in range(2):
        stream = TrainStream(urls, decoder, batch_size=5, batches_per_rank=12, rank=rank, world_size=2)
        counts.append(sum(1 for _ in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)))
    assert counts == [12, 12]


def test_eval_split_is_exact_across_ranks(shapes_dir):
    urls = expand_urls(str(shapes_dir / "val-*.tar"))
    counts = shard_sample_counts(urls)
    assert sum(counts) == 30
    per_rank = []
    for world in (1, 2, 4, 7):
        keys, lengths = [], []
        for rank in range(world):
            stream = EvalStream(urls, counts, make_decoder(32), batch_size=4, rank=rank, world_size=world)
            batches = list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2))
            lengths.append((len(batches), tuple(len(b["key"]) for b in batches)))
            keys += [k for b in batches for k, v in zip(b["key"], b["valid"].tolist()) if v]
        assert len(set(lengths)) == 1, lengths  # same batches, same sizes on every rank
        assert sorted(keys) == [f"val_{i:08d}" for i in range(30)]  # each sample exactly once
        assert lengths[0][0] == math.ceil(math.ceil(30 / world) / 4)
        per_rank.append(keys)
    assert per_rank[0] == [f"val_{i:08d}" for i in range(30)]  # one rank: in shard order


def _truncate(path, keep_bytes):
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])


def test_truncated_shard_is_skipped_and_counted(tmp_path):
    from ldm.data.synthetic import write_synthetic_shards

    write_synthetic_shards(tmp_path, train=60, val=0, size=32, shard_size=20, progress=False)
    _truncate(tmp_path / "train-000001.tar", 7000)  # cut mid-member
    dm = ShardDataModule(train=str(tmp_path / "train-*.tar"), batch_size=4, num_workers=2, image_size=32,
                         samples_per_epoch=200)
    batches = list(dm.train_dataloader())
    assert len(batches) == 50
    assert dm.skips["train"].count > 0


def test_eval_pads_samples_lost_to_truncation(tmp_path):
    from ldm.data.synthetic import write_synthetic_shards

    write_synthetic_shards(tmp_path, train=0, val=20, size=32, shard_size=10, progress=False)
    _truncate(tmp_path / "val-000000.tar", 9000)
    dm = ShardDataModule(val=str(tmp_path / "val-*.tar"), batch_size=4, num_workers=0, image_size=32)
    batches = list(dm.val_dataloader())
    valid = torch.cat([b["valid"] for b in batches])
    assert len(valid) == 20 and 10 < int(valid.sum()) < 20  # lost samples are padding rows, not a shorter epoch
    assert dm.skips["val"].count == 20 - int(valid.sum())


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpeg(color):
    buf = io.BytesIO()
    Image.new("RGB", (40, 24), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_corrupt_image_and_empty_caption_are_skipped(tmp_path):
    members = []
    for i in range(12):
        image = b"garbage" if i == 3 else _jpeg((i * 20, 0, 0))
        caption = b"" if i == 5 else f"caption {i}".encode()
        members += [(f"{i:05d}.jpg", image), (f"{i:05d}.txt", caption)]
    _tar(tmp_path / "x-0.tar", members)
    dm = ShardDataModule(train=str(tmp_path / "x-0.tar"), batch_size=2, num_workers=0, image_size=16,
                         samples_per_epoch=10, shuffle_buffer=1)
    texts = [t for b in dm.train_dataloader() for t in b["text"]]
    assert "caption 3" not in texts and "" not in texts and len(texts) == 10
    assert dm.skips["train"].count >= 2


def test_img2dataset_layout_is_readable(tmp_path):
    """img2dataset writes 00000.tar with NNNNN.jpg / .txt / .json members: read it directly."""
    members = []
    for i in range(6):
        members += [(f"{i:09d}.jpg", _jpeg((0, 40 * i, 0))), (f"{i:09d}.txt", f"photo {i}".encode()),
                    (f"{i:09d}.json", b'{"url": "http://example.invalid/x.jpg", "width": 40}')]
    _tar(tmp_path / "00000.tar", members)
    dm = ShardDataModule(val=str(tmp_path / "{00000..00000}.tar"), batch_size=3, num_workers=0, image_size=24)
    batches = list(dm.val_dataloader())
    assert [b["text"] for b in batches] == [[f"photo {i}" for i in range(3)], [f"photo {i}" for i in range(3, 6)]]
    assert batches[0]["image"].shape == (3, 3, 24, 24)
    assert batches[0]["meta"][0]["width"] == 40


def test_unreadable_training_data_raises_instead_of_hanging(tmp_path):
    _tar(tmp_path / "bad-0.tar", [("00000.json", b"{}")])  # samples without images
    dm = ShardDataModule(train=str(tmp_path / "bad-0.tar"), batch_size=2, num_workers=0, image_size=16,
                         samples_per_epoch=4)
    with pytest.raises(RuntimeError, match="gave no usable sample"):
        next(iter(dm.train_dataloader()))


@pytest.mark.timeout(200)
def test_ldm_fit_on_unreadable_shards_with_loader_workers_exits_with_its_error(shapes_dir, tmp_path):
    """A worker's error keeps the loader alive in its traceback; the workers ignore SIGTERM (preemption), so at exit
    Python's multiprocessing waited for them forever: ldm fit printed its error and hung. It must exit (code 2)."""
    import subprocess

    from tests.conftest import REPO, run_ldm

    _tar(tmp_path / "bad-0.tar", [(f"{i:05d}.json", b"{}") for i in range(3)])  # samples without images
    try:
        done = run_ldm(["fit", "-c", str(REPO / "configs/trainer/debug.yaml"), "-c", str(REPO / "tests/configs/toy.yaml"),
                        f"--data.train={tmp_path}/bad-0.tar", f"--data.val={shapes_dir}/val-*.tar",
                        "--data.num_workers=1", "--data.samples_per_epoch=16", "--trainer.max_steps=2",
                        f"--run.root={tmp_path}/runs"],
                       cwd=tmp_path, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("ldm fit hung after its data loader worker failed")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "gave no usable sample" in done.stderr and "run.log_checkpoints" not in done.stderr


def test_epoch_too_small_for_a_batch_is_an_error(shapes_dir):
    dm = _dm(shapes_dir, samples_per_epoch=5)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        dm.train_dataloader()


def test_a_rank_without_samples_pads_latent_shards_with_latents(tmp_path):
    """1 latent sample over 2 ranks: rank 1's padding row carries a zero ``latent`` like the real rows (not an image)."""
    import io

    import numpy as np
    import webdataset as wds

    buf = io.BytesIO()
    np.save(buf, np.ones((4, 8, 8), dtype=np.float32))
    with wds.TarWriter(str(tmp_path / "val-000000.tar")) as sink:
        sink.write({"__key__": "only", "latent.npy": buf.getvalue(), "txt": b"a red circle"})
    urls = [str(tmp_path / "val-000000.tar")]
    batches = [next(iter(EvalStream(urls, [1], make_decoder(32, decode_images=False), batch_size=1, rank=rank,
                                    world_size=2))) for rank in (0, 1)]
    assert batches[0]["valid"].tolist() == [True] and batches[1]["valid"].tolist() == [False]
    assert batches[1]["latent"].shape == (1, 4, 8, 8) and "image" not in batches[1]
    assert float(batches[1]["latent"].abs().sum()) == 0.0


def test_loader_workers_ignore_the_preemption_signal(shapes_dir, tmp_path):
    """SLURM sends USR1 to every process of the step: the workers must not run the trainer's handler (which
    saves a stale checkpoint and requeues the job), and must survive it -- also when the signal arrives
    while a worker is still starting (signals are sent every millisecond from before the loader starts)."""
    import multiprocessing
    import os
    import signal
    import threading
    import time

    from ldm.data import ShardDataModule

    marker = tmp_path / "handled"
    main_pid = os.getpid()

    def handler(*_):
        if os.getpid() != main_pid:
            marker.write_text(str(os.getpid()))

    previous = signal.signal(signal.SIGUSR1, handler)
    stop = threading.Event()

    def send():
        while not stop.is_set():
            for child in multiprocessing.active_children():
                try:
                    os.kill(child.pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
            time.sleep(0.001)

    try:
        dm = ShardDataModule(train=f"{shapes_dir}/train-*.tar", val=f"{shapes_dir}/val-*.tar", image_size=32,
                             batch_size=4, num_workers=2)
        for loader in (dm.train_dataloader(), dm.val_dataloader()):
            stop.clear()
            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            it = iter(loader)
            next(it)
            workers = multiprocessing.active_children()
            assert len(workers) == 2
            time.sleep(0.3)
            stop.set()
            sender.join()
            assert not marker.exists(), f"a worker (pid {marker.read_text()}) ran the main process's USR1 handler"
            assert all(w.is_alive() for w in workers)
            next(it)  # still serving batches
            del it
            time.sleep(0.2)
    finally:
        stop.set()
        signal.signal(signal.SIGUSR1, previous)
