"""ldm eval logs its report to W&B: a job_type=eval run in the evaluated run's group, with the checkpoint as its
input artifact, the metrics as its summary, the guidance sweep as a table and the grids as images (read back
from the offline run's transaction log)."""

from __future__ import annotations

import pytest
import yaml

from ldm.tools.eval_wandb import eval_wandb_mode
from tests.conftest import run_ldm
from tests.test_wandb_dashboard import wandb_records


@pytest.mark.slow  # make test-all (keeps make test within its 15 minutes)
def test_eval_logs_an_eval_run_with_its_lineage(ldm_run, inception_file, tmp_path):
    args = ["eval", "--ckpt", ldm_run.run_dir, "--num-images", "4", "--steps", "2", "--guidance-sweep", "1,3",
            "--batch-size", "4", "--no-clip", "--inception", str(inception_file), "--quiet", "--out", "e",
            "--wandb", "offline"]
    done = run_ldm(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (log,) = (tmp_path / "e").glob("wandb/offline-run-*/run-*.wandb")
    records = [(r.WhichOneof("record_type"), r) for r in wandb_records(log)]
    run = next(r.run for k, r in records if k == "run")
    config = yaml.safe_load(open(f"{ldm_run.run_dir}/config.yaml").read())
    assert run.job_type == "eval" and run.run_group == (config["run"].get("group") or config["run"]["name"])
    artifacts = [r.artifact for k, r in records if k == "artifact"]
    (used,) = [a for a in artifacts if a.use_after_commit]  # the input: the evaluated checkpoint
    assert used.type == "model" and used.manifest.contents[0].ref.endswith("last.ckpt")
    assert {a.type for a in artifacts if not a.use_after_commit} == {"eval_report", "run_table"}  # (W&B stores a table as an artifact)
    summary = {i.key or "/".join(i.nested_key) for k, r in records if k == "summary" for i in r.summary.update}
    history = {i.key or "/".join(i.nested_key) for k, r in records if k == "history" for i in r.history.item}
    assert {"eval/fid", "eval/kid", "eval/compositional/all_correct"} <= summary  # the main guidance scale's
    assert {"eval/guidance_sweep/nrows", "eval/samples/_type", "eval/guidance_sweep_plot/_type"} <= history
    rows = next(i for k, r in records if k == "history" for i in r.history.item
                if "/".join(i.nested_key) == "eval/guidance_sweep/nrows")
    assert rows.value_json == "2"  # one row per guidance scale

def test_eval_follows_the_evaluated_runs_mode(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    assert eval_wandb_mode({"run": {"wandb_mode": "disabled"}}) == "disabled"
    assert eval_wandb_mode({"run": {"wandb_mode": "offline"}}) == "offline"
    assert eval_wandb_mode({"run": {"wandb_mode": "disabled"}}, "offline") == "offline"  # the flag wins
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert eval_wandb_mode({"run": {"wandb_mode": "offline"}}) == "disabled"  # as ldm fit: the environment wins
