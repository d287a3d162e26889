"""Recipes: a multi-stage experiment as SLURM jobs chained by their dependencies.

A recipe file (``configs/recipes/*.yaml``)::

    name: shapes-demo              # <root>/<name>/<stage>/version_<N>/ for every stage; the W&B group
    root: runs                     # optional
    vars: {data: data/shapes}      # ${data} anywhere below
    slurm: {time: "01:00:00"}      # allocation of every stage (ldm submit's options override it)
    stages:
      autoencoder:
        fit: [-c, configs/trainer/debug.yaml, -c, configs/autoencoder/kl-f4-debug.yaml,
              "--data.train=${data}/train-*.tar"]
      latents:
        run: [precompute, latents, --ckpt, "${autoencoder}", --shards, "${data}/*-*.tar", --out, "${latents}"]
        slurm: {gpus_per_node: 1}  # this stage's own allocation (wins over everything)
      ldm:
        fit: [-c, ..., "--data.train=${latents}/train-*.tar",
              "--model.init_args.first_stage.init_args.checkpoint=${autoencoder}"]

``${stage}`` is that stage's folder: the run folder of an ``ldm fit`` stage, the output folder of a
tool stage (``run:``, any ``ldm`` tool subcommand). A stage waits (``--dependency=afterok``) for
every stage it names, plus those listed in its ``after:``; stages that name none of each other run
in parallel. A ``${...}`` that is neither a stage nor a var is an error naming the stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ldm.slurm.submit import SubmitError

_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_-]*)\}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass
class Stage:
    name: str
    kind: str  # "fit" or "run" (a tool subcommand)
    args: list[str]
    slurm: dict[str, Any] = field(default_factory=dict)
    after: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    name: str
    root: str
    stages: dict[str, Stage]
    slurm: dict[str, Any]
    vars: dict[str, str]

    def folder(self, stage: str, version: str) -> Path:
        return Path(self.root).absolute() / self.name / stage / version

    def resolve(self, version: str) -> dict[str, list[str]]:
        """Every stage's arguments with ``${...}`` replaced (stages by their folder, vars by their value)."""
        values = {**self.vars, **{s: str(self.folder(s, version)) for s in self.stages}}
        return {name: [_REFERENCE.sub(lambda m: values[m.group(1)], a) for a in stage.args]
                for name, stage in self.stages.items()}

    def order(self) -> list[str]:
        """The stages, each after the stages it depends on (a cycle is an error naming it)."""
        done: list[str] = []
        visiting: list[str] = []

        def visit(name: str) -> None:
            if name in done:
                return
            if name in visiting:
                cycle = " -> ".join([*visiting[visiting.index(name):], name])
                raise SubmitError(f"recipe {self.name}: the stages depend on each other in a cycle: {cycle}")
            visiting.append(name)
            for dep in self.dependencies(name):
                visit(dep)
            visiting.pop()
            done.append(name)

        for name in self.stages:
            visit(name)
        return done

    def dependencies(self, name: str) -> list[str]:
        stage = self.stages[name]
        named = [m.group(1) for a in stage.args for m in _REFERENCE.finditer(a)]
        deps = [d for d in [*named, *stage.after] if d in self.stages and d != name]
        return list(dict.fromkeys(deps))


def load_recipe(path: str | Path, overrides: dict[str, str] | None = None) -> Recipe:
    """Read and check a recipe file; ``overrides`` replace values of its ``vars`` (``ldm submit --var``). Every
    problem is a :class:`SubmitError` naming the file and key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SubmitError(f"cannot read recipe {path}: {e}") from None
    where = f"recipe {path}"
    unknown = set(raw) - {"name", "root", "vars", "slurm", "stages"}
    if unknown:
        raise SubmitError(f"{where}: unknown key(s) {sorted(unknown)} (known: name, root, vars, slurm, stages)")
    name = str(raw.get("name") or path.stem)
    if not _NAME.fullmatch(name):
        raise SubmitError(f"{where}: name {name!r} must be letters, digits, '-' or '_'")
    variables = {str(k): str(v) for k, v in (raw.get("vars") or {}).items()}
    for key, value in (overrides or {}).items():
        if key not in variables:
            raise SubmitError(f"{where}: --var {key}: the recipe has no such var (vars: {', '.join(variables) or 'none'})")
        variables[key] = value
    stages: dict[str, Stage] = {}
    for stage_name, spec in (raw.get("stages") or {}).items():
        key = f"{where}: stages.{stage_name}"
        if not _NAME.fullmatch(str(stage_name)):
            raise SubmitError(f"{key}: a stage name is letters, digits, '-' or '_'")
        if not isinstance(spec, dict):
            raise SubmitError(f"{key}: expected a mapping with fit: or run:")
        bad = set(spec) - {"fit", "run", "slurm", "after"}
        if bad:
            raise SubmitError(f"{key}: unknown key(s) {sorted(bad)} (known: fit, run, slurm, after)")
        kinds = [k for k in ("fit", "run") if k in spec]
        if len(kinds) != 1:
            raise SubmitError(f"{key}: give exactly one of fit: (ldm fit arguments) or run: (an ldm tool command)")
        args = spec[kinds[0]]
        if not isinstance(args, list) or not all(isinstance(a, (str, int, float)) for a in args):
            raise SubmitError(f"{key}.{kinds[0]}: expected a list of arguments")
        if stage_name in variables:
            raise SubmitError(f"{key}: a stage and a var share the name {stage_name!r}")
        stages[str(stage_name)] = Stage(str(stage_name), kinds[0], [str(a) for a in args],
                                        dict(spec.get("slurm") or {}), [str(a) for a in spec.get("after") or []])
    if not stages:
        raise SubmitError(f"{where}: no stages")
    for stage in stages.values():
        for arg in stage.args:
            for m in _REFERENCE.finditer(arg):
                if m.group(1) not in stages and m.group(1) not in variables:
                    raise SubmitError(f"{where}: stages.{stage.name}: ${{{m.group(1)}}} is neither a stage nor a "
                                      f"var (stages: {', '.join(stages)}; vars: {', '.join(variables) or 'none'})")
        for dep in stage.after:
            if dep not in stages:
                raise SubmitError(f"{where}: stages.{stage.name}.after: no stage {dep!r}")
    recipe = Recipe(name, str(raw.get("root") or "runs"), stages, dict(raw.get("slurm") or {}), variables)
    recipe.order()  # a cycle fails here, before anything is submitted
    return recipe
