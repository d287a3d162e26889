"""The batch script ``ldm submit`` writes: one SLURM job (or job array) that runs one ``ldm`` command.

Why a template of ours and not submitit: submitit pickles a Python callable and runs it through its
own launcher, so the run folder would record an opaque pickle instead of the command, and a
requeued job would need submitit's checkpoint protocol on top of Lightning's. The script here is
plain bash that a researcher can read, edit and ``sbatch`` again; Lightning's ``SLURMEnvironment``
sees the ``srun``-launched ranks directly (one task per device).

Allocation settings (accelerator, devices, nodes, strategy) come after the user's arguments on the
``ldm fit`` line: later arguments win in LightningCLI, so no config file can contradict the
allocation.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path


@dataclass
class Allocation:
    """What one job asks SLURM for. ``None`` leaves a setting to the cluster's default."""

    nodes: int = 1
    gpus_per_node: int = 0
    ntasks_per_node: int | None = None  # default: one task per GPU (1 without GPUs)
    cpus_per_task: int | None = None  # default: data.num_workers + 1 (ldm fit), 1 for tools
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None
    grace: int = 90  # seconds between the warning signal (USR1) and the end
    requeue: bool = True  # False: no warning signal, no requeue (at the time limit SIGTERM still checkpoints)
    strategy: str = "ddp"
    extra: list[str] = field(default_factory=list)  # more #SBATCH lines, e.g. --exclusive

    @property
    def tasks_per_node(self) -> int:
        return self.ntasks_per_node or max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def updated(self, values: dict) -> "Allocation":
        """A copy with ``values`` (keys as the fields, ``-`` or ``_``) applied; unknown keys are an error."""
        names = {f.name for f in fields(self)}
        changes = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise ValueError(f"unknown SLURM setting {key!r}; known: {', '.join(sorted(names))}")
            changes[name] = value
        return Allocation(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


def ldm_executable() -> str:
    """The ``ldm`` console script of this environment (an absolute path: compute nodes need no PATH setup)."""
    script = Path(sys.executable).with_name("ldm")
    return str(script) if script.exists() else f"{sys.executable} -m ldm.cli"


def allocation_args(alloc: Allocation) -> list[str]:
    """The ``ldm fit`` arguments that follow the allocation (shell words, expanded in the job)."""
    args = [f"--trainer.accelerator={'gpu' if alloc.gpus_per_node else 'cpu'}",
            "--trainer.devices=${SLURM_NTASKS_PER_NODE}", "--trainer.num_nodes=${SLURM_JOB_NUM_NODES}"]
    if alloc.world_size > 1:
        args.append(f"--trainer.strategy={alloc.strategy}")
    return args


def _sbatch_lines(alloc: Allocation, job_name: str, output: str, cpus_per_task: int, fit: bool,
                  array: str | None) -> list[str]:
    lines = [f"--job-name={job_name}", f"--nodes={alloc.nodes}", f"--ntasks-per-node={alloc.tasks_per_node}",
             f"--cpus-per-task={cpus_per_task}"]
    if alloc.gpus_per_node:
        lines.append(f"--gpus-per-node={alloc.gpus_per_node}")
    for name in ("time", "partition", "account", "qos", "constraint", "mem"):
        if getattr(alloc, name):
            lines.append(f"--{name}={getattr(alloc, name)}")
    if fit and alloc.requeue:  # a tool cannot resume: no warning signal (USR1 would end it); a requeue reruns it
        lines.append(f"--signal=USR1@{alloc.grace}")
    lines.append("--requeue" if alloc.requeue else "--no-requeue")
    lines += ["--open-mode=append", f"--output={output}"]
    if array:
        lines.append(f"--array={array}")
    return lines + list(alloc.extra)


def _bash_array(words: list[str]) -> str:
    return "(" + " ".join(shlex.quote(w) for w in words) + ")"


def batch_script(*, command: list[str], alloc: Allocation, job_name: str, output: str, workdir: str,
                 run_args: list[list[str]], cpus_per_task: int, fit: bool = True,
                 max_parallel: int | None = None, launched_by: str = "") -> str:
    """The bash batch script of one job, or of a job array when ``run_args`` has several entries.

    Args:
        command: the ``ldm`` subcommand and its arguments (``["fit", "-c", ...]`` or a tool's).
        run_args: per run (array task), the arguments appended after ``command`` (run folder, sweep overrides).
        output: the log file (``%j`` / ``%A_%a`` expanded by SLURM), appended to across requeues.
    """
    array = None
    if len(run_args) > 1:
        array = f"0-{len(run_args) - 1}" + (f"%{max_parallel}" if max_parallel else "")
    head = ["#!/bin/bash",
            f"# Written by `ldm submit` on {datetime.now().isoformat(timespec='seconds')}:",
            f"#   {launched_by}" if launched_by else "#",
            "# Submitting this file again (sbatch FILE) continues the same run folder from its newest checkpoint.",
            *[f"#SBATCH {line}" for line in _sbatch_lines(alloc, job_name, output, cpus_per_task, fit, array)],
            "set -euo pipefail",
            f"cd {shlex.quote(workdir)}",
            "export PYTHONUNBUFFERED=1",
            'echo "ldm: job ${SLURM_JOB_ID} (attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 ))) on $(hostname) '
            'at $(date -Is)"',
            f"COMMAND={_bash_array(command)}"]
    if array is None:
        head.append(f"RUN={_bash_array(run_args[0])}")
    else:
        head.append('case "${SLURM_ARRAY_TASK_ID}" in')
        head += [f"  {i}) RUN={_bash_array(words)} ;;" for i, words in enumerate(run_args)]
        head.append('  *) echo "ldm: no run for array task ${SLURM_ARRAY_TASK_ID}" >&2; exit 2 ;;')
        head.append("esac")
    launch = ldm_executable()
    if fit:
        # the allocation's own arguments are expanded in the job (they name the job's SLURM variables)
        alloc_words = " ".join(allocation_args(alloc))
        head.append(f'srun --kill-on-bad-exit=1 {launch} "${{COMMAND[@]}}" "${{RUN[@]}}" {alloc_words}')
    else:
        head.append(f'srun --ntasks=1 {launch} "${{COMMAND[@]}}" "${{RUN[@]}}"')
    return "\n".join(head) + "\n"
