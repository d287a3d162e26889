"""The options of the tool subcommands (``ldm shards``, ``sample``, ``eval`` ...) in ``ldm fit``'s dialect.

Every tool builds its parser with :class:`ToolParser`, a small subclass of :class:`argparse.ArgumentParser`:

- ``-c FILE`` / ``--config FILE``: a YAML mapping of option values, keys being the option names with dashes or
  underscores (``batch_size: 8`` or ``batch-size: 8``; positionals by their name). Several compose left to right;
  options given on the command line win over every file, wherever they stand (for a repeatable option such as
  ``--prompt``, the command line's values replace the file's list). An unknown key, a value of the wrong type or
  outside the choices exits with status 2 naming the key and the file, as LightningCLI does.
- ``--print_config``: print the fully resolved options as YAML (which ``-c`` reads back) and exit 0; it does not
  require the required options, so ``ldm sample --print_config > sample.yaml`` writes a template.
- ``--help`` shows every option's default.
- One name per concept: an option has one shown name and may keep older names as ``aliases`` (accepted, not
  shown as names, listed in the option's help as ``[also: --cfg]``) so that existing scripts keep working.
  Every dashed long option is also accepted with underscores (``--batch_size``, as ``ldm fit`` spells its
  options), and the reverse. The names the tools share: ``--ckpt`` (a run folder or a .ckpt in one; also
  ``--ckpt_path``, ``ldm fit``'s name), ``--guidance-scale`` (one default, :data:`GUIDANCE_SCALE`, for ``sample``
  and ``eval``), ``--num-images``, ``--batch-size``, ``--shards`` (a shard pattern), ``--out``, ``--seed``,
  ``--size``, ``--device``, ``--precision``, ``--weights``, ``--quiet``.

Subcommands (``ldm shards synthetic``) are ToolParsers too (``add_subparsers`` builds parsers of the parent's
class); ``-c`` and ``--print_config`` belong to the leaf parser, after the subcommand's name. Everything after
``--`` (``ldm submit ... -- -c fit.yaml``) and after the first word of a ``REMAINDER`` positional is left alone.

Why argparse and not jsonargparse function parsers (litgpt's way, DESIGN rule 11): the tools' command lines are
already used by scripts, recipes, docs and tests, with dashed names, repeatable options (``--prompt`` ``--image``
``--var``), ``--no-x`` switches, positionals, an argparse ``REMAINDER`` and subparsers; jsonargparse spells
options with underscores, wants ``--flag true`` or ``ActionYesNo`` for switches and has its own subcommand
machinery, so each tool would have changed its command line for the dialect. This helper adds the dialect to the
parsers as they are (one class, no change to any existing flag), and the options stay plain argparse for
``torchrun --no-python -- ldm ...`` and every caller of ``main(argv)``.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

#: the other names of ``--ckpt`` (a run folder or a .ckpt in one): ``ldm fit``'s ``--ckpt_path``
CKPT_ALIASES = ("--ckpt_path",)
#: the default classifier-free guidance scale of ``ldm sample`` and ``ldm eval`` (one for both)
GUIDANCE_SCALE = 5.0

CONFIG_HELP = ("a YAML file of option values (keys: the option names, with dashes or underscores); repeatable, "
               "composed left to right; options on the command line win")
PRINT_CONFIG_HELP = "print the resolved options as YAML (a file for -c) and exit"
_CONFIG_STRINGS = ("-c", "--config")
_PRINT_STRINGS = ("--print_config", "--print-config")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 without base-60 numbers: ``time: 24:00:00`` is the text SLURM reads, not the integer 86400."""


_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if not tag.endswith((":int", ":float"))]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(
    r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
    r"|\.(?:nan|NaN|NAN)|[-+]?[0-9][0-9_]*(?:[eE][-+]?[0-9]+))$"), list("-+0123456789."))


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default (``(default: 20)``) unless it is None, False, empty or its help already says
    it; shows an option under its own names, not its aliases or underscore spellings."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or "(default" in text or default is None or default is False or \
                default is argparse.SUPPRESS or default in ([], ""):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = getattr(action, "shown_option_strings", None)
        if shown:
            action = copy.copy(action)
            action.option_strings = list(shown)
        return super()._format_action_invocation(action)


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """:class:`HelpFormatter` keeping the description's line breaks (a module docstring as the description)."""


class _Append(argparse._AppendAction):
    """``action="append"`` whose first value on the command line replaces a list read from ``-c``."""

    def __call__(self, parser, namespace, values, option_string=None):
        replace = getattr(parser, "_replace_on_append", set())
        if self.dest in replace:
            replace.discard(self.dest)
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)


class _Aliases:
    """``add_argument(*names, aliases=(...))`` for a parser and its argument groups."""

    def add_argument(self, *names: str, aliases: Sequence[str] = (), **kwargs: Any) -> argparse.Action:
        if not names or not names[0].startswith("-"):  # a positional
            return super().add_argument(*names, **kwargs)
        strings = [*names, *aliases]
        for s in list(strings):  # --batch-size also as --batch_size, --ckpt_path also as --ckpt-path
            if s.startswith("--"):
                for other in ("--" + s[2:].replace("-", "_"), "--" + s[2:].replace("_", "-")):
                    if other not in strings:
                        strings.append(other)
        if aliases and kwargs.get("help") not in (None, argparse.SUPPRESS):
            kwargs["help"] = f"{kwargs['help']} [also: {', '.join(aliases)}]"
        action = super().add_argument(*strings, **kwargs)
        action.shown_option_strings = list(names)
        return action


class _Group(_Aliases, argparse._ArgumentGroup):
    pass


class ToolParser(_Aliases, argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` that reads ``-c FILE``, prints ``--print_config`` and shows defaults."""

    def __init__(self, *args: Any, formatter_class: type = HelpFormatter, **kwargs: Any):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
        self.register("action", "append", _Append)
        self._replace_on_append: set[str] = set()

    def add_argument_group(self, *args: Any, **kwargs: Any) -> _Group:
        group = _Group(self, *args, **kwargs)
        self._action_groups.append(group)
        return group

    # -- the config options exist on leaf parsers (no subcommands), added when first needed --
    def _is_leaf(self) -> bool:
        return self._subparsers is None

    def _add_config_options(self) -> None:
        if not self._is_leaf() or "--config" in self._option_string_actions:
            return
        group = self.add_argument_group("config")
        group.add_argument("-c", "--config", action="append", metavar="FILE", help=CONFIG_HELP)
        group.add_argument("--print_config", action="store_true", help=PRINT_CONFIG_HELP)

    def format_help(self) -> str:
        self._add_config_options()
        return super().format_help()

    def format_usage(self) -> str:
        self._add_config_options()
        return super().format_usage()

    def _get_option_tuples(self, option_string: str) -> list:
        # an abbreviation matching one option under several spellings (--batch-size, --batch_size) is not ambiguous
        seen, unique = set(), []
        for t in super()._get_option_tuples(option_string):
            if id(t[0]) not in seen:
                seen.add(id(t[0]))
                unique.append(t)
        return unique

    # -- -c FILE and --print_config --
    def option_actions(self) -> dict[str, argparse.Action]:
        """The options a config file may set, by canonical key (the first long name with underscores; a
        positional by its name)."""
        out = {}
        for action in self._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or \
                    action.dest in ("config", "print_config") or action.help is argparse.SUPPRESS:
                continue
            out[config_key(action)] = action
        return out

    def _key_index(self) -> dict[str, argparse.Action]:
        index = {}
        for key, action in self.option_actions().items():
            names = [key, action.dest, *(s.lstrip("-") for s in action.option_strings if s.startswith("--"))]
            for name in names:
                index.setdefault(name.replace("-", "_"), action)
        return index

    def _split(self, args: list[str]) -> tuple[list[str], list[str], bool]:
        """(the arguments without -c/--print_config, the config files in order, whether --print_config)."""
        configs, rest, printing = [], [], False
        remainder = any(a.nargs == argparse.REMAINDER for a in self._actions)
        i, expects_value = 0, False
        while i < len(args):
            arg = args[i]
            if arg == "--" or (remainder and not expects_value and not arg.startswith("-")):
                rest += args[i:]
                break
            if arg in _CONFIG_STRINGS or arg.startswith("--config="):
                if "=" in arg:
                    configs.append(arg.split("=", 1)[1])
                elif i + 1 < len(args):
                    configs.append(args[i + 1])
                    i += 1
                else:
                    self.error(f"argument {arg}: expected one argument")
            elif arg in _PRINT_STRINGS:
                printing = True
            else:
                action = self._option_string_actions.get(arg)
                if action is None and arg.startswith("--") and "=" not in arg:  # an abbreviation
                    matches = self._get_option_tuples(arg)
                    action = matches[0][0] if len(matches) == 1 else None
                expects_value = action is not None and action.nargs != 0
                rest.append(arg)
            i += 1
        return rest, configs, printing

    def _read_config(self, path: str) -> dict[str, tuple[argparse.Action, Any]]:
        """dest -> (action, value) of one config file, checked and converted."""
        if not Path(path).is_file():
            self.error(f"-c {path}: no such file")
        try:
            data = yaml.load(Path(path).read_text(), Loader=_Loader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            self.error(f"-c {path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}")
        if data is None:
            return {}
        if not isinstance(data, dict):
            self.error(f"-c {path}: expected a mapping of option names to values, got {type(data).__name__}")
        index, out = self._key_index(), {}
        for key, value in data.items():
            action = index.get(str(key).replace("-", "_"))
            if action is None:
                close = difflib.get_close_matches(str(key).replace("-", "_"), list(self.option_actions()), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"the options: {', '.join(self.option_actions())}"
                self.error(f"-c {path}: unknown key {key!r} ({hint})")
            out[action.dest] = (action, self._convert(action, value, f"-c {path}: key {key!r}"))
        return out

    def _convert(self, action: argparse.Action, value: Any, where: str) -> Any:
        if value is None:
            return None
        if action.nargs == 0:  # store_true / store_false / store_const
            if not isinstance(value, bool):
                self.error(f"{where}: expected true or false, got {value!r}")
            return value
        many = isinstance(action, argparse._AppendAction) or action.nargs in (
            argparse.ZERO_OR_MORE, argparse.ONE_OR_MORE, argparse.REMAINDER) or isinstance(action.nargs, int)
        if many:
            if not isinstance(value, list):
                value = [value]
            return [self._convert_one(action, v, where) for v in value]
        if isinstance(value, (list, dict)):
            self.error(f"{where}: expected one value, got {value!r}")
        return self._convert_one(action, value, where)

    def _convert_one(self, action: argparse.Action, value: Any, where: str) -> Any:
        text = value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
        try:
            converted = action.type(text) if callable(action.type) else text
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            self.error(f"{where}: invalid value {value!r}: {e}")
        if action.choices is not None and converted not in action.choices:
            self.error(f"{where}: invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})")
        return converted

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        if not self._is_leaf():
            return super().parse_known_args(args, namespace)
        self._add_config_options()
        args = list(sys.argv[1:] if args is None else args)
        rest, configs, printing = self._split(args)
        values: dict[str, tuple[argparse.Action, Any]] = {}
        for path in configs:
            values.update(self._read_config(path))
        saved = [(a, a.default, a.required, a.nargs) for a in self._actions]
        self._replace_on_append = {d for d, (a, _) in values.items() if isinstance(a, argparse._AppendAction)}
        try:
            for action in self._actions:
                given = action.dest in values
                if given:
                    action.default = values[action.dest][1]
                if given or printing:  # a value from -c (or a template to print) satisfies a required option
                    action.required = False
                    if not action.option_strings and action.nargs in (None, argparse.ONE_OR_MORE):
                        action.nargs = argparse.OPTIONAL if action.nargs is None else argparse.ZERO_OR_MORE
            namespace, extras = super().parse_known_args(rest, namespace)
        finally:
            for action, default, required, nargs in saved:
                action.default, action.required, action.nargs = default, required, nargs
            self._replace_on_append = set()
        for dest, (action, value) in values.items():
            if action.nargs == argparse.REMAINDER and getattr(namespace, dest, None) == [] and value:
                setattr(namespace, dest, value)  # an empty REMAINDER on the command line keeps the file's
        for dest in ("config", "print_config"):
            if hasattr(namespace, dest):
                delattr(namespace, dest)
        if printing:
            print(self.dump(namespace), end="")
            self.exit(0)
        missing = [a for a in self._actions if a.dest in values and getattr(namespace, a.dest, None) in (None, []) and
                   (a.required or (not a.option_strings and a.nargs in (None, argparse.ONE_OR_MORE)))]
        if missing:
            self.error("the following arguments are required (null in a -c file): " +
                       ", ".join(a.option_strings[0] if a.option_strings else a.dest for a in missing))
        return namespace, extras

    def dump(self, namespace: argparse.Namespace) -> str:
        """The options of ``namespace`` as the YAML that ``-c`` reads."""
        return yaml.safe_dump({key: _plain(getattr(namespace, action.dest, None))
                               for key, action in self.option_actions().items()}, sort_keys=False)


def config_key(action: argparse.Action) -> str:
    """An option's key in a config file: its first long name with underscores (``batch_size``); a positional's
    name."""
    longs = [s for s in getattr(action, "shown_option_strings", None) or action.option_strings if s.startswith("--")]
    return (longs[0][2:] if longs else action.dest).replace("-", "_")


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
