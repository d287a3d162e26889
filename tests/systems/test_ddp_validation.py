"""Validation of the diffusion systems is one figure for any world size and batch size.

3 validation samples, a validation batch of 1, 2 gloo ranks: rank 1's second batch is all padding. The
fixed-noise loss draws its noise (and inpainting masks, and the prior's sampling noise) per sample key, and
sums over valid rows are reduced once per epoch, so the figures equal one process's at any batch size.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as L

from ldm.cli import LDMCLI
from ldm.data import ShardDataModule
from ldm.data.precompute import precompute_embeddings
from tests.conftest import REPO, run_ldm
from tests.stages import DEBUG, LDM_DEBUG, stage_args
from tests.test_ddp import PADDED_VAL, _last_validation, assert_same_figures, single_process_validation

LEVELS = [f"val/loss_t{t}" for t in (100, 300, 500, 700, 900)]


@pytest.mark.timeout(300)
def test_two_rank_ldm_validation_with_a_padding_only_batch(shapes_dir, three_val_dir, stage_runs, tmp_path):
    res = run_ldm([
        "fit", "-c", *DEBUG, "-c", LDM_DEBUG, *stage_args(stage_runs), f"--data.train={shapes_dir}/train-*.tar",
        f"--data.val={three_val_dir}/val-*.tar", "--data.batch_size=4", *PADDED_VAL, "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
    ], cwd=tmp_path, timeout=150)
    assert res.returncode == 0, res.stderr[-4000:]
    run = tmp_path / "runs/ldm-debug/version_0"
    logged = _last_validation(run, "val/loss")
    single = single_process_validation(run, three_val_dir, val_batch_size=2)
    assert_same_figures(logged, single, ["val/loss", *LEVELS])


def _validate(system: L.LightningModule, dm: ShardDataModule) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return {k: float(v) for k, v in trainer.validate(system, dm, verbose=False)[0].items()}


def test_inpainting_ldm_validation_does_not_depend_on_the_batch_size(three_val_dir, stage_runs):
    """The random masks and noise of a sample are the same whichever batch it is in."""
    model = LDMCLI(args=["-c", *DEBUG, "-c", str(REPO / "configs/ldm/debug-inpaint.yaml"), *stage_args(stage_runs),
                         f"--data.val={three_val_dir}/val-*.tar"], run=False).model
    figures = [_validate(model, ShardDataModule(val=f"{three_val_dir}/val-*.tar", image_size=32, val_batch_size=b,
                                                num_workers=0, tokenizer=model.tokenizer)) for b in (1, 3)]
    assert_same_figures(figures[0], figures[1], ["val/loss", *LEVELS])


def test_prior_validation_does_not_depend_on_the_batch_size(three_val_dir, stage_runs, tmp_path):
    """The prior's fixed-noise losses and its sampled embeddings (cos, R@1) per sample, not per batch."""
    from ldm.contrastive import FrozenTextEncoder

    precompute_embeddings(FrozenTextEncoder(checkpoint=stage_runs["clip"]), f"{three_val_dir}/val-*.tar",
                          tmp_path / "emb", progress=False)
    model = LDMCLI(args=["-c", *DEBUG, "-c", str(REPO / "configs/prior/debug.yaml"),
                         f"--data.val={tmp_path}/emb/val-*.tar", f"--data.train={tmp_path}/emb/val-*.tar",
                         "--model.init_args.steps=3"], run=False).model
    figures = [_validate(model, ShardDataModule(val=f"{tmp_path}/emb/val-*.tar", val_batch_size=b, num_workers=0,
                                                decode_images=False)) for b in (1, 3)]
    assert_same_figures(figures[0], figures[1], ["val/loss", *LEVELS, "val/cos_prior", "val/r1_prior"])
