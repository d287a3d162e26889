"""Two CPU processes (gloo DDP) over shards with uneven sample counts: same batches, no hang."""

import json

import pytest

from ldm.data.synthetic import write_synthetic_shards
from tests.conftest import REPO, run_ldm


@pytest.mark.timeout(300)
def test_two_rank_ddp_on_uneven_shards_gets_equal_batches(tmp_path):
    for i, n in enumerate([37, 5, 81]):  # uneven shards: 123 training samples in all
        write_synthetic_shards(tmp_path / f"s{i}", train=n, val=0, size=32, seed=i, progress=False)
    write_synthetic_shards(tmp_path / "v", train=0, val=27, size=32, seed=9, shard_size=10, progress=False)
    record = tmp_path / "record"
    res = run_ldm([
        "fit", "-c", str(REPO / "configs/trainer/debug.yaml"), "-c", str(REPO / "tests/configs/toy.yaml"),
        f"--data.train={tmp_path}/s*/train-*.tar", f"--data.val={tmp_path}/v/val-*.tar",
        "--data.samples_per_epoch=100", "--data.num_workers=1", "--data.batch_size=8",
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=-1", "--trainer.max_epochs=2",
        "--trainer.limit_val_batches=1.0", f"--model.record={record}",
    ], cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]

    def load(split, rank, epoch):
        return json.loads((record / f"{split}-rank{rank}-epoch{epoch}.json").read_text())

    for epoch in (0, 1):
        r0, r1 = load("train", 0, epoch), load("train", 1, epoch)
        assert r0["world_size"] == r1["world_size"] == 2 and r0["pid"] != r1["pid"]
        assert len(r0["batches"]) == len(r1["batches"]) == 100 // (2 * 8)
        assert all(len(b) == 8 for b in r0["batches"] + r1["batches"])
        assert r0["batches"] != r1["batches"]  # the ranks draw different samples
        v0, v1 = load("val", 0, epoch), load("val", 1, epoch)
        assert len(v0["batches"]) == len(v1["batches"])
        keys = [k for b in v0["batches"] + v1["batches"] for k in b]
        assert sorted(keys) == [f"val_{i:08d}" for i in range(27)]  # every val sample once, over both ranks
    assert load("train", 0, 0)["batches"] != load("train", 0, 1)["batches"]  # a new draw each epoch
    assert (tmp_path / "runs/toy/version_0/config.yaml").is_file()
    assert not (tmp_path / "runs/toy/version_1").exists()  # both ranks wrote into one run folder


@pytest.mark.timeout(200)
def test_two_rank_fit_with_wandb_logging_finishes(tmp_path):
    """W&B on (offline, as every run without credentials): rank 0 alone saved the config to W&B through
    ``trainer.log_dir``, a collective, so its next broadcasts paired with other ones on rank 1 and the run hung
    before its first step (found by make test-slurm's requeue job; every DDP test ran with W&B disabled)."""
    write_synthetic_shards(tmp_path / "s", train=40, val=8, size=32, seed=1, progress=False)
    res = run_ldm([
        "fit", "-c", str(REPO / "configs/trainer/debug.yaml"), "-c", str(REPO / "tests/configs/toy.yaml"),
        f"--data.train={tmp_path}/s/train-*.tar", f"--data.val={tmp_path}/s/val-*.tar",
        "--data.samples_per_epoch=32", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=4",
        "--trainer.max_epochs=-1", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
    ], cwd=tmp_path, timeout=150, WANDB_MODE="offline")
    assert res.returncode == 0, res.stderr[-4000:]
    run = tmp_path / "runs/toy/version_0"
    assert (run / "checkpoints/last.ckpt").is_file() and (run / "config.yaml").is_file()
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run"


@pytest.mark.timeout(300)
def test_two_rank_contrastive_validation_equals_one_process(shapes_dir, tmp_path):
    """Retrieval recall over the validation split is gathered exactly: 2 ranks report what 1 process does."""
    import csv

    import pytorch_lightning as L

    from ldm.data import ShardDataModule
    from ldm.systems import load_system

    res = run_ldm([
        "fit", "-c", str(REPO / "configs/trainer/debug.yaml"), "-c", str(REPO / "configs/contrastive/clip-debug.yaml"),
        f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar", "--data.batch_size=8",
        "--data.val_batch_size=4", "--data.num_workers=0", "--trainer.strategy=ddp", "--trainer.devices=2",
        "--trainer.max_steps=-1", "--trainer.max_epochs=1", "--trainer.val_check_interval=1.0",
        "--trainer.limit_val_batches=1.0", "--trainer.log_every_n_steps=1",
    ], cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    run = tmp_path / "runs/clip-debug/version_0"
    logged = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val/i2t_R@5")][-1]
    system = load_system(run)
    dm = ShardDataModule(val=f"{shapes_dir}/val-*.tar", image_size=32, val_batch_size=7, num_workers=0,
                         tokenizer=system.tokenizer)
    single = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(system, dm, verbose=False)[0]
    for key in ("val/i2t_R@1", "val/i2t_R@5", "val/t2i_R@5", "val/t2i_R@10", "val/zero_shot/colour"):
        assert abs(float(logged[key]) - single[key]) < 1e-6, (key, logged[key], single[key])


# -- validation with a padding-only batch on one rank (3 samples, a batch of 1, 2 ranks) ------------------------------
def _last_validation(run, key: str) -> dict[str, float]:
    """The figures of the last row of ``metrics.csv`` that logged ``key``."""
    import csv

    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get(key)]
    assert rows, f"{key} was never logged"
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v != ""}


def single_process_validation(run, val_dir, val_batch_size: int) -> dict[str, float]:
    """One process validates the run's saved checkpoint on the same split (at another batch size)."""
    import pytorch_lightning as L

    from ldm.data import ShardDataModule
    from ldm.systems import load_system

    system = load_system(run)
    dm = ShardDataModule(val=f"{val_dir}/val-*.tar", image_size=32, val_batch_size=val_batch_size, num_workers=0,
                         tokenizer=getattr(system, "tokenizer", None))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return {k: float(v) for k, v in trainer.validate(system, dm, verbose=False)[0].items()}


def assert_same_figures(logged: dict[str, float], single: dict[str, float], keys: list[str]) -> None:
    for key in keys:
        assert key in logged and key in single, (key, sorted(logged), sorted(single))
        assert abs(logged[key] - single[key]) < 1e-5, (key, logged[key], single[key])


PADDED_VAL = ["--data.val_batch_size=1", "--data.num_workers=0", "--trainer.strategy=ddp", "--trainer.devices=2",
              "--trainer.max_epochs=-1", "--trainer.limit_val_batches=1.0", "--trainer.log_every_n_steps=1"]


@pytest.mark.timeout(300)
def test_two_rank_contrastive_validation_with_a_padding_only_batch(shapes_dir, three_val_dir, tmp_path):
    """Rank 1's last validation batch is all padding: no hang, and every figure (the loss over the whole split
    included) equals one process validating the saved checkpoint at another batch size."""
    res = run_ldm([
        "fit", "-c", str(REPO / "configs/trainer/debug.yaml"), "-c", str(REPO / "configs/contrastive/clip-debug.yaml"),
        f"--data.train={shapes_dir}/train-*.tar", f"--data.val={three_val_dir}/val-*.tar", "--data.batch_size=8",
        *PADDED_VAL, "--trainer.max_steps=2", "--trainer.val_check_interval=2",
    ], cwd=tmp_path, timeout=150)
    assert res.returncode == 0, res.stderr[-4000:]
    run = tmp_path / "runs/clip-debug/version_0"
    logged = _last_validation(run, "val/i2t_R@1")
    single = single_process_validation(run, three_val_dir, val_batch_size=2)
    assert_same_figures(logged, single, ["val/loss", "val/i2t_R@1", "val/t2i_R@1", "val/zero_shot/colour",
                                         "val/zero_shot/shape"])


@pytest.mark.timeout(300)
def test_two_rank_autoencoder_trains_across_disc_start_and_validates_padding(shapes_dir, three_val_dir, tmp_path):
    """``--trainer.strategy=ddp`` (what slurm/fit.sbatch passes) trains the autoencoder across ``disc_start`` (the
    discriminator is unused before it, the generator in the discriminator's backward after it), and its
    validation with a padding-only batch on rank 1 equals one process's."""
    res = run_ldm([
        "fit", "-c", str(REPO / "configs/trainer/debug.yaml"), "-c", str(REPO / "configs/autoencoder/kl-f4-debug.yaml"),
        f"--data.train={shapes_dir}/train-*.tar", f"--data.val={three_val_dir}/val-*.tar", "--data.batch_size=4",
        "--data.image_size=32", *PADDED_VAL, "--trainer.max_steps=6", "--trainer.val_check_interval=4",
        "--model.init_args.loss.init_args.disc_start=2",
    ], cwd=tmp_path, timeout=150)
    assert res.returncode == 0, res.stderr[-4000:]
    run = tmp_path / "runs/kl-f4-debug/version_0"
    import csv

    # 4 batches: 2 generator steps, then 2 batches of a generator and a discriminator step (each counts in max_steps)
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train/loss")]
    assert len(rows) == 4, [r["step"] for r in rows]
    assert not rows[0].get("train/d_loss") and not rows[1].get("train/d_loss")  # before disc_start
    for r in rows[2:]:  # the GAN phase: the terms of the discriminator's game logged, and finite
        for key in ("train/d_loss", "train/g_adv", "train/logits_real", "train/logits_fake"):
            assert r.get(key) and abs(float(r[key])) < 1e6, (r["step"], key, r.get(key))
    logged = _last_validation(run, "val/psnr")
    single = single_process_validation(run, three_val_dir, val_batch_size=2)
    assert_same_figures(logged, single, ["val/psnr", "val/ssim", "val/rec"])


def test_ddp_is_mapped_to_unused_parameter_detection_only_for_systems_that_need_it():
    from ldm.cli import ddp_strategy_for
    from ldm.systems import AutoencoderSystem, ContrastiveSystem

    assert AutoencoderSystem.ddp_find_unused_parameters and not hasattr(ContrastiveSystem, "ddp_find_unused_parameters")
    assert ddp_strategy_for(AutoencoderSystem, "ddp") == "ddp_find_unused_parameters_true"
    assert ddp_strategy_for(AutoencoderSystem, "ddp_spawn") == "ddp_spawn_find_unused_parameters_true"
    for given in ("auto", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true", None):
        assert ddp_strategy_for(AutoencoderSystem, given) == given  # a user's explicit choice stands
    assert ddp_strategy_for(ContrastiveSystem, "ddp") == "ddp"  # no extra graph traversal where none is needed
