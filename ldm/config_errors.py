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


# -- errors raised while building the run (after parsing, before the first training step) ------------------


def root_cause(exn: BaseException) -> BaseException:
    """The innermost exception of a chain (jsonargparse and Lightning wrap what a constructor raised)."""
    seen = {id(exn)}
    while (inner := exn.__cause__ or exn.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exn = inner
    return exn


def _leaves(tree: object, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(tree, dict):
        return [leaf for k, v in tree.items() for leaf in _leaves(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(tree, (list, tuple)):
        return [leaf for i, v in enumerate(tree) for leaf in _leaves(v, f"{prefix}[{i}]")]
    return [(prefix, tree)]


def blame_key(message: str, config: dict) -> str | None:
    """The one config key a failure message points at: a key whose name is a word of the message
    (``batch_size must be >= 1``), else the one key whose value it quotes (a checkpoint path, ``-5``; not a value
    that is one plain word)."""
    every = [(k, v) for k, v in _leaves(config) if not k.startswith(("config", "__"))]
    leaves = [(k, v) for k, v in every if v is not None and not isinstance(v, bool)]
    def named(key: str) -> bool:  # "data.val" for data.init_args.val, or an identifier like batch_size
        last = key.rsplit(".", 1)[-1]
        short = f"{key.split('.', 1)[0]}.{last}"
        return short in message or ("_" in last and re.search(rf"(?<![\w.]){re.escape(last)}(?!\w)", message) is not None)

    by_name = [k for k, _ in every if named(k)]
    if len(by_name) == 1:
        return by_name[0]
    # a value that is one plain word ("last", "cosine") also occurs in prose ("most recent call last"): not by value
    by_value = [k for k, v in leaves if len(str(v)) >= 2 and not re.fullmatch(r"[A-Za-z]+", str(v))
                and re.search(rf"(?<![\w./-]){re.escape(str(v))}(?![\w/]|\.\d)", message)]
    return by_value[0] if len(by_value) == 1 else None


def describe_failure(exn: BaseException, config: dict) -> str:
    """One line: ``<config key>: <what went wrong>`` (the key where one can be named)."""
    cause = root_cause(exn)
    text = " ".join(str(cause).split()) or type(cause).__name__
    if not isinstance(cause, (ValueError, TypeError, FileNotFoundError, KeyError)):
        text = f"{type(cause).__name__}: {text}"
    key = blame_key(str(cause), config)
    return f"{key}: {text}" if key else text
