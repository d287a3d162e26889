"""Submitting ``ldm`` commands to SLURM: run folders chosen up front, the script kept in the run folder.

A job's run folder is chosen at submission (``<root>/<name>/version_<N>``, or ``sweep_<N>-<task>`` for
the tasks of a sweep) and created then, so that SLURM can write the log into it and the script can be
kept there; the job is given it with ``--run.version``, so a requeued job (same script) finds it again.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ldm.runs import snake_case
from ldm.slurm.script import Allocation, batch_script, ldm_executable

SCRIPT_NAME = "submit.sbatch"


class SubmitError(RuntimeError):
    """Something ``ldm submit`` cannot do (a bad config, sbatch missing or refusing): one line, exit 2."""


@dataclass
class FitConfig:
    """What ``ldm submit`` needs to know of an ``ldm fit`` command line (resolved by ``--print_config``)."""

    name: str
    root: str
    num_workers: int


def resolve_fit(args: list[str], cwd: str | None = None) -> FitConfig:
    """Validate an ``ldm fit`` command line (every key and type, as ``ldm fit`` would) and read the run's name,
    root and loader workers from its resolved config. Raises :class:`SubmitError` with ldm's own message."""
    command = [*shlex.split(ldm_executable()), "fit", *args, "--print_config"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise SubmitError("the ldm fit arguments are not valid:\n" + "\n".join(lines[-15:]))
    config = yaml.safe_load(result.stdout) or {}
    run = config.get("run") or {}
    model = config.get("model") or {}
    class_path = model.get("class_path", "") if isinstance(model, dict) else ""
    name = run.get("name") or snake_case(class_path.rsplit(".", 1)[-1] or "run")
    data = (config.get("data") or {}).get("init_args") or {}
    return FitConfig(name=name, root=run.get("root") or "runs", num_workers=int(data.get("num_workers") or 0))


def next_number(folder: Path, prefix: str) -> int:
    """The next free ``<prefix><N>`` number among the entries of ``folder`` (``<prefix><N>`` or ``-...``)."""
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)(?:-\d+)?")
    numbers = [int(m.group(1)) for p in folder.glob(f"{prefix}*") if (m := pattern.fullmatch(p.name))]
    return max(numbers) + 1 if numbers else 0


def read_sweep(path: str | os.PathLike) -> list[list[str]]:
    """A sweep file: one line of ``ldm fit`` overrides per run (shell words); blank lines and ``#`` comments
    are skipped."""
    runs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        bad = [w for w in words if not w.startswith("--")]
        if bad:
            raise SubmitError(f"{path}:{number}: a sweep line holds overrides (--key=value), not {bad[0]!r}")
        runs.append(words)
    if not runs:
        raise SubmitError(f"{path}: no runs (one line of overrides per run)")
    return runs


@dataclass
class Job:
    """One job to submit: its script, where it is kept, and which run folders it fills."""

    name: str
    script: str
    folders: list[Path]  # the run folder of each array task (one for a plain job)
    output: str  # the log pattern SLURM appends to
    after: list[str] = field(default_factory=list)  # names of jobs this one waits for (recipes)


def plan_fit(fit_args: list[str], alloc: Allocation, *, sweep: list[list[str]] | None = None,
             max_parallel: int | None = None, check: bool = True, launched_by: str = "",
             config: FitConfig | None = None, version: str | None = None, job_name: str | None = None) -> Job:
    """The job of one ``ldm fit`` command line (a job array when ``sweep`` has several lines), into the run
    folder ``version`` (default: a ``--run.version`` among the arguments, else the next free ``version_<N>``)."""
    if config is None:
        config = resolve_fit(fit_args) if check else FitConfig(
            _arg(fit_args, "run.name") or "run", _arg(fit_args, "run.root") or "runs",
            int(_arg(fit_args, "data.num_workers") or 0))
        if check and sweep:
            for overrides in sweep:
                resolve_fit([*fit_args, *overrides])
    base = Path(config.root).absolute() / config.name
    cpus = alloc.cpus_per_task or config.num_workers + 1
    if sweep:
        number = next_number(base, "sweep_")
        versions = [f"sweep_{number}-{i}" for i in range(len(sweep))]
        output = str(base / f"sweep_{number}-%a" / "slurm-%A_%a.out")
    else:
        versions = [version or _arg(fit_args, "run.version") or f"version_{next_number(base, 'version_')}"]
        output = str(base / versions[0] / "slurm-%j.out")
    run_args = [[*(sweep[i] if sweep else []), f"--run.root={config.root}", f"--run.name={config.name}",
                 f"--run.version={v}"] for i, v in enumerate(versions)]
    script = batch_script(command=["fit", *fit_args], alloc=alloc, job_name=job_name or f"ldm-{config.name}",
                          output=output,
                          workdir=os.getcwd(), run_args=run_args, cpus_per_task=cpus, fit=True,
                          max_parallel=max_parallel, launched_by=launched_by)
    return Job(name=config.name, script=script, folders=[base / v for v in versions], output=output)


def _arg(args: list[str], key: str) -> str | None:
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(f"--{key}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{key}" and i + 1 < len(args):
            value = args[i + 1]
    return value


def sbatch(script_path: Path, dependency: str | None = None) -> str:
    """Submit a script with ``sbatch --parsable``; returns the job id. A job whose dependency fails is
    cancelled (``--kill-on-invalid-dep``), not left pending."""
    command = ["sbatch", "--parsable"]
    if dependency:
        command += [f"--dependency={dependency}", "--kill-on-invalid-dep=yes"]
    try:
        result = subprocess.run([*command, str(script_path)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SubmitError("sbatch not found: run ldm submit on a SLURM login node (or `make cluster-up` for a "
                          "local test cluster), or use --dry-run to see the script") from None
    if result.returncode != 0:
        raise SubmitError(f"sbatch refused {script_path}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]


def write_and_submit(job: Job, dependency: str | None = None) -> str:
    """Create the job's run folders, keep the script in each, submit it, record the job id; returns the id."""
    for folder in job.folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SCRIPT_NAME).write_text(job.script)
        (folder / SCRIPT_NAME).chmod(0o755)
    job_id = sbatch(job.folders[0] / SCRIPT_NAME, dependency)
    for i, folder in enumerate(job.folders):
        (folder / "slurm_job").write_text(f"{job_id}_{i}\n" if len(job.folders) > 1 else f"{job_id}\n")
    return job_id


def log_file(job: Job, job_id: str, task: int = 0) -> str:
    return job.output.replace("%A", job_id).replace("%a", str(task)).replace("%j", job_id)


def launched_by(argv: list[str]) -> str:
    return "ldm submit " + " ".join(shlex.quote(a) for a in argv) if argv else " ".join(sys.argv)
