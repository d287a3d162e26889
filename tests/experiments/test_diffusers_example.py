"""experiments/recipes/diffusers_example.py: diffusers' text-to-image training recipe on our data trains diffusers'
own U-Net, and the run it writes is that model, read by ldm's loaders (what `ldm eval` scores)."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
import torch

from ldm.systems.loading import load_system
from tests.conftest import REPO
from tests.stages import DEBUG, LDM_DEBUG, fit, stage_args

diffusers = pytest.importorskip("diffusers")


def _script():
    spec = importlib.util.spec_from_file_location("diffusers_example", REPO / "experiments/recipes/diffusers_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def template(shapes_dir, stage_runs, tmp_path_factory):
    """A one-step ldm fit of the debug U-Net with the eps recipe and the empty prompt as its null condition."""
    root = tmp_path_factory.mktemp("template")
    cli = fit(["-c", *DEBUG, "-c", LDM_DEBUG, "-c", str(REPO / "configs/ldm/debug-eps.yaml"), *stage_args(stage_runs),
               "--model.init_args.conditioner.init_args.null=empty_prompt",
               f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar",
               "--data.num_workers=0", "--data.batch_size=16", "--trainer.max_steps=1", "--trainer.max_epochs=-1",
               "--trainer.limit_val_batches=0", f"--run.root={root}", "--run.version=v"])
    return cli.run_dir


def test_the_diffusers_recipe_trains_diffusers_unet_and_writes_a_run_ldm_loads(template, tmp_path):
    out = tmp_path / "run"
    _script().main(["--template", str(template), "--out", str(out), "--steps", "40", "--lr", "1e-3", "--seed", "0",
                    "--log-every", "20"])

    rows = list(csv.DictReader(open(out / "train.csv")))
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 40
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)  # the epsilon MSE of a fresh U-Net (about 1) goes down
    assert json.loads((out / "fit.json").read_text())["steps"] == 40

    # the run's U-Net is the trained diffusers model, weight for weight and function for function
    trained = diffusers.UNet2DConditionModel.from_pretrained(out / "diffusers" / "unet").eval()
    system = load_system(out)
    template_system = load_system(template)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0])
    context = torch.randn(2, 5, trained.config.cross_attention_dim)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        ref = trained(x, t, context, encoder_attention_mask=mask).sample
        ours = system.unet(x, t, context=context, context_mask=mask)
        before = template_system.unet(x, t, context=context, context_mask=mask)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert (before - ref).abs().max() > 1e-2  # not the template's weights
    # the frozen stages and the guidance's null condition are the template's
    assert system.conditioner.null == "empty_prompt"
    for name, value in template_system.first_stage.state_dict().items():
        assert torch.equal(system.first_stage.state_dict()[name], value)
