"""Checkpoint files: atomic writes under kill -9, loaders that skip partial files, loading without running code."""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from ldm.systems.loading import find_checkpoint, load_system
from tests.conftest import REPO, ldm_env

TOY = str(REPO / "tests/configs/toy.yaml")
DEBUG = str(REPO / "configs/trainer/debug.yaml")


def _save(path: Path, step: int, n: int = 1000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "weights": torch.full((n,), float(step))}, path)
    return path


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _age(path: Path, seconds_ago: float) -> None:
    t = time.time() - seconds_ago
    os.utime(path, (t, t))


# ---------------------------------------------------------------- loaders skip what is not a complete checkpoint

def test_truncated_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    good = _save(folder / "epoch=0-step=5.ckpt", 5)
    bad = _truncate(_save(folder / "epoch=1-step=10.ckpt", 10))
    _age(good, 60)
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint(tmp_path) == good
    assert str(bad) in caplog.text and "truncated" in caplog.text


def test_truncated_last_ckpt_falls_back_to_the_newest_complete_one(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    older, newer = _save(folder / "epoch=0-step=5.ckpt", 5), _save(folder / "epoch=1-step=10.ckpt", 10)
    last = _truncate(_save(folder / "last.ckpt", 12), keep=0.9)
    _age(older, 60)
    _age(newer, 30)
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint(tmp_path) == newer
    assert str(last) in caplog.text
    _save(last, 12)  # a complete last.ckpt is still preferred, whatever its age
    _age(last, 120)
    assert find_checkpoint(tmp_path) == last


def test_temporary_files_are_never_picked(tmp_path):
    folder = tmp_path / "checkpoints"
    good = _save(folder / "epoch=0-step=5.ckpt", 5)
    _age(good, 60)
    _save(folder / "epoch=1-step=10.tmp.ckpt", 10)  # complete, but named as a temporary file
    _save(folder / ".epoch=1-step=10.ckpt.tmp-somehost-123", 10)
    _truncate(_save(folder / "epoch=1-step=10.ckpt.tmp", 10))
    assert find_checkpoint(tmp_path) == good


def test_no_complete_checkpoint_is_a_clear_error(tmp_path):
    from ldm.checkpoints import load_checkpoint_file

    bad = _truncate(_save(tmp_path / "checkpoints/last.ckpt", 3))
    with pytest.raises(RuntimeError, match=f"no complete checkpoint in {tmp_path / 'checkpoints'}"):
        find_checkpoint(tmp_path)
    with pytest.raises(RuntimeError, match=f"cannot load checkpoint {bad}: .*truncated"):
        load_checkpoint_file(find_checkpoint(bad))  # a file named explicitly is taken, and loading it says why not
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(RuntimeError, match="empty.ckpt: empty file"):
        load_checkpoint_file(tmp_path / "empty.ckpt")


# ---------------------------------------------------------------- the writer

def test_failed_save_leaves_the_previous_file_and_no_temporary_file(tmp_path):
    from ldm.checkpoints import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints/last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.ones(10)}, path)
    with pytest.raises(Exception):
        io.save_checkpoint({"step": 2, "unpicklable": lambda: None}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert io.load_checkpoint(path)["step"] == 1


def test_stale_temporary_files_of_dead_writers_are_removed_on_the_next_save(tmp_path):
    from ldm.checkpoints import AtomicCheckpointIO, temp_path

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = temp_path(folder / "a.ckpt")  # this host, this (live) pid
    host = mine.name.removeprefix(".a.ckpt.tmp-").rsplit("-", 1)[0]
    stale = folder / f".b.ckpt.tmp-{host}-{dead.pid}"
    other_host = folder / f".c.ckpt.tmp-{host}x-{dead.pid}"  # another node may still be writing it
    for p in (mine, stale, other_host):
        p.write_bytes(b"partial")
    AtomicCheckpointIO().save_checkpoint({"step": 1}, folder / "d.ckpt")
    assert sorted(p.name for p in folder.iterdir()) == sorted([mine.name, other_host.name, "d.ckpt"])


# ---------------------------------------------------------------- kill -9 timed to the write, TMPDIR elsewhere

ZYGOTE = textwrap.dedent("""
    # Builds the trainer as `ldm fit` does, then forks one writer per round: each writer saves step files
    # and last.ckpt through the trainer's checkpoint IO until the test kills it with SIGKILL.
    import os, sys, time, traceback
    from pathlib import Path
    import torch
    torch.set_num_threads(1)  # no OpenMP pool in the parent of fork()
    from ldm.cli import LDMCLI

    shards, root, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cli = LDMCLI(args=["-c", sys.argv[4], "-c", sys.argv[5], f"--data.train={shards}/train-*.tar",
                       f"--data.val={shards}/val-*.tar", f"--run.root={root}", "--run.wandb_mode=disabled"], run=False)
    io = cli.trainer.strategy.checkpoint_io
    folder = Path(cli.run_dir) / "checkpoints"

    def say(text):
        os.write(1, (text + "\\n").encode())

    say(f"ready {folder} {type(io).__module__}.{type(io).__name__}")
    for line in sys.stdin:
        first, count = map(int, line.split())
        pid = os.fork()
        if pid == 0:
            try:
                for step in range(first, first + count):
                    say(f"start {step}")
                    t = time.perf_counter()
                    ckpt = {"step": step, "weights": torch.full((n,), float(step))}
                    io.save_checkpoint(ckpt, folder / f"step={step:03d}.ckpt")
                    io.save_checkpoint(ckpt, folder / "last.ckpt")
                    say(f"done {step} {time.perf_counter() - t:.4f}")
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        say(f"pid {pid}")
        os.waitpid(pid, 0)
        say(f"exit {pid}")
""")


def _other_file_system_tmpdir(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm to put TMPDIR on a second file system")
    tmpdir = Path(tempfile.mkdtemp(prefix="ldm-tmpdir-", dir=shm))
    if tmpdir.stat().st_dev == tmp_path.stat().st_dev:
        shutil.rmtree(tmpdir)
        pytest.skip(f"/dev/shm and {tmp_path} are one file system here: the cross-file-system case cannot be made")
    return tmpdir


def _child_of(pid: int, parent: int) -> bool:
    """Whether ``pid`` is still a child of ``parent`` (so a kill cannot hit a process that reused the pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()  # state, ppid, ...
    return fields[0] != "Z" and int(fields[1]) == parent


def _wait(condition, pid: int, parent: int, timeout: float = 30.0) -> None:
    """Poll ``condition`` every 0.2 ms while the writer runs."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline and _child_of(pid, parent):
        time.sleep(0.0002)


def _stamp(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def test_kill_during_checkpoint_writes_never_leaves_a_partial_file_under_a_final_name(shapes_dir, tmp_path):
    """SIGKILL at several moments of a save (TMPDIR on tmpfs, run folder on disk): every ``*.ckpt`` stays complete,
    ``find_checkpoint`` picks a complete checkpoint holding every finished save, and no partial files linger."""
    n = 8_000_000  # 32 MB of float32: long enough a write to land kills inside it
    tmpdir = _other_file_system_tmpdir(tmp_path)
    log_file = open(tmp_path / "writer.log", "w")  # a file, not a pipe that a chatty writer could fill
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(shapes_dir), str(tmp_path / "runs"), str(n), DEBUG,
                               TOY], cwd=tmp_path, env=ldm_env(TMPDIR=str(tmpdir)), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=log_file, text=True, bufsize=1)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.strip()) for line in zygote.stdout], daemon=True).start()

    def expect(word: str, timeout: float = 60.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                parts = lines.get(timeout=0.5).split()
            except queue.Empty:
                if zygote.poll() is not None:
                    break
                continue
            if parts and parts[0] == word:
                return parts[1:]
        pytest.fail(f"the writer process did not say {word!r}: {(tmp_path / 'writer.log').read_text()[-3000:]}")

    try:
        folder_text, io_name = expect("ready", timeout=120)
        folder = Path(folder_text)
        # (how to time the kill, argument): the moment a new file appears under a final name, the moment
        # last.ckpt changes, and fractions of a measured save
        plan = [("appears", None), ("changes", None), ("fraction", 0.3), ("fraction", 0.6), ("fraction", 0.9)]
        step, durations, last_done, checked = 0, [], -1, {}
        for mode, arg in plan + [("complete", None)]:
            zygote.stdin.write(f"{step} 3\n")
            zygote.stdin.flush()
            pid = int(expect("pid")[0])
            target = step + 1  # the second of the round's three saves: one complete save precedes it
            last_seen = _stamp(folder / "last.ckpt")
            while True:
                kind, *rest = lines.get(timeout=60).split()
                if kind == "done":
                    last_done, durations = int(rest[0]), durations + [float(rest[1])]
                    last_seen = _stamp(folder / "last.ckpt")
                elif kind == "exit":
                    break
                elif kind == "start" and int(rest[0]) == target and mode != "complete":
                    if mode == "fraction":
                        time.sleep(arg * (sorted(durations)[len(durations) // 2] if durations else 0.2))
                    elif mode == "appears":
                        _wait(lambda: (folder / f"step={target:03d}.ckpt").exists(), pid, zygote.pid)
                    else:  # "changes"
                        _wait(lambda: _stamp(folder / "last.ckpt") != last_seen, pid, zygote.pid)
                    if _child_of(pid, zygote.pid):
                        os.kill(pid, signal.SIGKILL)
            step += 3

            finals = sorted(folder.glob("*.ckpt"))
            assert finals, f"no checkpoint written ({io_name})"
            from ldm.checkpoints import checkpoint_problem

            for path in finals:
                problem = checkpoint_problem(path)
                assert problem is None, f"after a kill timed by {mode!r}, {path.name} is partial: {problem} ({io_name})"
                if checked.get(path) != _stamp(path):  # a new or rewritten file: load it whole
                    ckpt = torch.load(path, weights_only=True)
                    assert ckpt["weights"].shape == (n,) and (ckpt["weights"] == ckpt["step"]).all()
                    checked[path] = _stamp(path)
            picked = torch.load(find_checkpoint(folder.parent), weights_only=True)
            assert picked["weights"].shape == (n,) and (picked["weights"] == picked["step"]).all()
            assert picked["step"] >= last_done  # every save that finished is kept
        assert last_done == step - 1  # the last round ran to its end
        assert not [p.name for p in folder.iterdir() if ".tmp" in p.name], "partial files of killed writers remain"
        assert not [p for p in tmpdir.rglob("*") if p.is_file() and p.stat().st_size > 1_000_000], \
            f"checkpoint-sized files were left in TMPDIR ({io_name})"
    finally:
        zygote.kill()
        zygote.wait()
        log_file.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
        shutil.rmtree(tmp_path / "runs", ignore_errors=True)  # ~0.5 GB of checkpoints


# ---------------------------------------------------------------- loading never runs code from the file

class _MakesADirectoryWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _crafted_run(tmp_path: Path) -> tuple[Path, Path]:
    from tests.toy import ToySystem

    run, marker = tmp_path / "run", tmp_path / "pwned"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"class_path": "tests.toy.ToySystem"}}))
    torch.save({"state_dict": ToySystem().state_dict(), "extra": _MakesADirectoryWhenUnpickled(marker)},
               run / "checkpoints/last.ckpt")
    return run, marker


def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path):
    run, marker = _crafted_run(tmp_path)
    ckpt = run / "checkpoints/last.ckpt"
    with pytest.raises(RuntimeError, match=f"refusing to load checkpoint {ckpt}: it asks to build the global "
                                           r"posix\.mkdir"):
        load_system(run)
    assert not marker.exists()


def test_the_trainer_checkpoint_io_refuses_a_crafted_checkpoint_on_resume(tmp_path):
    from ldm.checkpoints import AtomicCheckpointIO

    run, marker = _crafted_run(tmp_path)
    with pytest.raises(RuntimeError, match="refusing to load checkpoint .*last.ckpt"):
        AtomicCheckpointIO().load_checkpoint(run / "checkpoints/last.ckpt")
    assert not marker.exists()


# ---------------------------------------------------------------- wiring into `ldm fit`

@pytest.mark.parametrize("plugins", [None, "[{class_path: lightning_fabric.plugins.environments.LightningEnvironment}]",
                                     "[{class_path: pytorch_lightning.plugins.TorchSyncBatchNorm}]"])
def test_ldm_fit_writes_through_the_atomic_checkpoint_io(plugins, shapes_dir, tmp_path):
    """By default, and when a config's ``trainer.plugins`` replaces the default plugin list."""
    from ldm.checkpoints import AtomicCheckpointIO
    from ldm.cli import LDMCLI

    args = ["fit", "-c", DEBUG, "-c", TOY, f"--data.train={shapes_dir}/train-*.tar", "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", f"--run.root={tmp_path}",
            "--run.wandb_mode=disabled"]
    if plugins:
        (tmp_path / "plugins.yaml").write_text(f"trainer:\n  plugins: {plugins}\n")
        args[5:5] = ["-c", str(tmp_path / "plugins.yaml")]
    cli = LDMCLI(args=args)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert (tmp_path / "toy/version_0/checkpoints/last.ckpt").is_file()
    if plugins:  # the config's plugin is kept as well
        saved = yaml.safe_load((tmp_path / "toy/version_0/config.yaml").read_text())["trainer"]["plugins"]
        assert plugins.split("class_path: ")[1].rstrip("}]") in str(saved)
