"""One line per problem, with the full dotted key, on top of jsonargparse's nested error report.

jsonargparse reports a bad value inside a ``class_path`` block as a nested tree
(``Parser key "data"`` ... ``Problem with given class_path`` ... ``Parser key "train"``).
:func:`summarize` turns that tree into ``data.init_args.train: <what is wrong>`` lines,
which is what a researcher needs to find the bad key in a YAML file.
"""

from __future__ import annotations

import re

_KEY = re.compile(r'^(?P<indent>\s*)(?:- )?(?:error: )?Parser key "(?P<key>[^"]+)":\s*(?P<rest>.*)$')
_CLASS = re.compile(r"^(?P<indent>\s*)- Problem with given class_path '(?P<cls>[^']+)':\s*$")
_OPTION = re.compile(r"Option '(?P<opt>[^']+)' is not accepted")
_NOISE = (
    "Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
    "Given value:", "- Expected a <class 'NoneType'>", "Expected a <class 'NoneType'>",
)


def summarize(message: str) -> list[str]:
    """``['data.init_args.batch_size: Expected a <class 'int'>. Got value: eight', ...]``."""
    stack: list[tuple[int, str, str | None]] = []  # (indent, path segment, class of a class_path block)
    found: list[str] = []

    def path(extra: str | None = None) -> str:
        parts = [seg for _, seg, _ in stack] + ([extra] if extra else [])
        return ".".join(p for p in parts if p)

    def pop_to(indent: int) -> None:
        while stack and stack[-1][0] >= indent:
            stack.pop()

    for line in message.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if m := _KEY.match(line):
            pop_to(indent)
            stack.append((indent, m["key"], None))
            if m["rest"]:
                found.append(f"{path()}: {m['rest']}")
            continue
        if m := _CLASS.match(line):
            pop_to(indent)
            stack.append((indent, "init_args", m["cls"]))
            continue
        text = line.strip()
        if any(text.startswith(n) for n in _NOISE):
            continue
        pop_to(indent)
        if m := _OPTION.search(text):
            cls = next((c for _, _, c in reversed(stack) if c), None)
            where = f" (not a parameter of {cls})" if cls else ""
            found.append(f"{path(m['opt'])}: unknown key{where}")
        elif stack:
            found.append(f"{path()}: {text.removeprefix('- ').removeprefix('Not of type ShardPattern: ')}")
    return list(dict.fromkeys(found))
