"""``generate --config FILE``: a JSON file of generate's options, read as command-line tokens.

The file's options go in front of the command line's, so argparse checks them as it checks those, and the command
line overrides them (its ``--schedule`` replaces the file's). Messages name the file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def config_file_args(argv: list[str], generate: argparse.ArgumentParser) -> list[str]:
    """``argv`` with the options of its ``--config`` file (if any) in front; ``generate``: generate's parser."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config or not argv or argv[0] != "generate":
        return argv
    path = Path(known.config)
    values = _read_config(path)
    actions = {action.dest: action for action in generate._actions  # noqa: SLF001
               if action.option_strings and action.dest not in ("help", "config")}
    unknown = sorted(set(key.replace("-", "_") for key in values) - set(actions))
    if unknown:
        raise ValueError(f"config file {path} has unknown options {unknown}; use generate's option names")
    tokens = []
    for key, value in values.items():
        action = actions[key.replace("-", "_")]
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
            if not isinstance(value, bool):
                raise ValueError(f"config file {path}: {key} takes true or false, got {value!r}")
            tokens += [flag] if value else []
        elif isinstance(action, argparse._AppendAction):  # noqa: SLF001
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
                raise ValueError(f"config file {path}: {key} takes a list of \"FRAME:PROMPT\" strings, got {value!r}")
            if not _given(argv[1:], action):  # the command line's schedule replaces the file's
                tokens += [f"{flag}={item}" for item in items]
        elif value is not None:
            _check_config_value(path, key, value, action)
            tokens.append(f"{flag}={value}")  # "=": a value may start with "-"
    return [argv[0], *tokens, *argv[1:]]


def _given(args: list[str], action: argparse.Action) -> bool:
    """Whether ``args`` give ``action``'s option in any form argparse takes (``--schedule X``, ``--schedule=X``, or
    abbreviated, ``--sched X``)."""
    alone = argparse.ArgumentParser(add_help=False)
    alone.add_argument(*action.option_strings, dest="given", action="append")
    return alone.parse_known_args(args)[0].given is not None


def _read_config(path: Path) -> dict:
    if path.is_dir():
        raise IsADirectoryError(f"config file {path} is a folder; give the .json file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {path} is not valid JSON (UTF-8): {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a JSON object of generate options")
    return values


def _check_config_value(path: Path, key: str, value, action: argparse.Action) -> None:
    """A config file's value as argparse would check it on the command line, in a message that names the file."""
    if isinstance(value, (bool, list, dict)):
        raise ValueError(f"config file {path}: {key} takes a single value, got {value!r}")
    try:
        converted = action.type(str(value)) if action.type else str(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        kind = getattr(action.type, "__name__", "value")
        raise ValueError(f"config file {path}: {key} takes {'an' if kind == 'int' else 'a'} {kind}, got "
                         f"{value!r}") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"config file {path}: {key} must be one of {list(action.choices)}, got {value!r}")
