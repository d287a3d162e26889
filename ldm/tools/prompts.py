"""Prompt files: the captions of ``ldm sample --prompts FILE``, read by the file's extension.

    .txt (or none)  one caption per line; blank lines are skipped
    .json           a list of captions: strings, or objects with a caption field
    .jsonl          one caption per line: a JSON string or an object with a caption field; blank lines skipped
    .csv / .tsv     a header row naming a caption column

The caption field (or column) is ``column`` when given, else the first of ``caption``, ``text``, ``prompt``
that the object (or header) has. Bad input is a ``ValueError`` naming the file and the line, row or item:
invalid JSON, an empty caption, a missing field or column, a caption that is not text.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

CAPTION_FIELDS = ("caption", "text", "prompt")
FORMATS = (".txt", ".json", ".jsonl", ".csv", ".tsv")


def read_prompt_file(path: str | Path, column: str | None = None) -> list[str]:
    """The captions of the prompt file ``path``, in file order, stripped of surrounding whitespace."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (*FORMATS, ""):
        raise ValueError(f"{path}: unknown prompt file type {path.suffix!r}: use {', '.join(FORMATS)}")
    if suffix in (".txt", "") and column is not None:
        raise ValueError(f"{path}: a plain-text prompt file has no columns; a caption column applies to "
                         f"{', '.join(FORMATS[1:])} files")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark is not part of a caption
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if suffix in (".txt", ""):
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    elif suffix == ".json":
        prompts = _read_json(path, text, column)
    elif suffix == ".jsonl":
        prompts = [_caption(_json_value(path, line, n), column, f"{path} line {n}")
                   for n, line in enumerate(text.split("\n"), 1) if line.strip()]  # not splitlines: U+2028 is text
    else:
        prompts = _read_table(path, text, column, "\t" if suffix == ".tsv" else ",")
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts


def _json_value(path: Path, text: str, line: int = 1):
    """``text`` parsed as JSON, or a ValueError naming the file and the line (``line`` is that of the text's start)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {line + e.lineno - 1}: invalid JSON ({e.msg}, column {e.colno})") from e


def _read_json(path: Path, text: str, column: str | None) -> list[str]:
    items = _json_value(path, text)
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of captions (strings or objects with a caption field), "
                         f"got a {type(items).__name__}")
    return [_caption(item, column, f"{path} item {i}") for i, item in enumerate(items, 1)]


def _caption(item, column: str | None, where: str) -> str:
    """The caption of one JSON item: the string itself, or the caption field of an object."""
    if isinstance(item, dict):
        field = column if column is not None else next((f for f in CAPTION_FIELDS if f in item), None)
        if field is None or field not in item:
            wanted = repr(column) if column is not None else " or ".join(repr(f) for f in CAPTION_FIELDS)
            fields = ", ".join(map(repr, item)) or "no fields"
            raise ValueError(f"{where}: no caption field {wanted} (the object has {fields})")
        item = item[field]
    if not isinstance(item, str):
        raise ValueError(f"{where}: the caption must be a string (or an object with a caption field), got "
                         f"{json.dumps(item)[:60]}")
    if not item.strip():
        raise ValueError(f"{where}: empty caption")
    return item.strip()


def _read_table(path: Path, text: str, column: str | None, delimiter: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = reader.fieldnames or []
    except csv.Error as e:
        raise ValueError(f"{path} line {reader.line_num}: {e}") from e
    names = {name.strip(): name for name in header}  # "id, caption": the column is " caption"
    field = column if column is not None else next((f for f in CAPTION_FIELDS if f in names), None)
    if field is None or field not in names:
        wanted = repr(column) if column is not None else " or ".join(repr(f) for f in CAPTION_FIELDS)
        raise ValueError(f"{path} line 1: no caption column {wanted} in the header "
                         f"({', '.join(map(repr, header)) or 'empty'}); name the column with --prompt-column")
    prompts = []
    rows = iter(reader)
    while True:  # rows that are wholly empty are skipped by the reader
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as e:
            raise ValueError(f"{path} line {reader.line_num}: {e}") from e
        caption = row[names[field]]
        if caption is None:  # a short row
            raise ValueError(f"{path} line {reader.line_num}: the row has no {field!r} value "
                             f"({len(header)} columns in the header)")
        if not caption.strip():
            raise ValueError(f"{path} line {reader.line_num}: empty caption in column {field!r}")
        prompts.append(caption.strip())
    return prompts
