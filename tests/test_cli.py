"""The `ldm` command: config validation, composition, run folders, loggers, tools."""

import csv
import json

import pytest
import torch
import yaml

from ldm.cli import main
from tests.conftest import REPO, run_ldm

TOY = str(REPO / "tests/configs/toy.yaml")
DEBUG = str(REPO / "configs/trainer/debug.yaml")


def _shards(shapes_dir):
    return [f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar"]


def _fails(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0
    return capsys.readouterr().err


def test_unknown_key_is_rejected_naming_the_key(shapes_dir, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    chanels: 4\n")
    err = _fails(["fit", "-c", TOY, "-c", str(bad), *_shards(shapes_dir)], capsys)
    assert "model.init_args.chanels: unknown key (not a parameter of tests.toy.ToySystem)" in err


def test_unknown_trainer_key_on_the_command_line(shapes_dir, capsys):
    err = _fails(["fit", "-c", TOY, *_shards(shapes_dir), "--trainer.max_stepz=3"], capsys)
    assert "max_stepz" in err


def test_wrong_type_is_rejected_naming_the_key(shapes_dir, capsys, tmp_path):
    err = _fails(["fit", "-c", TOY, *_shards(shapes_dir), "--data.init_args.batch_size=eight"], capsys)
    assert "data.init_args.batch_size: Expected a <class 'int'>. Got value: eight" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    lr: fast\n")
    err = _fails(["fit", "-c", TOY, "-c", str(bad), *_shards(shapes_dir)], capsys)
    assert "model.init_args.lr: Expected a <class 'float'>. Got value: fast" in err


def test_missing_shard_path_is_rejected_before_anything_is_built(capsys, tmp_path):
    err = _fails(["fit", "-c", TOY, f"--data.train={tmp_path}/train-{{000000..000003}}.tar"], capsys)
    assert f"data.init_args.train: shard pattern '{tmp_path}/train-{{000000..000003}}.tar': 4 of 4 shard files " \
           f"do not exist: {tmp_path}/train-000000.tar" in err


def test_missing_config_file(capsys, tmp_path):
    err = _fails(["fit", "-c", str(tmp_path / "nope.yaml")], capsys)
    assert "nope.yaml" in err


def test_configs_compose_left_to_right_and_overrides_win(shapes_dir, capsys, tmp_path):
    second = tmp_path / "second.yaml"
    second.write_text("model:\n  init_args:\n    channels: 5\ntrainer:\n  max_steps: 7\n")
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", DEBUG, "-c", TOY, "-c", str(second), *_shards(shapes_dir),
              "--model.init_args.lr=0.5", "--print_config"])
    assert exc.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["accelerator"] == "cpu"  # from the debug preset
    assert config["trainer"]["max_steps"] == 7  # the later file wins
    assert config["model"]["init_args"]["channels"] == 5
    assert config["model"]["init_args"]["lr"] == 0.5  # the command line wins
    assert config["data"]["init_args"]["train"].endswith("train-*.tar")
    assert config["run"]["name"] == "toy" and config["run"]["tags"] == ["debug"]


def test_help_lists_subcommands_and_tools(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for word in ("fit", "validate", "test", "ldm shards"):
        assert word in out
    with pytest.raises(SystemExit):
        main(["shards", "--help"])
    out = capsys.readouterr().out
    assert "synthetic" in out and "from-folder" in out and "preview" in out


def test_fit_writes_the_run_folder_with_wandb_offline(shapes_dir, tmp_path):
    res = run_ldm(["fit", "-c", DEBUG, "-c", TOY, *_shards(shapes_dir), "--trainer.max_steps=12",
                   "--run.tags=[debug,cli-test]"], cwd=tmp_path, WANDB_MODE="offline")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs/toy/version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 12 and saved["run"]["tags"] == ["debug", "cli-test"]
    assert list((run / "checkpoints").glob("*.ckpt"))
    # the weights of the last step, whatever the epoch and validation checkpoints hold
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 12
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 2 and losses[-1] < losses[0]  # the toy model learns
    assert any(r.get("data/skipped_train") == "0.0" for r in rows)
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    records = next(offline[0].glob("*.wandb")).read_bytes()  # protobuf records; strings are stored as is
    assert b"cli-test" in records  # tags from the config
    assert b"shuffle_buffer" in records and b"samples_per_epoch" in records  # the resolved config (ConfigSaver)
    assert res.stderr.count("wandb sync") >= 1 and "W&B is logging offline" in res.stderr
    assert res.stderr.count("W&B is logging offline") == 1  # said once

    # a second run gets the next version; WANDB_MODE=disabled is respected
    res = run_ldm(["fit", "-c", DEBUG, "-c", TOY, *_shards(shapes_dir), "--trainer.max_steps=2"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "runs/toy/version_1/config.yaml").is_file()
    assert not (tmp_path / "runs/toy/version_1/wandb").exists()


def test_slurm_job_id_names_the_version_and_resume_appends_metrics(shapes_dir, tmp_path):
    args = ["fit", "-c", DEBUG, "-c", TOY, *_shards(shapes_dir), "--run.name=req", "--trainer.max_steps=5",
            "--trainer.log_every_n_steps=1"]
    assert run_ldm(args, cwd=tmp_path, SLURM_JOB_ID="4242").returncode == 0
    run = tmp_path / "runs/req/slurm_4242"
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    first = len(list(csv.DictReader(open(run / "metrics.csv"))))
    res = run_ldm([*args, "--trainer.max_steps=9", f"--ckpt_path={ckpt}"], cwd=tmp_path, SLURM_JOB_ID="4242")
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv"))]
    assert len(steps) > first and max(steps) == 8  # the first attempt's rows are kept


def test_shards_tools_end_to_end(tmp_path):
    res = run_ldm(["shards", "synthetic", "--out", "d", "--train", "12", "--val", "4", "--size", "32", "--quiet"],
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    stats = json.loads((tmp_path / "d/stats.json").read_text())
    assert stats["splits"]["train"]["samples"] == 12 and stats["splits"]["val"]["samples"] == 4
    res = run_ldm(["shards", "preview", "--shards", "d/val-*.tar", "--out", "p.png", "--n", "4"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    from PIL import Image

    assert Image.open(tmp_path / "p.png").size[0] > 2 * 160  # a 2x2 grid of 160 px cells
    res = run_ldm(["shards", "synthetic", "--out", "d", "--size", "16"], cwd=tmp_path)
    assert res.returncode == 2 and "between 32 and 256" in res.stderr


def test_a_later_override_replaces_a_missing_shard_path(shapes_dir, capsys):
    # configs/data/shapes.yaml names data/shapes/..., which need not exist when overridden
    from ldm.cli import LDMCLI

    cli = LDMCLI(args=["-c", str(REPO / "configs/data/shapes.yaml"), "-c", TOY, *_shards(shapes_dir)], run=False)
    assert str(cli.datamodule.train_pattern) == f"{shapes_dir}/train-*.tar"


def test_relative_shard_paths_in_config_files_are_relative_to_the_working_dir(capsys, tmp_path, monkeypatch):
    from ldm.data.synthetic import write_synthetic_shards

    write_synthetic_shards(tmp_path / "data/shapes", train=16, val=2, size=32, progress=False)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/data.yaml").write_text(
        "data:\n  init_args:\n    train: data/shapes/train-*.tar\n    val: data/shapes/val-{000000..000000}.tar\n")
    monkeypatch.chdir(tmp_path)
    from ldm.cli import LDMCLI

    cli = LDMCLI(args=["-c", TOY, "-c", "configs/data.yaml"], run=False)  # checks the shard files, builds
    assert str(cli.datamodule.train_pattern) == "data/shapes/train-*.tar"
    assert len(cli.datamodule.train_stream().urls) == 1
