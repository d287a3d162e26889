"""Loader workers start from a fork server, never forked from the (threaded) training process.

Forking a process with threads can leave the child waiting forever for a lock another thread held
(make test-slurm's two-rank jobs hung at their first validation); the fork server is single-threaded, and
it ignores SLURM's preemption signals like the workers do (its death would end them).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from torch.utils.data import Dataset

from ldm.data.datamodule import PreemptionSafeLoader
from ldm.data.workers import worker_context


class ParentPid(Dataset):
    """Each item: the pid of the worker's parent process (and a short pause, so batches keep coming)."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(0.02)
        return torch.tensor([i, os.getppid()])


def ignored_signals(pid: int) -> set[int]:
    line = next(l for l in open(f"/proc/{pid}/status") if l.startswith("SigIgn:"))
    mask = int(line.split()[1], 16)
    return {s for s in range(1, 65) if mask >> (s - 1) & 1}


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_workers_start_from_a_fork_server_that_ignores_preemption_signals():
    batches = list(PreemptionSafeLoader(ParentPid(), batch_size=4, num_workers=2))
    parents = {int(p) for b in batches for p in b[:, 1]}
    assert sorted(int(i) for b in batches for i in b[:, 0]) == list(range(24))
    assert len(parents) == 1 and os.getpid() not in parents  # not forked from this (threaded) process
    server = parents.pop()
    assert {signal.SIGUSR1, signal.SIGTERM} <= ignored_signals(server)


def test_a_preemption_signal_to_the_fork_server_leaves_the_loader_running():
    loader = PreemptionSafeLoader(ParentPid(), batch_size=2, num_workers=2)
    it = iter(loader)
    first = next(it)
    server = int(first[0, 1])
    assert server != os.getpid(), "the workers were forked from this process"
    os.kill(server, signal.SIGTERM)  # SLURM signals every process of the job step
    os.kill(server, signal.SIGUSR1)
    rest = list(it)
    assert sorted(int(i) for b in [first, *rest] for i in b[:, 0]) == list(range(24))
    os.kill(server, 0)  # still running


def test_the_start_method_can_be_chosen_and_a_wrong_one_is_named(monkeypatch):
    monkeypatch.setenv("LDM_WORKER_START", "fork")
    assert worker_context().get_start_method() == "fork"
    monkeypatch.setenv("LDM_WORKER_START", "threads")
    with pytest.raises(ValueError, match="LDM_WORKER_START='threads'"):
        worker_context()
