"""``ldm submit`` without a cluster: the scripts it writes, sweeps, recipes and their errors.
(``make test-slurm`` submits them to a real local Slurm cluster.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ldm.slurm.recipe import load_recipe
from ldm.slurm.script import Allocation
from ldm.slurm.submit import SubmitError, next_number, read_sweep
from ldm.tools.submit import main
from tests.conftest import REPO

FIT = ["-c", "configs/trainer/debug.yaml", "-c", "configs/contrastive/clip-debug.yaml",
       "--data.train=data/x/train-*.tar", "--data.val=data/x/val-*.tar"]


def _dry_run(capsys, *args: str) -> str:
    assert main(["--dry-run", *args]) == 0
    return capsys.readouterr().out


def test_the_allocation_comes_after_the_users_arguments_and_wins(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    out = _dry_run(capsys, "--nodes", "2", "--gpus-per-node", "8", "--time", "24:00:00", "--partition", "P",
                   "--account", "A", "--qos", "Q", "--constraint", "h100", "--", *FIT, "--trainer.devices=1",
                   f"--run.root={tmp_path}")
    for line in ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=24:00:00", "--partition=P",
                 "--account=A", "--qos=Q", "--constraint=h100", "--signal=USR1@90", "--requeue", "--open-mode=append",
                 "--cpus-per-task=3"]:  # clip-debug: 2 loader workers + the training process
        assert f"#SBATCH {line}\n" in out, line
    launch = next(line for line in out.splitlines() if line.startswith("srun"))
    # the user's --trainer.devices=1 is in COMMAND; the allocation's own arguments follow it on the srun line
    assert launch.endswith('"${COMMAND[@]}" "${RUN[@]}" --trainer.accelerator=gpu '
                           "--trainer.devices=${SLURM_NTASKS_PER_NODE} --trainer.num_nodes=${SLURM_JOB_NUM_NODES} "
                           "--trainer.strategy=ddp"), launch
    assert f"--output={tmp_path}/clip-debug/version_0/slurm-%j.out" in out  # the preset names the run
    assert not (tmp_path / "clip-debug").exists()  # a dry run creates nothing
    script = tmp_path / "s.sh"
    script.write_text(out.split("\n", 1)[1])
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_a_sweep_is_an_array_with_one_run_folder_per_line(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    sweep = tmp_path / "sweep.txt"
    lr = "--model.init_args.optimizer.init_args.lr"
    sweep.write_text(f"# two learning rates\n{lr}=1e-3\n\n{lr}=1e-4 --seed_everything=2\n")
    (tmp_path / "runs/clip/sweep_0-0").mkdir(parents=True)  # an earlier sweep
    out = _dry_run(capsys, "--no-check", "--sweep", str(sweep), "--max-parallel", "1", "--", *FIT,
                   f"--run.root={tmp_path}/runs", "--run.name=clip")
    assert "#SBATCH --array=0-1%1\n" in out
    assert f"#SBATCH --output={tmp_path}/runs/clip/sweep_1-%a/slurm-%A_%a.out" in out
    assert f"  0) RUN=({lr}=1e-3 --run.root={tmp_path}/runs --run.name=clip --run.version=sweep_1-0) ;;" in out
    assert f"  1) RUN=({lr}=1e-4 --seed_everything=2 " in out
    assert "--trainer.strategy" not in out  # one process per run: no DDP


def test_sweep_and_recipe_errors_name_the_line_or_key(tmp_path):
    bad = tmp_path / "sweep.txt"
    bad.write_text("--model.init_args.optimizer.init_args.lr=1e-3\nmodel.init_args.optimizer.init_args.lr=1e-4\n")
    with pytest.raises(SubmitError, match=r"sweep.txt:2: .*not 'model.init_args.optimizer.init_args.lr=1e-4'"):
        read_sweep(bad)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nstages:\n  a: {fit: ['--x=${b}']}\n  b: {run: [shards, '${nope}']}\n")
    with pytest.raises(SubmitError, match=r"stages.b: \$\{nope\} is neither a stage nor a var"):
        load_recipe(recipe)
    recipe.write_text("name: r\nstages:\n  a: {fit: ['--x=${b}']}\n  b: {run: [shards, '${a}']}\n")
    with pytest.raises(SubmitError, match="cycle: a -> b -> a"):
        load_recipe(recipe)
    recipe.write_text("name: r\nvars: {steps: 5}\nstages:\n  a: {fit: ['--s=${steps}'], slurm: {gpu: 1}}\n")
    with pytest.raises(SubmitError, match="--var step: the recipe has no such var"):
        load_recipe(recipe, {"step": "1"})
    with pytest.raises(ValueError, match="unknown SLURM setting 'gpu'"):
        Allocation().updated(load_recipe(recipe).stages["a"].slurm)


def test_the_demo_recipe_chains_its_stages_and_wires_their_folders(capsys, monkeypatch, tmp_path):
    recipe = load_recipe(REPO / "configs/recipes/shapes-demo.yaml", {"ae_steps": "7"})
    assert recipe.order() == ["shards", "autoencoder", "clip", "embeddings", "latents", "ldm", "prior", "decoder"]
    assert recipe.dependencies("ldm") == ["latents", "autoencoder", "clip"]
    assert recipe.dependencies("prior") == ["embeddings"]
    args = recipe.resolve("version_3")
    ae = str(Path("runs").absolute() / "shapes-demo/autoencoder/version_3")
    assert f"--model.init_args.first_stage.init_args.checkpoint={ae}" in args["ldm"]
    assert "--trainer.max_steps=7" in args["autoencoder"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    out = _dry_run(capsys, "--no-check", "--recipe", "configs/recipes/shapes-demo.yaml", "--partition", "cpu")
    assert "# ---- stage ldm (sbatch --dependency=afterok:<latents>:<autoencoder>:<clip>)" in out
    assert out.count("#SBATCH --partition=cpu") == 8
    assert out.count("#SBATCH --signal=USR1@90") == 5  # the fit stages; tools are not signalled
    assert load_recipe(REPO / "configs/recipes/sd-256.yaml").order() == ["autoencoder", "latents", "ldm"]


def test_an_invalid_fit_config_is_refused_before_anything_is_submitted(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    assert main(["--", *FIT, "--model.init_args.optimizer.init_args.lr=fast", f"--run.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "ldm submit: error: the ldm fit arguments are not valid" in err and "optimizer.init_args.lr" in err
    assert not any(tmp_path.iterdir())


def test_next_number_counts_versions_and_sweeps(tmp_path):
    for name in ["version_0", "version_4", "sweep_2-0", "sweep_2-1", "other"]:
        (tmp_path / name).mkdir()
    assert next_number(tmp_path, "version_") == 5 and next_number(tmp_path, "sweep_") == 3
    assert next_number(tmp_path / "missing", "version_") == 0
