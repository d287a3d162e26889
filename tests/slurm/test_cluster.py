"""``ldm submit``, preemption and requeue on a real Slurm cluster (``make test-slurm``: ``slurm/local-cluster.sh``
brings up munged, slurmctld and slurmd on this machine; one node, its CPUs).

- a 2-task CPU DDP job submitted with ``ldm submit`` trains in one run folder that keeps its script and log;
- the same job with ``scancel -s USR1`` mid-run (requeued by the trainer, resumed at the step it stopped)
  and then ``scontrol requeue`` (no warning: resumed from the newest checkpoint) trains exactly what the
  uninterrupted job trained, every step once in metrics.csv, one log holding all three attempts;
- a 2-line sweep is a job array: two run folders with their own overrides;
- the four-stage demo recipe runs as dependent jobs, each stage's folder wired into the next ones' configs.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ldm.checkpoints import checkpoint_step
from ldm.data.synthetic import write_synthetic_shards
from tests.conftest import REPO, ldm_env
from tests.training.test_resume import checkpoint_every

pytestmark = [pytest.mark.slurm]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if shutil.which("sbatch") is None or not os.environ.get("SLURM_CONF"):
        pytest.skip("no Slurm cluster: run `make test-slurm` (it starts slurm/local-cluster.sh)")
    info = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    if info.returncode != 0 or "idle" not in info.stdout and "mix" not in info.stdout:
        pytest.skip(f"the Slurm node is not up: {info.stdout.strip()} {info.stderr.strip()}")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(out, train=120, val=30, size=32, seed=3, shard_size=50, progress=False)
    return out


def submit(*args: str, cwd: Path = REPO) -> tuple[str, list[Path], str]:
    """``ldm submit ARGS``: (job id, run folders, output)."""
    result = subprocess.run([str(Path(sys.executable).with_name("ldm")), "submit", *args], cwd=cwd,
                            capture_output=True, text=True, env=ldm_env(SLURM_CONF=os.environ["SLURM_CONF"]), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ids = re.findall(r"submitted job (\d+)", result.stdout)
    folders = [Path(p) for p in re.findall(r"run folder (\S+)", result.stdout)]
    assert ids and folders, result.stdout
    return ids[0], folders, result.stdout


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    states = re.findall(r"JobState=(\S+)", out)
    if not states:
        return "GONE"
    return "RUNNING" if "RUNNING" in states else ("PENDING" if "PENDING" in states else states[0])


def wait(condition, what: str, timeout: float = 300, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_done(job: str, timeout: float = 300) -> str:
    return wait(lambda: (s := job_state(job)) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING",
                                                      "REQUEUED", "RESIZING", "SUSPENDED") and s,
                f"job {job} to end", timeout)


def train_losses(run: Path) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(open(run / "metrics.csv"))
            if r.get("train/loss")]


def toy(shards: Path, root: Path, *extra: str) -> list[str]:
    return ["-c", "configs/trainer/debug.yaml", "-c", "tests/configs/toy.yaml", f"--data.train={shards}/train-*.tar",
            f"--data.val={shards}/val-*.tar", "--data.samples_per_epoch=48", "--data.num_workers=1",
            "--data.crop=random", "--data.shuffle_buffer=20", "--trainer.val_check_interval=3",
            "--trainer.limit_val_batches=1", "--seed_everything=7", "--trainer.max_steps=40", "--trainer.max_epochs=-1",
            "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", f"--run.root={root}", "--run.name=toy",
            *extra]


ALLOC = ["--ntasks-per-node", "2", "--cpus-per-task", "1", "--time", "00:10:00"]


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    job, (run,), out = submit(*ALLOC, "--", *toy(shards, root))
    assert f"follow:  tail -F {run}/slurm-{job}.out" in out
    assert wait_done(job) == "COMPLETED", (run / f"slurm-{job}.out").read_text()[-3000:]
    return run


def test_a_two_task_cpu_ddp_job_through_ldm_submit(uninterrupted):
    run = uninterrupted
    job = (run / "slurm_job").read_text().strip()
    script = (run / "submit.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --signal=USR1@90" in script
    assert "#SBATCH --requeue" in script and "#SBATCH --open-mode=append" in script
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert int(config["trainer"]["devices"]) == 2 and config["trainer"]["strategy"] == "ddp"  # the allocation won
    assert config["trainer"]["accelerator"] == "cpu"
    assert [s for s, _ in train_losses(run)] == list(range(40))
    log = (run / f"slurm-{job}.out").read_text()
    assert f"ldm: job {job} (attempt 1)" in log


def test_usr1_then_scontrol_requeue_lose_nothing(shards, uninterrupted, tmp_path):
    """Attempt 1 gets USR1 after step 10 (checkpoint, requeue by the trainer); attempt 2 resumes from it and is
    requeued with ``scontrol requeue`` after step 25 (SIGTERM: checkpoint, no requeue of its own); attempt 3
    resumes from the newest checkpoint and finishes. The losses equal the uninterrupted job's, step for step."""
    job, (run,), _ = submit(*ALLOC, "--", *toy(shards, tmp_path, "--model.init_args.step_seconds=0.3",
                                                *checkpoint_every(5)))
    log = run / f"slurm-{job}.out"
    wait(lambda: (run / "checkpoints/at-step=10.ckpt").exists(), "step 10", timeout=240)
    subprocess.run(["scancel", "-s", "USR1", job], check=True)
    hpc = wait(lambda: sorted(run.glob("hpc_ckpt_*.ckpt")), "the preemption checkpoint", timeout=60)[0]
    first_stop = checkpoint_step(hpc)
    assert 10 <= first_stop < 20, first_stop
    wait(lambda: "(attempt 2)" in log.read_text(), "the requeued job to start", timeout=120)
    wait(lambda: (run / "checkpoints/at-step=25.ckpt").exists(), "step 25 of attempt 2", timeout=240)
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait(lambda: "(attempt 3)" in log.read_text(), "the job requeued by scontrol to start", timeout=180)
    assert wait_done(job, timeout=300) == "COMPLETED", log.read_text()[-3000:]

    text = log.read_text()
    assert f"resuming from {hpc}" in text  # attempt 2: the USR1 checkpoint
    resumed = list(dict.fromkeys(re.findall(r"resuming from (\S+), the newest", text)))  # one line per rank
    assert len(resumed) == 2, resumed
    newest = Path(resumed[1])
    # attempt 3 resumed at or after step 25 (SIGTERM checkpoint or the periodic one), never the older hpc one
    assert "stopped by SIGTERM at step" in text or newest.name == "at-step=25.ckpt", text[-3000:]
    assert newest.name != hpc.name or "stopped by SIGTERM" in text
    rows = train_losses(run)
    assert [s for s, _ in rows] == list(range(40))  # every step once across three attempts
    assert dict(rows) == dict(train_losses(uninterrupted))  # bit for bit


def test_a_sweep_is_a_job_array_with_one_run_folder_per_line(shards, tmp_path):
    sweep = tmp_path / "lrs.txt"
    sweep.write_text("# learning rates\n--model.init_args.lr=0.02\n\n--model.init_args.lr=0.005 --trainer.max_steps=6\n")
    job, folders, out = submit("--ntasks-per-node", "1", "--cpus-per-task", "1", "--sweep", str(sweep), "--",
                               *toy(shards, tmp_path / "runs", "--trainer.max_steps=8"))
    assert [f.name for f in folders] == ["sweep_0-0", "sweep_0-1"], out
    assert f"submitted job {job}_1" in out
    assert wait_done(f"{job}_0") == "COMPLETED" and wait_done(f"{job}_1") == "COMPLETED"
    lrs = [yaml.safe_load((f / "config.yaml").read_text())["model"]["init_args"]["lr"] for f in folders]
    assert lrs == [0.02, 0.005]
    assert [len(train_losses(f)) for f in folders] == [8, 6]
    assert (folders[1] / f"slurm-{job}_1.out").is_file()


def test_the_demo_recipe_runs_as_dependent_jobs(tmp_path):
    """All eight stages of configs/recipes/shapes-demo.yaml (tiny: a few steps each) on the local cluster."""
    recipe = yaml.safe_load((REPO / "configs/recipes/shapes-demo.yaml").read_text())
    recipe["root"] = str(tmp_path / "runs")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    small = ["size=32", "train=96", "val=16", "ae_steps=3", "clip_steps=3", "ldm_steps=3", "prior_steps=3",
             "decoder_steps=3", "workers=0"]
    result = subprocess.run([str(Path(sys.executable).with_name("ldm")), "submit", "--recipe", str(path),
                             "--cpus-per-task", "1", "--no-check", *[a for v in small for a in ("--var", v)]],
                            cwd=REPO, capture_output=True, text=True, env=ldm_env(SLURM_CONF=os.environ["SLURM_CONF"]), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = dict(re.findall(r"^\s+(\w+)\s+job (\d+)", result.stdout, flags=re.M))
    assert list(jobs) == ["shards", "autoencoder", "clip", "embeddings", "latents", "ldm", "prior", "decoder"]
    dependency = subprocess.run(["scontrol", "-o", "show", "job", jobs["ldm"]], capture_output=True,
                                text=True).stdout
    assert f"afterok:{jobs['latents']}" in dependency
    for stage, job in jobs.items():
        folder = tmp_path / "runs/shapes-demo" / stage / "version_0"
        state = wait_done(job, timeout=600)
        assert state == "COMPLETED", (stage, state, next(folder.glob("slurm-*.out")).read_text()[-3000:])
    ldm = yaml.safe_load((tmp_path / "runs/shapes-demo/ldm/version_0/config.yaml").read_text())
    first_stage = ldm["model"]["init_args"]["first_stage"]["init_args"]["checkpoint"]
    assert first_stage == str(tmp_path / "runs/shapes-demo/autoencoder/version_0")
    assert (tmp_path / "runs/shapes-demo/decoder/version_0/checkpoints/last.ckpt").is_file()
    assert ldm["run"]["group"] == "shapes-demo"


def test_fit_sbatch_by_hand_follows_the_allocation_over_a_trainer_config(shards, tmp_path):
    """The finding's own command: `sbatch --ntasks-per-node=2 --gpus-per-node=0 slurm/fit.sbatch -c
    configs/trainer/debug.yaml ... --trainer.accelerator=cpu` failed on both tasks (devices=1 from the trainer
    config against 2 tasks); the template now puts the allocation after the user's arguments."""
    result = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                             "--time=00:10:00", f"--output={tmp_path}/slurm-%j.out", "slurm/fit.sbatch",
                             *toy(shards, tmp_path / "runs", "--trainer.max_steps=6"), "--trainer.accelerator=cpu"],
                            cwd=REPO, capture_output=True, text=True, env=ldm_env(SLURM_CONF=os.environ["SLURM_CONF"]))
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split(";")[0]
    assert wait_done(job) == "COMPLETED", (tmp_path / f"slurm-{job}.out").read_text()[-3000:]
    run = tmp_path / f"runs/toy/slurm_{job}"
    assert int(yaml.safe_load((run / "config.yaml").read_text())["trainer"]["devices"]) == 2
    assert [s for s, _ in train_losses(run)] == list(range(6))
