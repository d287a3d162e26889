"""experiments/recipes/sampling.py: the sampling study's table is the mean of its runs per setting, with the network
evaluations per image that the setting costs (guidance doubles them), and a missing run folder is an error that says
what to do."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys

from tests.conftest import REPO


def _script():
    sys.path.insert(0, str(REPO / "experiments/recipes"))
    spec = importlib.util.spec_from_file_location("sampling", REPO / "experiments/recipes/sampling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


METRICS = _script().METRICS  # study.py's, which the sampling study writes


def _row(run, setting, sampler, steps, cfg, color, weights="ema"):
    nfe = {"euler": steps, "heun": 2 * steps - 1}[sampler]
    return {"run": run, "setting": setting, "sampler": sampler, "steps": str(steps), "nfe": str(nfe),
            "weights": weights, "cfg": cfg, "eval_s": "10.0",
            **{m: ("%.4f" % color if m == "compositional/color" else "0.5000") for m in METRICS}}


def test_the_table_is_the_mean_of_the_runs_and_counts_guidance_twice(tmp_path):
    sampling = _script()
    rows = [_row("/r/arm/seed0", "euler-10", "euler", 10, "3", 0.4), _row("/r/arm/seed1", "euler-10", "euler", 10, "3", 0.6),
            _row("/r/arm/seed0", "heun-10", "heun", 10, "3", 0.2), _row("/r/arm/seed1", "heun-10", "heun", 10, "3", 0.3)]
    for cfg in ("1", "3"):
        rows += [_row("/r/arm/seed0", "euler-20", "euler", 20, cfg, 0.1), _row("/r/arm/seed1", "euler-20", "euler", 20, cfg, 0.3)]
    sampling.summarise(rows, argparse.Namespace(out=tmp_path, eval_n=8))
    table = {line.split(" | ")[0].strip("| ") + "@" + line.split(" | ")[2]: line.split(" | ")
             for line in (tmp_path / "sampling.md").read_text().splitlines() if line.startswith("| ") and "NFE" not in line}
    color = 5 + METRICS.index("compositional/color")
    assert table["euler-10@3"][3] == "20" and table["euler-10@3"][color].startswith("0.500 (0.400, 0.600)")
    assert table["heun-10@3"][3] == "38" and table["heun-10@3"][color].startswith("0.250 (0.200, 0.300)")
    assert table["euler-20@1"][3] == "20" and table["euler-20@3"][3] == "40"
    assert list(table)[:2] == ["euler-10@3", "euler-20@1"]  # the settings' order, then guidance
    assert (tmp_path / "sampling.png").stat().st_size > 10_000


def test_a_run_folder_without_checkpoints_is_an_error_that_says_what_to_do(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "experiments/recipes/sampling.py"), "--runs", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert out.returncode != 0
    assert "nope: not a run folder with checkpoints/" in out.stderr and "train it first" in out.stderr
