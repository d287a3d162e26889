"""Evaluation of a trained latent-diffusion run: `ldm eval`, the training callback, exactness over
ranks, and `ldm runs compare`. Inception weights are random (test-made): the FIDs test the path only."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm.autoencoder import IdentityFirstStage
from ldm.cli import LDMCLI
from ldm.diffusion import UNet
from ldm.pipelines import SamplerSettings, TextToImage
from ldm.pipelines.evaluate import GenerationEvaluator, load_eval_set
from ldm.systems import LatentDiffusion
from tests.conftest import REPO, run_ldm
from tests.stages import DEBUG, LDM_DEBUG, fit, stage_args


def test_ldm_eval_writes_its_report_and_caches_the_reference(ldm_run, inception_file, tmp_path):
    args = ["eval", "--ckpt", ldm_run.run_dir, "--n", "6", "--steps", "3", "--cfg-sweep", "1,3", "--batch-size", "3",
            "--inception", str(inception_file), "--quiet"]
    cache = tmp_path / "cache"
    first = run_ldm([*args, "--out", "a"], cwd=tmp_path, LDM_CACHE=str(cache))
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((tmp_path / "a/report.json").read_text())
    assert [r["settings"]["cfg"] for r in report["results"]] == [1.0, 3.0] and report["n"] == 6
    metrics = report["results"][1]["metrics"]
    for key in ("fid", "kid", "is", "fd_clip", "clip_score", "compositional/all_correct", "compositional/relation"):
        assert key in metrics, key
    assert "not torch-fidelity's released file name" in report["inception_weights"]
    assert "own text encoder" in report["clip_scorer"]
    for name in ("report.md", "report.html", "samples.png", "cfg_sweep.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0, name
    assert "| cfg |" in (tmp_path / "a/report.md").read_text()
    assert len(list((cache / "reference").glob("*.pt"))) == 1  # real features computed once ...
    second = run_ldm([*args, "--out", "b"], cwd=tmp_path, LDM_CACHE=str(cache))
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((tmp_path / "b/report.json").read_text())
    assert again["results"] == report["results"]  # ... and reused; same seed, same numbers


def test_ldm_eval_errors_clearly(stage_runs, tmp_path):
    res = run_ldm(["eval", "--ckpt", str(stage_runs["clip"])], cwd=tmp_path)
    assert res.returncode == 2 and "not a latent-diffusion run" in res.stderr


def test_the_callback_logs_generation_metrics_during_training(shapes_dir, stage_runs, inception_file, tmp_path):
    cli = fit(["-c", *DEBUG, "-c", LDM_DEBUG, *stage_args(stage_runs), f"--data.train={shapes_dir}/train-*.tar",
               f"--data.val={shapes_dir}/val-*.tar", "--data.num_workers=0", "--data.batch_size=16",
               "--trainer.max_steps=8", "--trainer.limit_val_batches=0", f"--run.root={tmp_path}",
               "--trainer.callbacks+=ldm.callbacks.GenerationEvalCallback", "--trainer.callbacks.every_n_steps=4",
               "--trainer.callbacks.n=4", "--trainer.callbacks.steps=2", "--trainer.callbacks.batch_size=4",
               f"--trainer.callbacks.inception_weights={inception_file}"])
    with open(f"{cli.run_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/fid")]
    assert [int(r["step"]) for r in rows] == [4, 8]
    assert all(r["eval/fd_clip"] and r["eval/compositional/all_correct"] and r["eval/clip_score"] for r in rows)
    assert sorted(p.name for p in (Path(cli.run_dir) / "images").glob("eval-*.png")) == [
        "eval-step0000004.png", "eval-step0000008.png"]


def _tiny_system() -> LatentDiffusion:
    torch.manual_seed(0)
    unet = UNet(in_channels=3, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(), heads=2,
                context_dim=None, groups=4)
    for p in unet.parameters():  # a fresh U-Net predicts zeros: give it something to draw
        if torch.count_nonzero(p) == 0 and p.ndim > 1:
            torch.nn.init.normal_(p, std=0.05)
    return LatentDiffusion(unet, IdentityFirstStage()).eval()


def _tiny_clip():
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from ldm.contrastive import OpenCLIP

    torch.manual_seed(1)
    return OpenCLIP(32, CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
                    CLIPTextCfg(context_length=16, width=32, heads=2, layers=1)).eval()


def _evaluate(pattern: str, rank: int, world: int) -> dict[str, float]:
    evaluator = GenerationEvaluator(None, _tiny_clip(), batch_size=3, cache=False)
    evalset = load_eval_set(pattern, 11, 64)
    return evaluator.evaluate(TextToImage(_tiny_system()), evalset, SamplerSettings(steps=2, seed=5), rank=rank,
                              world=world, progress=False).metrics


def _eval_worker(rank, world, port, pattern, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    metrics = _evaluate(pattern, rank, world)
    if rank == 0:
        torch.save(metrics, out)
    dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_evaluation_over_two_ranks_equals_one_process(tmp_path):
    from ldm.data.synthetic import write_synthetic_shards

    write_synthetic_shards(tmp_path, train=0, val=11, size=64, seed=2, shard_size=4, progress=False)
    pattern = f"{tmp_path}/val-*.tar"
    out = tmp_path / "two.pt"
    mp.spawn(_eval_worker, args=(2, 29900 + os.getpid() % 90, pattern, str(out)), nprocs=2, join=True)
    two, one = torch.load(out), _evaluate(pattern, 0, 1)
    assert set(two) == set(one) and {"fd_clip", "clip_score", "compositional/count"} <= set(one)
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-9), key


def test_runs_compare_lists_differing_keys_and_plots(shapes_dir, tmp_path):
    toy = str(REPO / "tests/configs/toy.yaml")
    for lr in ("0.01", "0.05"):
        LDMCLI(args=["fit", "-c", *DEBUG, "-c", toy, f"--data.train={shapes_dir}/train-*.tar",
                     f"--data.val={shapes_dir}/val-*.tar", "--trainer.max_steps=6", "--trainer.val_check_interval=3",
                     f"--model.init_args.lr={lr}", f"--run.root={tmp_path}/runs", "--run.wandb_mode=disabled",
                     "--trainer.enable_progress_bar=false"])
    res = run_ldm(["runs", "compare", f"{tmp_path}/runs/toy/version_0", f"{tmp_path}/runs/toy/version_1",
                   "--out", str(tmp_path / "cmp")], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "model.init_args.lr" in res.stdout and "Config keys that differ: model.init_args.lr" in res.stdout
    assert "| 0.01 |" in res.stdout and "| 0.05 |" in res.stdout
    assert (tmp_path / "cmp/compare.png").stat().st_size > 0 and (tmp_path / "cmp/compare.md").is_file()
    bad = run_ldm(["runs", "compare", f"{tmp_path}/runs/toy/version_0", "--metrics", "val/nothing"], cwd=tmp_path)
    assert bad.returncode == 2 and "no run logged val/nothing" in bad.stderr
