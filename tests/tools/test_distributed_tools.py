"""`ldm eval`, `ldm sample` and `ldm precompute` on 2 CPU processes (gloo, launched by torchrun) give what 1
process gives; the sharding / gathering helpers and the launch environment (torchrun, SLURM) in one process."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from ldm.pipelines.distributed import Ranks, init, launch_environment
from tests.conftest import finish, ldm_env

THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one process and each of two do the same arithmetic


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ldm(args: list[str], cwd: Path, processes: int, timeout: float = 240) -> subprocess.CompletedProcess:
    """The real `ldm` command: alone (no launcher, no distributed env), or under torchrun with ``processes``."""
    cmd = [str(Path(sys.executable).with_name("ldm")), *args]
    if processes > 1:  # `torchrun ... --no-python -- ldm ...`: the `--` keeps torchrun off ldm's options (--n)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), "--no-python", "--", *cmd]
    proc = subprocess.Popen(cmd, cwd=cwd, env=ldm_env(**THREADS), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    res = finish(proc, timeout)
    assert res.returncode == 0, f"{processes} process(es): {res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


# ---------------------------------------------------------------- the helpers, in one process


@pytest.mark.parametrize("n,world,multiple", [(10, 2, 3), (6, 2, 2), (7, 3, 1), (3, 4, 2), (0, 2, 4), (100, 8, 32)])
def test_blocks_cover_the_list_once_in_order_on_whole_batches(n, world, multiple):
    blocks = [Ranks(r, world).block(n, multiple) for r in range(world)]
    assert [i for b in blocks for i in b] == list(range(n))
    for b in blocks:
        assert b.start % multiple == 0 and (b.stop % multiple == 0 or b.stop == n)
    sizes = [-(-len(b) // multiple) for b in blocks]  # batches per rank differ by at most one
    assert max(sizes) - min(sizes) <= 1


def test_one_process_is_the_whole_job():
    ranks = init(env={})
    assert ranks == Ranks() and ranks.is_main
    assert ranks.block(5, 2) == range(5)
    assert ranks.strided(["a", "b", "c"]) == ["a", "b", "c"]
    assert ranks.gather({"x": 1}) == [{"x": 1}] and ranks.broadcast("y") == "y"
    assert [Ranks(r, 3).strided(list(range(7))) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    ranks.barrier()  # no process group: nothing to wait for


def test_plain_process_and_torchrun_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_STEP_NUM_TASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(var, raising=False)
    assert launch_environment() is None
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "node7")
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.setenv("SLURM_PROCID", "0")  # torchrun inside an allocation: torchrun's variables win
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert launch_environment() == launch_environment(dict(os.environ))
    launch = launch_environment()
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port,
            launch.launcher) == (5, 8, 1, "node7", 29555, "torchrun")


def test_srun_environment_gives_rank_world_and_the_first_host(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NUM_TASKS",
                "SLURM_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert launch_environment() is None  # the batch script of an 8-task job (measured: no SLURM_STEP_* there)
    monkeypatch.setenv("SLURM_PROCID", "6")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")  # inside `srun`
    monkeypatch.setenv("SLURM_LOCALID", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "4711234")
    monkeypatch.setenv("SLURM_JOB_NAME", "eval")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-a[017-018,020],gpu-b3")
    launch = launch_environment()
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port,
            launch.launcher) == (6, 8, 2, "gpu-a017", 1234 + 15000, "slurm")
    monkeypatch.setenv("MASTER_PORT", "23456")  # given ones win
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    assert (launch_environment().master_addr, launch_environment().master_port) == ("10.0.0.1", 23456)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # srun's step, not the whole allocation
    assert launch_environment().world_size == 4
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # a shell in an allocation is no srun launch
    assert launch_environment() is None


# ---------------------------------------------------------------- the tools on 2 processes vs 1


def _shard_samples(folder: Path) -> dict[tuple[str, str], bytes]:
    """{(key, member): bytes} over every output shard."""
    out = {}
    for tar in sorted(folder.glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            for k, v in sample.items():
                if not k.startswith("__"):
                    out[(sample["__key__"], k)] = v
    return out


@pytest.mark.timeout(300)
@pytest.mark.slow  # make test-all (keeps make test within its 15 minutes)
def test_eval_on_two_processes_reports_the_numbers_of_one(ldm_run, inception_file, tmp_path):
    args = ["eval", "--ckpt", str(ldm_run.run_dir), "--n", "7", "--steps", "2", "--batch-size", "2",
            "--inception", str(inception_file), "--no-cache", "--grid", "4", "--quiet"]
    _ldm([*args, "--out", str(tmp_path / "one")], tmp_path, 1)
    _ldm([*args, "--out", str(tmp_path / "two")], tmp_path, 2)
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    m1, m2 = one["results"][0]["metrics"], two["results"][0]["metrics"]
    assert {"fid", "kid", "is", "fd_clip", "clip_score", "compositional/all_correct"} <= set(m1)
    assert set(m1) == set(m2)
    for key in sorted(m1):
        print(f"{key}: 1 process {m1[key]!r}, 2 processes {m2[key]!r}, difference {abs(m1[key] - m2[key]):.3g}")
        assert m2[key] == pytest.approx(m1[key], rel=1e-6, abs=1e-9), key
    assert (tmp_path / "one/samples.png").read_bytes() == (tmp_path / "two/samples.png").read_bytes()


@pytest.mark.timeout(300)
@pytest.mark.slow  # make test-all (keeps make test within its 15 minutes)
def test_sample_on_two_processes_writes_the_same_files(ldm_run, tmp_path):
    args = ["sample", "--ckpt", str(ldm_run.run_dir), "--prompt", "a red circle", "--prompt", "a blue square",
            "--n", "3", "--steps", "2", "--batch-size", "2", "--seed", "7", "--quiet"]
    _ldm([*args, "--out", str(tmp_path / "one/grid.png")], tmp_path, 1)
    res = _ldm([*args, "--out", str(tmp_path / "two/grid.png")], tmp_path, 2)
    assert res.stdout.count("wrote ") == 1  # rank 0 alone reports
    names = sorted(p.name for p in (tmp_path / "one/grid").iterdir())
    assert len(names) == 6 and names == sorted(p.name for p in (tmp_path / "two/grid").iterdir())
    for name in names:
        assert (tmp_path / "one/grid" / name).read_bytes() == (tmp_path / "two/grid" / name).read_bytes(), name
    assert (tmp_path / "one/grid.png").read_bytes() == (tmp_path / "two/grid.png").read_bytes()
    record = {d: json.loads((tmp_path / d / "grid.json").read_text()) for d in ("one", "two")}
    assert [f["seed"] for f in record["one"]["images"]] == [f["seed"] for f in record["two"]["images"]] == list(
        range(7, 13))


@pytest.mark.timeout(300)
@pytest.mark.slow  # make test-all (keeps make test within its 15 minutes)
def test_precompute_on_two_processes_writes_the_samples_of_one(stage_runs, shapes_dir, tmp_path):
    args = ["precompute", "latents", "--ckpt", str(stage_runs["ae"]), "--shards", f"{shapes_dir}/*-*.tar",
            "--batch-size", "16", "--std", "--quiet"]
    _ldm([*args, "--out", str(tmp_path / "one")], tmp_path, 1)
    _ldm([*args, "--out", str(tmp_path / "two")], tmp_path, 2)
    one, two = _shard_samples(tmp_path / "one"), _shard_samples(tmp_path / "two")
    assert len({key for key, _ in one}) == 150  # 120 train + 30 val scenes
    assert set(one) == set(two)
    for k in one:
        if k[1].endswith(".npy"):
            a, b = (np.load(io.BytesIO(d[k])) for d in (one, two))
            assert np.array_equal(a, b), k
        else:
            assert one[k] == two[k], k
    s1, s2 = (json.loads((tmp_path / d / "stats.json").read_text()) for d in ("one", "two"))
    strip = lambda s: json.loads(json.dumps(s).replace(str(tmp_path / "two"), str(tmp_path / "one")))  # noqa: E731
    assert strip(s2) == s1
