"""``ldm submit``: run ``ldm fit`` (one run, a sweep, or a multi-stage recipe) as SLURM jobs.

    ldm submit --nodes 2 --gpus-per-node 8 --time 24:00:00 --partition P -- -c configs/trainer/gpu.yaml \\
        -c configs/ldm/sd15-256.yaml
    ldm submit --gpus-per-node 1 --sweep lrs.txt -- -c ...          # a job array, one run folder per line
    ldm submit --recipe configs/recipes/shapes-demo.yaml            # stages chained with --dependency=afterok
    ldm submit --dry-run ...                                        # print the script(s), submit nothing

Each job's script is kept in its run folder (``submit.sbatch``) with the job id (``slurm_job``) and the
log (``slurm-<jobid>.out``, appended to across requeues). The job asks for ``--signal=USR1@<grace>``,
``--requeue`` and ``--open-mode=append``: on the signal ``ldm fit`` checkpoints the current step and
requeues itself, and the requeued job resumes from the newest checkpoint of its folder. A
``--run.version`` among the arguments continues that folder (from its newest checkpoint).

The options of ldm submit itself (before ``--``) speak ``ldm fit``'s dialect (:mod:`ldm.tools.options`):
``ldm submit -c cluster.yaml -- -c fit.yaml`` reads the allocation from cluster.yaml (``partition: gpu``,
``gpus_per_node: 8``), ``--print_config`` prints them, ``--help`` shows the defaults.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.slurm.recipe import Recipe, load_recipe
from ldm.slurm.script import Allocation, batch_script
from ldm.slurm.submit import (
    FitConfig,
    Job,
    SubmitError,
    launched_by,
    log_file,
    next_number,
    plan_fit,
    read_sweep,
    resolve_fit,
    write_and_submit,
)
from ldm.tools.options import RawDescriptionHelpFormatter, ToolParser

#: the allocation options (argparse dest -> Allocation field); given ones override a recipe's ``slurm:``
ALLOCATION = ("nodes", "gpus_per_node", "ntasks_per_node", "cpus_per_task", "time", "partition", "account", "qos",
              "constraint", "mem", "grace", "strategy")


def build_parser() -> ToolParser:
    p = ToolParser(prog="ldm submit", description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    a = p.add_argument_group("allocation (wins over any config file: devices, nodes and strategy follow it)")
    a.add_argument("--nodes", type=int, help="nodes (default 1)")
    a.add_argument("--gpus-per-node", type=int, help="GPUs per node; 0 trains on CPUs (default 0)")
    a.add_argument("--ntasks-per-node", type=int, help="processes per node (default: one per GPU, 1 without)")
    a.add_argument("--cpus-per-task", type=int, help="CPUs per process (default: data.num_workers + 1)")
    a.add_argument("--time", help="time limit, e.g. 24:00:00")
    a.add_argument("--partition", help="SLURM partition")
    a.add_argument("--account", help="SLURM account")
    a.add_argument("--qos", help="SLURM quality of service")
    a.add_argument("--constraint", help="SLURM node features, e.g. a100")
    a.add_argument("--mem", help="memory per node, e.g. 64G")
    a.add_argument("--grace", type=int, help="seconds between the warning signal (USR1) and the end (default 90)")
    a.add_argument("--strategy", help="Lightning strategy for more than one process (default ddp)")
    a.add_argument("--no-requeue", action="store_true",
                   help="no warning signal and no requeue: the job ends at its time limit (SIGTERM still "
                        "checkpoints the current step)")
    a.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="another #SBATCH option, e.g. --sbatch=--exclusive (repeatable)")
    w = p.add_argument_group("what to submit")
    w.add_argument("--sweep", metavar="FILE", help="one line of ldm fit overrides per run: a job array")
    w.add_argument("--max-parallel", type=int, help="at most this many array tasks at once")
    w.add_argument("--recipe", metavar="FILE", help="a multi-stage recipe (configs/recipes/): dependent jobs")
    w.add_argument("--var", action="append", default=[], metavar="KEY=VALUE",
                   help="override a var of the recipe (repeatable)")
    w.add_argument("--dry-run", action="store_true", help="print the script(s); create and submit nothing")
    w.add_argument("--no-check", action="store_true",
                   help="skip validating the ldm fit arguments before submitting (faster)")
    p.add_argument("fit_args", nargs=argparse.REMAINDER, help="after --: the ldm fit arguments")
    return p


def allocation(args: argparse.Namespace, base: dict | None = None, stage: dict | None = None) -> Allocation:
    """Built-in defaults < the recipe's ``slurm:`` < options given to ldm submit < the stage's own ``slurm:``."""
    alloc = Allocation(requeue=not args.no_requeue, extra=list(args.sbatch))
    alloc = alloc.updated(base or {})
    alloc = alloc.updated({k: getattr(args, k) for k in ALLOCATION if getattr(args, k) is not None})
    return alloc.updated(stage or {})


def _show(job: Job, dry_run: bool, job_id: str | None) -> None:
    if dry_run:
        print(f"# ---- {job.name}: {job.folders[0] if len(job.folders) == 1 else job.folders[0].parent}")
        print(job.script)
        return
    for i, folder in enumerate(job.folders):
        task = f"{job_id}_{i}" if len(job.folders) > 1 else job_id
        print(f"submitted job {task}: run folder {folder}")
        print(f"  follow:  tail -F {log_file(job, job_id, i)}")
    print(f"  queue:   squeue -j {job_id}    cancel: scancel {job_id}")


def submit_fit(args: argparse.Namespace, fit_args: list[str], argv: list[str]) -> int:
    sweep = read_sweep(args.sweep) if args.sweep else None
    alloc = allocation(args)
    job = plan_fit(fit_args, alloc, sweep=sweep, max_parallel=args.max_parallel, check=not args.no_check,
                   launched_by=launched_by(argv))
    job_id = None if args.dry_run else write_and_submit(job)
    _show(job, args.dry_run, job_id)
    return 0


def upstream_fits(recipe: Recipe, name: str) -> list[str]:
    """The fit stages ``name`` depends on, directly or through stages that are not fits (shards, precompute)."""
    found: list[str] = []
    todo = list(recipe.dependencies(name))
    while todo:
        dep = todo.pop(0)
        if recipe.stages[dep].kind == "fit":
            found.append(dep)
        else:
            todo += recipe.dependencies(dep)
    return list(dict.fromkeys(found))


def plan_recipe(recipe: Recipe, args: argparse.Namespace, argv: list[str]) -> tuple[str, list[tuple[str, Job]]]:
    """(the recipe's version, its jobs in submission order). Fit stages are validated unless --no-check."""
    base = Path(recipe.root).absolute() / recipe.name
    version = f"version_{max(next_number(base / s, 'version_') for s in recipe.stages)}"
    resolved = recipe.resolve(version)
    jobs = []
    for name in recipe.order():
        stage = recipe.stages[name]
        alloc = allocation(args, recipe.slurm, stage.slurm)
        folder = recipe.folder(name, version)
        if stage.kind == "fit":
            # group: the recipe, so its stages sit together in W&B; inputs: the fit stages it builds on, also those
            # it reaches through tool stages (the CLIP whose embeddings the prior trains on), for the W&B lineage
            inputs = [str(recipe.folder(s, version)) for s in upstream_fits(recipe, name)]
            fit_args = [*resolved[name], f"--run.group={recipe.name}",
                        *([f"--run.inputs=[{','.join(inputs)}]"] if inputs else [])]
            run = [f"--run.root={base}", f"--run.name={name}"]
            config = resolve_fit([*fit_args, *run]) if not args.no_check else FitConfig(name, str(base), 0)
            # the recipe's version, shared by all stages
            job = plan_fit(fit_args, alloc, config=config, version=version, job_name=f"ldm-{recipe.name}-{name}",
                           launched_by=launched_by(argv))
        else:
            output = str(folder / "slurm-%j.out")
            script = batch_script(command=resolved[name], alloc=alloc.updated({"nodes": 1, "ntasks_per_node": 1}),
                                  job_name=f"ldm-{recipe.name}-{name}", output=output, workdir=str(Path.cwd()),
                                  run_args=[[]], cpus_per_task=alloc.cpus_per_task or 2, fit=False,
                                  launched_by=launched_by(argv))
            job = Job(name=name, script=script, folders=[folder], output=output)
        job.after = recipe.dependencies(name)
        jobs.append((name, job))
    return version, jobs


def submit_recipe(args: argparse.Namespace, argv: list[str]) -> int:
    overrides = {}
    for item in args.var:
        key, sep, value = item.partition("=")
        if not sep:
            raise SubmitError(f"--var {item!r}: expected KEY=VALUE")
        overrides[key] = value
    recipe = load_recipe(args.recipe, overrides)
    version, jobs = plan_recipe(recipe, args, argv)
    ids: dict[str, str] = {}
    print(f"recipe {recipe.name} ({version}): {len(jobs)} stages -> {Path(recipe.root).absolute() / recipe.name}/<stage>/"
          f"{version}")
    for name, job in jobs:
        dependency = "afterok:" + ":".join(ids.get(d, f"<{d}>") for d in job.after) if job.after else None
        if args.dry_run:
            print(f"# ---- stage {name}" + (f" (sbatch --dependency={dependency})" if dependency else ""))
            print(job.script)
            continue
        ids[name] = write_and_submit(job, dependency)
        waits = f", after {', '.join(job.after)}" if job.after else ""
        print(f"  {name:<12} job {ids[name]}{waits}: {job.folders[0]}  (log: {log_file(job, ids[name])})")
    if not args.dry_run:
        print(f"  queue: squeue -j {','.join(ids.values())}    cancel all: scancel {' '.join(ids.values())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    fit_args = list(args.fit_args)
    if fit_args and fit_args[0] == "--":
        fit_args = fit_args[1:]
    if fit_args and fit_args[0] == "fit":
        fit_args = fit_args[1:]
    try:
        if args.recipe:
            if fit_args or args.sweep:
                parser.error("--recipe takes its stages' arguments from the recipe: no -- arguments or --sweep")
            return submit_recipe(args, argv)
        if not fit_args:
            parser.error("give the ldm fit arguments after --, e.g. ldm submit --gpus-per-node 1 -- -c my.yaml")
        return submit_fit(args, fit_args, argv)
    except (SubmitError, ValueError) as e:
        print(f"ldm submit: error: {e}", file=sys.stderr)
        return 2
