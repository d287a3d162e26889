"""Running an inference tool (``ldm eval``, ``ldm sample``, ``ldm precompute``) on every GPU of a node or job.

Launch the same command once per GPU, with ``torchrun --nproc-per-node N ldm ...`` (which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) or with ``srun`` under SLURM (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``; the main address is the first host of the job's node list and the port is
derived from the job id, as Lightning's ``SLURMEnvironment`` does). A process started without either is rank 0 of
1 and touches no process group. :func:`init` reads the environment and joins the group (nccl on CUDA, each rank
on ``cuda:LOCAL_RANK``; gloo on CPU).

The work is shared out by :meth:`Ranks.block`: a contiguous block of the global list per rank, with its bounds
on whole batches, so every batch a rank draws is a batch one process draws too (the same items, the same seeds
``seed + i`` through ``index_offset``, the same batched kernels) and the images are bit for bit those of one
process. Results come back to rank 0 in the original order by :meth:`Ranks.gather` (blocks concatenated in rank
order), where metrics are computed on the gathered features: never an average of per-rank metrics. Only rank 0
writes reports, grids and logs.

This module lives in ``ldm.pipelines`` because the evaluation runner (:mod:`ldm.pipelines.evaluate`) gathers
through it and the tools sit above the pipelines; ``ldm.data.precompute`` (below) takes a :class:`Ranks` as an
argument and never imports it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """Where this process sits, as its launcher told it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" or "slurm"


def launch_environment(env: Mapping[str, str] | None = None) -> Launch | None:
    """The launch read from ``env`` (default ``os.environ``): torchrun's variables first, then SLURM's
    (``srun``); None for a plain process. Only an ``srun`` step is a SLURM launch: ``SLURM_STEP_NUM_TASKS`` is
    set there, not in the batch script itself, whose ``SLURM_NTASKS`` counts the tasks of the whole allocation
    (a tool run by the script would wait for ranks that never start). A shell inside an allocation named
    ``bash`` / ``interactive`` is not an ``srun`` launch either (Lightning's rule)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                      env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    tasks = env.get("SLURM_STEP_NUM_TASKS")
    if "SLURM_PROCID" in env and tasks and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        else:
            from lightning_fabric.plugins.environments import SLURMEnvironment

            addr = SLURMEnvironment.resolve_root_node_address(nodes)
        job = env.get("SLURM_JOB_ID")
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else (int(job[-4:]) + 15000 if job else 12910)
        return Launch(int(env["SLURM_PROCID"]), int(tasks), int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
    return None


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a job, and the collectives the tools need.

    With ``world_size > 1`` the default process group must be initialised (by :func:`init`, or by Lightning in
    a callback); :meth:`gather`, :meth:`broadcast` and :meth:`barrier` are then collective: all ranks call them,
    in the same order.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def block(self, n: int, multiple: int = 1) -> range:
        """This rank's contiguous share of ``range(n)``: whole groups of ``multiple`` (a batch) shared out as
        evenly as they go, in rank order (the blocks of ranks 0, 1, ... concatenate to ``range(n)``)."""
        groups = -(-n // max(1, multiple))
        lo, hi = self.rank * groups // self.world_size, (self.rank + 1) * groups // self.world_size
        return range(min(n, lo * multiple), min(n, hi * multiple))

    def strided(self, items: Sequence[T]) -> list[T]:
        """Every ``world_size``-th item from this rank's (for whole files, like input shards: balances splits)."""
        return list(items[self.rank::self.world_size])

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` on rank 0, in rank order (None on the other ranks)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def device(self, requested: str | None = None) -> str:
        """The device of this rank: ``cuda:LOCAL_RANK`` where CUDA is there (or ``requested`` is ``cuda``),
        else ``requested`` or cpu."""
        if requested in (None, "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}" if self.world_size > 1 else "cuda"
        return requested or "cpu"


def init(env: Mapping[str, str] | None = None) -> Ranks:
    """Join the job's process group from the launcher's environment (nothing for a plain process).

    nccl with each rank on ``cuda:LOCAL_RANK`` where CUDA is there, gloo on CPU. A group initialised already
    (by the caller) is used as it is.
    """
    launch = launch_environment(env)
    if launch is None or launch.world_size <= 1:
        return Ranks()
    ranks = Ranks(launch.rank, launch.world_size, launch.local_rank)
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(launch.local_rank)
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=launch.rank,
                                world_size=launch.world_size,
                                **({"device_id": torch.device("cuda", launch.local_rank)} if cuda else {}))
    return ranks


def shutdown(ranks: Ranks) -> None:
    """Leave the process group, after every rank got here."""
    if ranks.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()



def run_on_ranks(body, args, ranks: Ranks | None = None, level: int = 20) -> int:
    """A tool's ``body(args, ranks)`` on this process's rank (:func:`init` unless ``ranks`` is given): logging at
    ``level`` on rank 0 and errors only elsewhere, ``args.quiet`` (no progress bars) off rank 0, and the group left
    at the end whatever happens."""
    import logging

    ranks = init() if ranks is None else ranks
    logging.basicConfig(level=level if ranks.is_main else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    if hasattr(args, "quiet"):
        args.quiet = args.quiet or not ranks.is_main
    try:
        return body(args, ranks)
    finally:
        shutdown(ranks)
