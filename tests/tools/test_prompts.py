"""Prompt files (``ldm sample --prompts FILE``) by extension, and image file names that sort in generation order."""

from __future__ import annotations

import json

import pytest

from ldm.tools.prompts import read_prompt_file
from ldm.tools.sample import image_file_names

CAPTIONS = ["a red circle", "a blue square, small", "a green triangle"]


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("n", [1, 999, 1000, 1001, 10001])
def test_image_file_names_sort_in_generation_order(n):
    """``sorted(names) == names`` for any count: with ``NNN-`` the 1001st image (``1000-...``) sorted before the
    second (``001-...``). The captions run backwards so the slug cannot be what keeps the order."""
    captions = [f"caption {n - i}" for i in range(n)]
    names = image_file_names(captions)
    assert sorted(names) == names and len(set(names)) == n
    width = max(4, len(str(n - 1)))
    assert names[0] == "0" * width + f"-caption-{n}.png"
    assert names[-1] == f"{n - 1:0{width}d}-caption-1.png"


def test_plain_lines_stay_plain_lines(tmp_path):
    path = _write(tmp_path, "p.txt", "  a red circle \n\n{\"caption\": \"not parsed\"}\na, b\n")
    assert read_prompt_file(path) == ["a red circle", '{"caption": "not parsed"}', "a, b"]
    assert read_prompt_file(_write(tmp_path, "prompts", "x\ny\n")) == ["x", "y"]  # no extension: plain lines


def test_json_list_of_strings_or_of_objects(tmp_path):
    assert read_prompt_file(_write(tmp_path, "s.json", json.dumps(CAPTIONS))) == CAPTIONS
    objects = [{"id": 1, "caption": CAPTIONS[0]}, {"text": CAPTIONS[1]}, CAPTIONS[2]]  # mixed, other field names
    assert read_prompt_file(_write(tmp_path, "o.json", json.dumps(objects, indent=2))) == CAPTIONS
    named = [{"caption": "not this", "alt": c} for c in CAPTIONS]
    assert read_prompt_file(_write(tmp_path, "n.json", json.dumps(named)), column="alt") == CAPTIONS


def test_jsonl_one_string_or_object_per_line(tmp_path):
    text = f'{json.dumps(CAPTIONS[0])}\n\n{{"prompt": "{CAPTIONS[1]}", "seed": 3}}\n{{"caption": "{CAPTIONS[2]}"}}\n'
    assert read_prompt_file(_write(tmp_path, "p.jsonl", text)) == CAPTIONS
    odd = json.dumps({"caption": "two\u2028lines"}, ensure_ascii=False)  # a line separator inside a JSON string
    assert read_prompt_file(_write(tmp_path, "u.jsonl", odd + "\n")) == ["two\u2028lines"]


def test_csv_and_tsv_caption_columns(tmp_path):
    csv_text = 'id,url,caption\n1,a.png,a red circle\n2,b.png,"a blue square, small"\n\n3,c.png, a green triangle\n'
    assert read_prompt_file(_write(tmp_path, "p.csv", csv_text)) == CAPTIONS
    tsv = "\ufeffkey\ttext\n" + "".join(f"{i}\t{c}\n" for i, c in enumerate(CAPTIONS))  # a spreadsheet's BOM
    assert read_prompt_file(_write(tmp_path, "p.tsv", tsv)) == CAPTIONS
    both = "caption, alt\nnot this, a red circle\n"  # a space after the comma; the named column wins
    assert read_prompt_file(_write(tmp_path, "b.csv", both), column="alt") == ["a red circle"]


@pytest.mark.parametrize("name, text, column, message", [
    ("p.jsonl", '"a"\n{"caption": "b"\n', None, r"p.jsonl line 2: invalid JSON"),
    ("p.jsonl", '"a"\n\n{"caption": "  "}\n', None, r"p.jsonl line 3: empty caption"),
    ("p.jsonl", '{"caption": 3}\n', None, r"p.jsonl line 1: the caption must be a string"),
    ("p.jsonl", '{"url": "x.png"}\n', None, r"p.jsonl line 1: no caption field 'caption' or 'text' or 'prompt' "
                                            r"\(the object has 'url'\)"),
    ("p.json", '[\n  "a"\n  "b"\n]\n', None, r"p.json line 3: invalid JSON \(Expecting ',' delimiter"),
    ("p.json", '["a", ""]', None, r"p.json item 2: empty caption"),
    ("p.json", '[{"caption": "a"}]', "alt", r"p.json item 1: no caption field 'alt'"),
    ("p.json", '{"caption": "a"}', None, r"p.json: expected a JSON list"),
    ("p.csv", "id,url\n1,a.png\n", None, r"p.csv line 1: no caption column .* \('id', 'url'\)"),
    ("p.csv", "id,caption\n1,a\n2,\n", None, r"p.csv line 3: empty caption in column 'caption'"),
    ("p.csv", "id,caption\n1,a\n2\n", None, r"p.csv line 3: the row has no 'caption' value"),
    ("p.tsv", "id\ttext\n1\ta\n", "prompt", r"p.tsv line 1: no caption column 'prompt'"),
    ("p.txt", "a\n", "caption", r"p.txt: a plain-text prompt file has no columns"),
    ("p.txt", "\n \n", None, r"p.txt: no prompts"),
    ("p.yaml", "- a\n", None, r"p.yaml: unknown prompt file type '.yaml'"),
])
def test_bad_prompt_files_are_named_with_the_line_row_or_item(tmp_path, name, text, column, message):
    with pytest.raises(ValueError, match=message):
        read_prompt_file(_write(tmp_path, name, text), column=column)
