"""``ldm sample --prompts FILE``: JSONL / CSV prompt files, errors naming the line, and file names that sort."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldm.tools.sample import main


@pytest.mark.parametrize("name, text, extra, message", [
    ("bad.jsonl", '"a red circle"\n{"caption": "a blue\n', [], "--prompts bad.jsonl line 2: invalid JSON"),
    ("bad.csv", "id,caption\n1,a red circle\n2,  \n", [], "--prompts bad.csv line 3: empty caption"),
    ("bad.csv", "id,text\n1,a red circle\n", ["--prompt-column", "alt"], "bad.csv line 1: no caption column 'alt'"),
])
def test_a_bad_prompt_file_is_an_error_naming_the_file_and_line(tmp_path, monkeypatch, capsys, name, text, extra,
                                                                 message):
    """The prompt file is read before any run is loaded: exit status 2 and the place of the mistake."""
    monkeypatch.chdir(tmp_path)
    Path(name).write_text(text)
    assert main(["--ckpt", "no-such-run", "--prompts", name, *extra, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_sample_reads_a_jsonl_prompt_file_and_numbers_the_files_in_order(ldm_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    lines = ['"a red circle"', "", '{"caption": "a blue square", "id": 7}', '{"text": "a green triangle"}']
    Path("prompts.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["--ckpt", str(ldm_run.run_dir), "--prompts", "prompts.jsonl", "--prompt", "a yellow star",
                 "--n", "2", "--steps", "2", "--seed", "5", "--quiet", "--out", "s/grid.png"]) == 0
    prompts = ["a yellow star", "a red circle", "a blue square", "a green triangle"]  # --prompt, then the file
    expected = [f"{i:04d}-{p.replace(' ', '-')}.png" for i, p in enumerate(p for p in prompts for _ in range(2))]
    assert sorted(p.name for p in Path("s/grid").iterdir()) == expected
    record = json.loads(Path("s/grid.json").read_text())
    assert record["prompts"] == prompts and record["prompts_file"] == "prompts.jsonl" and record["n"] == 2
    assert [Path(i["file"]).name for i in record["images"]] == expected
    assert all(Path(i["file"]).is_file() for i in record["images"])
    assert [i["caption"] for i in record["images"]] == [p for p in prompts for _ in range(2)]
    assert [i["seed"] for i in record["images"]] == list(range(5, 13))


def test_sample_draws_non_square_images_in_text_mode_only(ldm_run, tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    common = ["--ckpt", str(ldm_run.run_dir), "--prompt", "a red circle", "--steps", "2", "--quiet"]
    assert main([*common, "--height", "32", "--width", "64", "--out", "wide.png"]) == 0
    assert Image.open(tmp_path / "wide/0000-a-red-circle.png").size == (64, 32)  # (width, height)
    assert json.loads((tmp_path / "wide.json").read_text())["image_size"] == [32, 64]
    assert main([*common, "--height", "30", "--out", "bad.png"]) == 2
    assert "image height 30 is not a positive multiple of the first stage's factor 4" in capsys.readouterr().err
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    assert main([*common, "--mode", "img2img", "--image", "in.png", "--width", "64", "--out", "i.png"]) == 2
    assert "--height / --width are for --mode text" in capsys.readouterr().err
