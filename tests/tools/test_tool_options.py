"""The tools' options speak ``ldm fit``'s dialect (:mod:`ldm.tools.options`): ``-c FILE``, ``--print_config``,
defaults in ``--help``, one name per concept with the older names as aliases. Parsing only: no model runs."""

from __future__ import annotations

import argparse
import shlex

import pytest
import yaml

from ldm.tools import convert, evaluate, precompute, runs, sample, shards, submit
from ldm.tools.options import GUIDANCE_SCALE, ToolParser

#: (tool, a parser factory, a command line of each leaf parser with its required options)
LEAVES = [
    ("shards", shards._parser, ["synthetic", "--out", "d", "--train", "12", "--format", "jpg", "--quiet"]),
    ("shards", shards._parser, ["from-folder", "--images", "imgs", "--out", "d", "--caption-column", "text"]),
    ("shards", shards._parser, ["preview", "--shards", "d/val-*.tar", "--out", "p.png", "--num-images", "4"]),
    ("precompute", precompute._parser, ["latents", "--ckpt", "runs/ae", "--shards", "s/*.tar", "--out", "l",
                                        "--std"]),
    ("precompute", precompute._parser, ["embeddings", "--ckpt", "runs/clip", "--shards", "s/*.tar", "--out", "e",
                                        "--no-tokens"]),
    ("sample", sample._parser, ["--ckpt", "runs/ldm", "--prompt", "a red circle", "--prompt", "a blue square",
                                "--num-images", "2", "--guidance-scale", "3", "--precision", "bf16",
                                "--image", "in.png"]),
    ("eval", evaluate._parser, ["--ckpt", "runs/ldm", "--num-images", "8", "--guidance-sweep", "1,3",
                                "--shards", "v/*.tar", "--no-clip"]),
    ("convert", convert._parser, ["diffusers", "pipe", "--out", "runs/sd"]),
    ("convert", convert._parser, ["single-file", "sd.safetensors", "--out", "runs/sd", "--version", "sd2",
                                  "--ema"]),
    ("convert", convert._parser, ["to-diffusers", "--ckpt", "runs/sd", "--out", "pipe"]),
    ("runs", runs._parser, ["compare", "runs/a", "runs/b", "--out", "cmp"]),
    ("submit", submit.build_parser, ["--partition", "gpu", "--gpus-per-node", "8", "--sbatch=--exclusive",
                                     "--", "-c", "fit.yaml", "--trainer.max_steps=3"]),
]
IDS = [" ".join([tool, *argv[:1]]) for tool, _, argv in LEAVES]


def _subcommand(factory, argv: list[str]) -> list[str]:
    """The subcommand word of ``argv`` (where -c goes: after it), or none."""
    return argv[:1] if factory()._subparsers is not None else []


def _parse(factory, argv: list[str]) -> dict:
    return vars(factory().parse_args(argv))


def _printed(factory, argv: list[str], capsys) -> str:
    word = _subcommand(factory, argv)
    with pytest.raises(SystemExit) as e:  # after the subcommand, before any `--`
        factory().parse_args([*word, "--print_config", *argv[len(word):]])
    assert e.value.code == 0
    return capsys.readouterr().out


def _fails(factory, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        factory().parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("tool, factory, argv", LEAVES, ids=IDS)
def test_print_config_reads_back_with_c(tool, factory, argv, tmp_path, capsys):
    printed = _printed(factory, argv, capsys)
    assert isinstance(yaml.safe_load(printed), dict)
    (tmp_path / "options.yaml").write_text(printed)
    again = _parse(factory, [*_subcommand(factory, argv), "-c", str(tmp_path / "options.yaml")])
    assert again == _parse(factory, argv)


@pytest.mark.parametrize("tool, factory, argv", LEAVES, ids=IDS)
def test_an_unknown_key_exits_2_naming_it_and_the_file(tool, factory, argv, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batchsize_typo: 8\n")
    word = _subcommand(factory, argv)
    err = _fails(factory, [*word, "-c", str(bad), *argv[len(word):]], capsys)
    assert "'batchsize_typo'" in err and str(bad) in err


@pytest.mark.parametrize("tool, factory, argv", LEAVES, ids=IDS)
def test_help_shows_every_default(tool, factory, argv, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")
    monkeypatch.delenv("LDM_INCEPTION_WEIGHTS", raising=False)  # else eval's --inception default names a file
    parser = factory()
    if parser._subparsers is not None:
        parser = parser._subparsers._group_actions[0].choices[argv[0]]
    text = " ".join(parser.format_help().split())
    assert "-c FILE, --config FILE" in text and "--print_config" in text
    for action in parser._actions:
        if action.help is argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        assert action.help, f"{action.option_strings or action.dest} has no help"
        if not any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)) and \
                action.default not in ([], ""):
            assert f"(default: {action.default})" in text, action.option_strings


def test_the_command_line_wins_over_c_files_which_compose_left_to_right(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("ckpt: runs/a\nsteps: 3\nbatch-size: 4\nprompt: [one, two]\nquiet: true\n")
    b.write_text("steps: 7\nguidance_scale: 2\n")
    args = sample._parser().parse_args(["-c", str(a), "-c", str(b)])
    assert (args.ckpt, args.steps, args.batch_size, args.guidance_scale, args.prompt, args.quiet) == \
        ("runs/a", 7, 4, 2.0, ["one", "two"], True)
    for argv in (["--steps", "9", "-c", str(a), "-c", str(b)], ["-c", str(a), "--steps", "9", "-c", str(b)],
                 ["-c", str(a), "-c", str(b), "--steps=9"]):
        assert sample._parser().parse_args(argv).steps == 9
    # a repeatable option given on the command line replaces the file's list
    args = sample._parser().parse_args(["-c", str(a), "--prompt", "three", "--ckpt", "runs/b"])
    assert (args.prompt, args.ckpt) == (["three"], "runs/b")


def test_c_files_are_checked_like_the_command_line(tmp_path, capsys):
    for text, words in [("steps: many\n", ["'steps'", "'many'"]),
                        ("sampler: magic\n", ["'sampler'", "invalid choice"]),
                        ("quiet: 1\n", ["'quiet'", "true or false"]),
                        ("precision: fp7\n", ["'precision'", "fp7"]),
                        ("- a list\n", ["a mapping"])]:
        f = tmp_path / "x.yaml"
        f.write_text(text)
        err = _fails(sample._parser, ["--ckpt", "r", "-c", str(f)], capsys)
        assert str(f) in err and all(w in err for w in words), err
    assert "no such file" in _fails(sample._parser, ["--ckpt", "r", "-c", str(tmp_path / "none.yaml")], capsys)
    # a required option is still required, and a file may provide it (a positional too)
    assert "--ckpt" in _fails(sample._parser, [], capsys)
    f = tmp_path / "c.yaml"
    f.write_text("pipeline: pipe\nout: runs/sd\n")
    assert convert._parser().parse_args(["diffusers", "-c", str(f)]).pipeline == "pipe"
    assert "pipeline" in _fails(convert._parser, ["diffusers", "--out", "o"], capsys)


def test_print_config_without_the_required_options_is_a_template(capsys):
    printed = yaml.safe_load(_printed(sample._parser, [], capsys))
    assert printed["ckpt"] is None and printed["guidance_scale"] == GUIDANCE_SCALE and printed["num_images"] == 1
    assert list(yaml.safe_load(_printed(convert._parser, ["diffusers"], capsys)))[0] == "pipeline"


def test_config_keys_take_dashes_or_underscores(tmp_path):
    for key in ("batch-size", "batch_size"):
        (tmp_path / "e.yaml").write_text(f"{key}: 8\n")
        assert evaluate._parser().parse_args(["--ckpt", "r", "-c", str(tmp_path / "e.yaml")]).batch_size == 8
    # an option whose dest differs from its name (--format -> image_format) is keyed by its name
    (tmp_path / "s.yaml").write_text("max-objects: 2\nshard_size: 10\nformat: jpg\n")
    args = shards._parser().parse_args(["synthetic", "--out", "d", "-c", str(tmp_path / "s.yaml")])
    assert (args.max_objects, args.shard_size, args.image_format) == (2, 10, "jpg")


ALIASES = [  # (parser, the older spelling, the one name)
    (sample._parser, "--cfg 3", "--guidance-scale 3"),
    (sample._parser, "--n 4", "--num-images 4"),
    (sample._parser, "--prior-cfg 2", "--prior-guidance-scale 2"),
    (sample._parser, "--clip-guidance 100", "--clip-guidance-scale 100"),
    (sample._parser, "--prompt-column text", "--caption-column text"),
    (sample._parser, "--ckpt_path runs/y", "--ckpt runs/y"),
    (sample._parser, "--batch_size 2 --negative_prompt x", "--batch-size 2 --negative-prompt x"),
    (sample._parser, "--batch 2", "--batch-size 2"),  # an abbreviation of one option in two spellings
    (evaluate._parser, "--cfg 3", "--guidance-scale 3"),
    (evaluate._parser, "--cfg-sweep 1,3", "--guidance-sweep 1,3"),
    (evaluate._parser, "--n 6", "--num-images 6"),
    (evaluate._parser, "--data v/*.tar", "--shards v/*.tar"),
    (precompute._parser, "latents --ckpt_path runs/y", "latents --ckpt runs/y"),
    (shards._parser, "preview --n 4", "preview --num-images 4"),
    (submit.build_parser, "--gpus_per_node 2 --dry_run", "--gpus-per-node 2 --dry-run"),
]


@pytest.mark.parametrize("factory, old, new", ALIASES, ids=[old for _, old, _ in ALIASES])
def test_aliases_parse_to_the_same_option(factory, old, new):
    required = {sample._parser: ["--ckpt", "r"], evaluate._parser: ["--ckpt", "r"],
                precompute._parser: ["--shards", "s", "--out", "o"], shards._parser: ["--shards", "s", "--out", "o"],
                submit.build_parser: []}[factory]
    if factory in (precompute._parser, shards._parser):  # options after the subcommand
        assert _parse(factory, [*shlex.split(old), *required]) == _parse(factory, [*shlex.split(new), *required])
    else:
        assert _parse(factory, [*required, *shlex.split(old)]) == _parse(factory, [*required, *shlex.split(new)])


def test_aliases_are_documented_not_shown_as_names(monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")
    text = sample._parser().format_help()
    assert "--guidance-scale GUIDANCE_SCALE" in text and "[also: --cfg]" in text
    assert "--cfg CFG" not in text and "--batch_size" not in text


def test_to_diffusers_takes_the_run_as_ckpt_or_positional(capsys):
    assert convert.parse(["to-diffusers", "runs/sd", "--out", "p"]).ckpt == "runs/sd"
    assert convert.parse(["to-diffusers", "--ckpt", "runs/sd", "--out", "p"]).ckpt == "runs/sd"
    assert "run" not in vars(convert.parse(["to-diffusers", "--ckpt", "runs/sd", "--out", "p"]))
    for argv in (["to-diffusers", "--out", "p"], ["to-diffusers", "a", "--ckpt", "b", "--out", "p"]):
        with pytest.raises(SystemExit) as e:
            convert.parse(argv)
        assert e.value.code == 2
    assert "--ckpt" in capsys.readouterr().err


def test_one_default_guidance_scale():
    assert sample._parser().parse_args(["--ckpt", "r"]).guidance_scale == GUIDANCE_SCALE
    assert evaluate._parser().parse_args(["--ckpt", "r"]).guidance_scale == GUIDANCE_SCALE


def test_submit_leaves_the_fit_arguments_alone(tmp_path):
    (tmp_path / "cluster.yaml").write_text("partition: gpu\ngpus_per_node: 8\ntime: 24:00:00\n"
                                           "fit_args: [-c, old.yaml]\n")
    args = submit.build_parser().parse_args(["-c", str(tmp_path / "cluster.yaml"), "--", "-c", "fit.yaml"])
    assert (args.partition, args.gpus_per_node, args.fit_args) == ("gpu", 8, ["--", "-c", "fit.yaml"])
    assert args.time == "24:00:00"  # not YAML 1.1's base-60 integer 86400
    args = submit.build_parser().parse_args(["-c", str(tmp_path / "cluster.yaml"), "--nodes", "2"])
    assert (args.nodes, args.fit_args) == (2, ["-c", "old.yaml"])  # no fit arguments given: the file's
    args = submit.build_parser().parse_args(["--nodes", "2", "fit", "-c", "fit.yaml"])  # no --: all of it is ldm fit's
    assert args.fit_args == ["fit", "-c", "fit.yaml"]


def test_every_tool_parser_is_a_tool_parser():
    for _, factory, argv in LEAVES:
        parser = factory()
        assert isinstance(parser, ToolParser)
        if parser._subparsers is not None:
            assert isinstance(parser._subparsers._group_actions[0].choices[argv[0]], ToolParser)


def test_a_positional_list_from_a_file_or_the_command_line(tmp_path, capsys):
    """The shape of ``ldm runs compare RUN...`` (a ``nargs="+"`` positional) under a ToolParser."""

    def factory():
        p = ToolParser(prog="ldm runs")
        c = p.add_subparsers(dest="command", required=True).add_parser("compare")
        c.add_argument("runs", nargs="+", help="run folders")
        c.add_argument("--out", help="output folder")
        return p

    (tmp_path / "r.yaml").write_text("runs: [a, b]\n")
    assert _parse(factory, ["compare", "-c", str(tmp_path / "r.yaml")])["runs"] == ["a", "b"]
    assert _parse(factory, ["compare", "-c", str(tmp_path / "r.yaml"), "c"])["runs"] == ["c"]
    assert "runs" in _fails(factory, ["compare"], capsys)
    assert yaml.safe_load(_printed(factory, ["compare"], capsys)) == {"runs": [], "out": None}
