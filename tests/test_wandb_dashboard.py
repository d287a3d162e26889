"""W&B as the dashboard: job type and group, config / checkpoint artifacts, lineage, monitors, summaries, sweeps.

The end-to-end test trains a two-stage chain offline (a debug CLIP, then a run that builds on it) and reads the
offline runs back from their transaction logs (``run-<id>.wandb``: W&B's LevelDB-style log of ``Record`` protos).
"""

from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ldm.runs import RunSettings, checkpoint_to_log, config_inputs, model_artifact_name, resolve_group, stage_of
from tests.conftest import REPO, run_ldm

DEBUG = str(REPO / "configs/trainer/debug.yaml")


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of
    chunks (CRC32, length, type: full / first / middle / last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, records, parts = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or the last chunk of a record
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def offline_run(run_dir: Path) -> dict:
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(log)
    kinds = [(r.WhichOneof("record_type"), r) for r in records]
    return {
        "run": next(r.run for k, r in kinds if k == "run"),
        "artifacts": [r.artifact for k, r in kinds if k == "artifact"],
        "metrics": {r.metric.name or r.metric.glob_name: r.metric for k, r in kinds if k == "metric"},
        "history": {i.key or "/".join(i.nested_key) for k, r in kinds if k == "history" for i in r.history.item},
    }


# ---- unit tests -------------------------------------------------------------------------------------------


def test_job_type_is_the_stage_and_group_the_recipe_or_the_name():
    from ldm.systems import AutoencoderSystem, ContrastiveSystem, DiffusionPrior, LatentDiffusion

    stages = [cls.stage for cls in (AutoencoderSystem, ContrastiveSystem, DiffusionPrior, LatentDiffusion)]
    assert stages == ["autoencoder", "contrastive", "prior", "latent_diffusion"]

    class ToyThing:
        pass

    class Ldm:
        stage = "latent_diffusion"

        def __init__(self, vector):
            self.conditioner = SimpleNamespace(vector=vector)

    assert stage_of(ToyThing()) == "toy_thing"
    assert stage_of(Ldm(None)) == stage_of(Ldm("text")) == "latent_diffusion"
    assert stage_of(Ldm("clip_image")) == "decoder"  # unCLIP's decoder
    assert resolve_group(RunSettings(name="clip"), "clip") == "clip"
    assert resolve_group(RunSettings(name="clip", group="shapes-demo"), "clip") == "shapes-demo"


def test_recipe_stages_get_the_recipe_group_and_their_upstream_runs():
    from ldm.slurm.recipe import load_recipe
    from ldm.tools.submit import upstream_fits

    recipe = load_recipe(REPO / "configs/recipes/shapes-demo.yaml")
    assert upstream_fits(recipe, "prior") == ["clip"]  # through the embeddings it trains on
    assert sorted(upstream_fits(recipe, "ldm")) == ["autoencoder", "clip"]
    assert upstream_fits(recipe, "autoencoder") == []


def test_checkpoint_policy(tmp_path):
    last, best = tmp_path / "last.ckpt", tmp_path / "best-step=5.ckpt"
    last.write_bytes(b"l")
    best.write_bytes(b"b")
    assert checkpoint_to_log("last", last, best) == (last, ["latest"])
    assert checkpoint_to_log("best", last, best) == (best, ["best", "latest"])
    assert checkpoint_to_log("best", last, None) == (last, ["latest"])  # a stage without a validation metric
    assert checkpoint_to_log("none", last, best) is None


def test_inputs_are_the_runs_a_config_loads(tmp_path):
    ae, clip, extra = (tmp_path / n for n in ("ae", "clip", "extra"))
    for folder in (ae, clip, extra):
        folder.mkdir()
    config = {"model": {"init_args": {
        "first_stage": {"init_args": {"checkpoint": str(ae)}},
        "conditioner": {"init_args": {"text_encoder": {"init_args": {"checkpoint": str(clip)}}}},
        "unet": {"init_args": {"checkpoint": str(tmp_path / "missing")}}}},
        "trainer": {"callbacks": [{"init_args": {"clip_checkpoint": str(clip)}}]},
        "run": {"inputs": [str(extra)]}, "ckpt_path": str(ae)}
    assert config_inputs(config) == [str(ae), str(clip), str(extra)]
    (ae / "wandb_id").write_text("abc123\n")
    assert model_artifact_name(ae) == "model-abc123"
    assert model_artifact_name(clip) == f"model-{tmp_path.name}-clip"


def test_the_sweep_template_runs_ldm_fit_with_the_agents_arguments(capsys, monkeypatch):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    from ldm.cli import main

    sweep = yaml.safe_load((REPO / "configs/sweeps/ldm-debug.yaml").read_text())
    assert sweep["metric"] == {"name": "val/loss", "goal": "minimize"}
    trial = {"model.init_args.optimizer.init_args.lr": 0.00123, "model.init_args.cond_drop": 0.2,
             "data.init_args.batch_size": 16}
    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in trial.items()}})["args"]
    command = [a for c in sweep["command"] for a in (args if c == "${args}" else [c]) if c != "${env}"]
    assert command[:2] == ["ldm", "fit"]
    monkeypatch.chdir(REPO)  # the agent runs from the repository root
    with pytest.raises(SystemExit):
        main([*command[1:], "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.00123
    assert config["model"]["init_args"]["cond_drop"] == 0.2 and config["data"]["init_args"]["batch_size"] == 16


# ---- a two-stage chain, offline ----------------------------------------------------------------------------


@pytest.mark.slow  # make test-all (keeps make test within its 15 minutes)
def test_offline_runs_hold_stage_group_artifacts_lineage_monitors_and_summaries(shapes_dir, tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
           "WANDB_DATA_DIR": str(tmp_path / "data"), "WANDB_CONFIG_DIR": str(tmp_path / "config"),
           "WANDB_SILENT": "true"}
    shards = [f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar",
              "--data.num_workers=0", "--trainer.enable_progress_bar=false", "--run.group=demo-recipe"]
    clip = run_ldm(["fit", "-c", DEBUG, "-c", str(REPO / "configs/contrastive/clip-debug.yaml"), *shards,
                    "--data.image_size=32", "--data.batch_size=16", "--trainer.max_steps=12",
                    "--trainer.val_check_interval=1.0", "--trainer.limit_val_batches=1"], cwd=tmp_path, **env)
    assert clip.returncode == 0, clip.stderr[-3000:]
    clip_dir = tmp_path / "runs/clip-debug/version_0"
    # the second stage builds on the first (as the prior on the CLIP of its embeddings: run.inputs)
    toy = run_ldm(["fit", "-c", DEBUG, "-c", str(REPO / "tests/configs/toy.yaml"), *shards, "--trainer.max_steps=4",
                   f"--run.inputs=[{clip_dir}]", "--run.log_checkpoints=none"], cwd=tmp_path, **env)
    assert toy.returncode == 0, toy.stderr[-3000:]

    first = offline_run(clip_dir)
    assert (first["run"].job_type, first["run"].run_group) == ("contrastive", "demo-recipe")
    by_type = {a.type: a for a in first["artifacts"]}
    run_id = first["run"].run_id
    assert by_type["config"].name == f"config-{run_id}"
    assert [e.path for e in by_type["config"].manifest.contents] == ["config.yaml"]
    model = by_type["model"]
    assert model.name == f"model-{run_id}" and list(model.aliases) == ["latest"] and not model.use_after_commit
    assert [e.path for e in model.manifest.contents] == ["model.ckpt"]
    # monitors: learning rate, throughput, gradient norm, the CLIP temperature
    history = first["history"]
    assert any(k.startswith("lr-AdamW") for k in history)
    assert {"train/device/samples_per_sec", "train/grad_norm", "train/logit_scale", "train/temperature"} <= history
    summaries = first["metrics"]
    assert summaries["val/loss"].summary.min and summaries["eval/fid"].summary.min
    assert summaries["eval/fd_clip"].summary.min
    assert summaries["val/i2t_R@1"].summary.max and summaries["val/t2i_R@1"].summary.max
    assert summaries["val/loss"].step_metric == "trainer/global_step"

    second = offline_run(tmp_path / "runs/toy/version_0")
    assert (second["run"].job_type, second["run"].run_group) == ("toy_system", "demo-recipe")
    (used,) = [a for a in second["artifacts"] if a.use_after_commit]  # the input: the CLIP's checkpoint
    assert used.name == model.name and used.type == "model"
    assert used.manifest.contents[0].ref == (clip_dir / "checkpoints/last.ckpt").resolve().as_uri()
    assert used.digest == model.digest  # the same artifact version: W&B draws clip run -> model -> toy run
    assert not [a for a in second["artifacts"] if a.type == "model" and not a.use_after_commit]  # policy none
