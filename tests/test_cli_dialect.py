"""One CLI dialect (issue 18): a fast ``ldm --help``, no top-level optimizer, a short ``--model.help``, ``ldm test``."""

from __future__ import annotations

import csv
import re
import subprocess
import sys

import pytest
import yaml

from ldm.cli import SUBCOMMANDS, main, shorten_known_subclasses
from tests.conftest import REPO, ldm_env, run_ldm

DEBUG = str(REPO / "configs/trainer/debug.yaml")
HEAVY = ("torch", "pytorch_lightning", "lightning", "open_clip", "torchvision", "timm")


def test_top_level_help_imports_neither_torch_nor_lightning():
    code = ("import sys\nfrom ldm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ldm_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout  # the help was printed without importing any of them
    for word in ("fit", "validate", "test", "ldm shards", "ldm sample", "--print_config"):
        assert word in res.stdout
    assert "predict" not in res.stdout


def test_top_level_help_lists_what_the_lightning_cli_registers(capsys):
    from ldm.cli import LDMCLI

    assert list(LDMCLI.subcommands()) == list(SUBCOMMANDS) == ["fit", "validate", "test"]
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2 and "{fit,validate,test}" in capsys.readouterr().err


def test_no_top_level_optimizer_or_lr_scheduler(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert not re.search(r"(?<![\w.])--(optimizer|lr_scheduler)\b", out)
    assert "ldm.systems.LatentDiffusion" in out  # the systems are known by name
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", DEBUG, "-c", str(REPO / "configs/ldm/debug.yaml"), "--print_config"])
    assert exc.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert "optimizer" not in config and "lr_scheduler" not in config
    assert config["model"]["init_args"]["optimizer"]["class_path"].startswith("torch.optim.")  # the system's own


def test_model_help_does_not_list_every_module(capsys):
    """1,499 lines before (every nn.Module subclass of torch, torchvision, timm, open_clip for ``unet``); 130 now:
    one line per parameter plus the ~40 classes ldm's packages export. 200 leaves room for new parameters."""
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--model.help", "LatentDiffusion"])  # by name: ldm.systems is imported by the CLI
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 200
    assert "torch.nn.Linear" not in out
    unet_help = out.split("--model.unet", 1)[1].split("--model.", 1)[0]
    if "known subclasses" in unet_help:  # (after other tests in the same process, jsonargparse may leave it out)
        assert "ldm.diffusion.UNet" in unet_help and "more from" in unet_help
    assert "torch.optim.AdamW" in out  # short lists (the optimizers) are kept whole


def test_shorten_known_subclasses_keeps_short_lists():
    short = "(type: X, known subclasses: torch.optim.Adam, torch.optim.SGD)"
    assert shorten_known_subclasses(short) == short
    long = "(type: Module, known subclasses: " + ", ".join(f"torch.nn.C{i}" for i in range(200)) + \
           ", ldm.diffusion.UNet, ldm.diffusion.unet.UNetBlock)"
    shortened = shorten_known_subclasses(long)
    assert shortened == "(type: Module, known subclasses: ldm.diffusion.UNet and 201 more from torch)"
    assert shorten_known_subclasses(shortened) == shortened


def _metrics(run_dir):
    rows = list(csv.DictReader(open(next(run_dir.glob("*/*/metrics.csv")))))
    return {k: float(v) for row in rows for k, v in row.items() if v and "/" in k}


@pytest.mark.slow  # a fit and a test run (about 20 s)
def test_ldm_test_runs_the_validation_on_data_test(shapes_dir, tmp_path):
    (tmp_path / "t").mkdir(), (tmp_path / "v").mkdir()
    args = ["-c", DEBUG, "-c", str(REPO / "configs/autoencoder/kl-f4-debug.yaml"),
            f"--data.train={shapes_dir}/train-*.tar", f"--data.val={shapes_dir}/val-*.tar"]
    res = run_ldm(["test", *args, f"--data.test={shapes_dir}/val-*.tar"], cwd=tmp_path / "t")
    assert res.returncode == 0, res.stderr[-3000:]
    tested = _metrics(tmp_path / "t/runs")
    res = run_ldm(["validate", *args], cwd=tmp_path / "v")
    assert res.returncode == 0, res.stderr[-3000:]
    validated = _metrics(tmp_path / "v/runs")
    assert {"test/rec", "test/psnr", "test/ssim"} <= set(tested) and not any(k.startswith("val/") for k in tested)
    for name in ("rec", "psnr", "ssim"):  # the same validation, on the same shards, logged under test/
        assert tested[f"test/{name}"] == pytest.approx(validated[f"val/{name}"])


def test_every_system_tests_with_its_validation():
    from ldm.systems import AutoencoderSystem, ContrastiveSystem, DiffusionPrior, LatentDiffusion
    from ldm.systems.validation import ValidationAsTest

    for system in (AutoencoderSystem, ContrastiveSystem, DiffusionPrior, LatentDiffusion):
        assert issubclass(system, ValidationAsTest)
        assert system.test_step is ValidationAsTest.test_step and system.validation_step is not None
