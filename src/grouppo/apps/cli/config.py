"""What the commands share: the parser that reads dataclasses and a YAML ``--config``, help that shows
defaults, and the checks every command makes before a model loads (where output goes, the checkpoint to
resume from, the data file)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

from grouppo.data import DataError


class CommandError(Exception):
    """A problem the user can fix that is not a bad option (an unwritable output_dir, no checkpoint to
    resume from): the command line prints it as ``error: <message>`` and exits with 1."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help (unless it is None, or the help says what it is); descriptions
    keep their line breaks (each line wrapped)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or "").lower():
            return action.help or ""
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(
            textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent) if line else line
            for line in text.splitlines()
        )


def dataclass_parser(dataclass_types: tuple[type, ...], **kwargs: Any) -> Any:
    """An ``HfArgumentParser`` over ``dataclass_types``, with grouppo's help and a ``--config`` YAML file
    (``parse_with_config``); a dict field takes a JSON object on the command line."""
    from transformers import HfArgumentParser

    # allow_abbrev=False: a prefix of an option (TRL's --label_smoothing of label_smoothing_factor) must
    # not silently become another option.
    parser = HfArgumentParser(dataclass_types, formatter_class=HelpFormatter, allow_abbrev=False, **kwargs)
    parser.add_argument("--config", help="YAML file of any of the options below; flags override it.")
    for action in parser._actions:
        if (typing.get_origin(action.type) or action.type) is dict:
            action.type = _json_mapping
    return parser


def _json_mapping(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def parse_with_config(parser: Any, argv: list[str], defaults: dict[str, Any] | None = None) -> tuple:
    """The parser's dataclasses from ``argv``, as TRL's ``TrlParser`` reads them: the ``--config`` YAML
    file's values become the options' defaults, flags override them, and ``defaults`` (a command's own)
    sit under both. Each YAML value is converted as the same flag would be; a bad one is a usage error
    naming the file, the key, the value and what was expected."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv)[0].config
    parser.set_defaults(**(defaults or {}))
    if path:
        parser.set_defaults(**config_values(parser, path))
    try:
        *values, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except ValueError as error:  # a config's own checks (__post_init__)
        parser.error(str(error))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return tuple(values)


TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
VALUE_WORDS = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
    type(None): "null",
}


def config_values(parser: Any, path: str) -> dict[str, Any]:
    """The YAML mapping of ``path`` as parser defaults (dest -> value), each value checked and converted
    as its flag's would be."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except FileNotFoundError:
        parser.error(f"--config {path}: no such file")
    except OSError as error:
        parser.error(f"--config {path}: cannot be read ({error.strerror or error})")
    except yaml.YAMLError as error:
        parser.error(f"{path}: not valid YAML ({str(error).splitlines()[0]})")
    values = {} if values is None else values
    if not isinstance(values, dict):
        got = VALUE_WORDS.get(type(values), type(values).__name__)
        parser.error(
            f"{path}: expected a mapping of option names to values (`beta: 0.1`, one per line), "
            f"got {got}: {values!r}"[:400]
        )
    # One key per option, its own name (not the --no_x form of a switch, nor --help and --config).
    options = {a.dest: a for a in parser._actions if f"--{a.dest}" in a.option_strings}
    options.pop("config", None)
    options.pop("help", None)
    hints = {}
    for dtype in parser.dataclass_types:
        hints.update(typing.get_type_hints(dtype))
    out = {}
    for key, value in values.items():
        action = options.get(key) if isinstance(key, str) else None
        if action is None:
            near = difflib.get_close_matches(str(key), list(options), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            parser.error(f"{path}: unknown key {key!r}{hint}; `{parser.prog} --help` lists the options")
        try:
            out[action.dest] = _converted(action, hints.get(action.dest), value)
        except ValueError as error:
            got = VALUE_WORDS.get(type(value), type(value).__name__)
            expected = _expected(hints.get(action.dest), action.choices)
            detail = f" ({error})" if str(error) else ""
            parser.error(f"{path}: key {key!r} has the value {value!r} ({got}); expected {expected}{detail}")
    return out


def _union(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _admits(annotation: Any, kind: type) -> bool:
    return any(option is kind or typing.get_origin(option) is kind for option in _union(annotation))


def _converted(action: argparse.Action, annotation: Any, value: Any) -> Any:
    """``value`` from YAML as the option's flag would give it; ValueError where the flag would refuse it."""
    if value is None:
        if not (_admits(annotation, type(None)) or action.default is None):
            raise ValueError("")
        return None
    if isinstance(value, list):
        several = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
        if not several and not _admits(annotation, list):
            raise ValueError("")
        if any(isinstance(item, list | dict) or item is None for item in value):
            raise ValueError("each item a single value")
        return [_scalar(action, item) for item in value]
    if isinstance(value, dict):
        if not _admits(annotation, dict):
            raise ValueError("")
        return value
    return _scalar(action, value)


def _scalar(action: argparse.Action, value: Any) -> Any:
    if isinstance(value, bool):
        # YAML 1.1 reads a bare `no` as false: for an option whose choices include "no", it means "no".
        token = (
            "no" if value is False and action.choices is not None and "no" in action.choices else str(value)
        )
    else:
        token = str(value)
    try:
        converted = action.type(token) if callable(action.type) else token
    except argparse.ArgumentTypeError as error:
        raise ValueError(str(error)) from None
    except (TypeError, ValueError):
        raise ValueError("") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError("")
    return converted


def _expected(annotation: Any, choices: Any = None) -> str:
    """The type a field takes (or its choices), in words."""
    if choices is not None:
        return "one of " + ", ".join(str(c) for c in choices)
    words = []
    for option in _union(annotation):
        origin = typing.get_origin(option) or option
        if option is type(None):
            continue
        if origin is list:
            inner = typing.get_args(option)
            words.append(f"a list of {_expected(inner[0]) if inner else 'values'}")
        elif origin is dict:
            words.append("a mapping")
        elif typing.get_origin(option) is typing.Literal:
            words.append("one of " + ", ".join(map(str, typing.get_args(option))))
        else:
            words.append(TYPE_WORDS.get(option, getattr(option, "__name__", str(option))))
    if type(None) in _union(annotation):
        words.append("null")
    return " or ".join(dict.fromkeys(words)) or "a value"


def fields_of(dtype: type) -> set[str]:
    return {f.name for f in dataclasses.fields(dtype)}


# ------------------------------------------------------------------------------ checks before the model
def resume_checkpoint(value: str | None, output_dir: str) -> str | None:
    """The checkpoint ``--resume_from_checkpoint`` names: None (not set, or false), the newest complete
    ``checkpoint-N`` of ``output_dir`` (true: incomplete ones, cut short by a kill or a full disk, are
    skipped and said), or a checkpoint folder; CommandError if there is none."""
    from grouppo.runs import is_complete, latest_complete_checkpoint

    if value is None or value.strip().lower() in ("", "false", "no", "none"):
        return None
    if value.strip().lower() in ("true", "yes", "last", "latest"):
        last, skipped = latest_complete_checkpoint(output_dir)
        if skipped and is_main_process():
            print(f"skipping incomplete checkpoints (their save was cut short): {', '.join(skipped)}")
        if last is None:
            raise CommandError(
                f"--resume_from_checkpoint {value}: output_dir {output_dir!r} holds no complete checkpoint-N "
                "folder to resume from; train without --resume_from_checkpoint, or name a checkpoint folder"
            )
        return last
    if not os.path.isdir(value):
        raise CommandError(
            f"--resume_from_checkpoint {value}: no such checkpoint folder (give a checkpoint-N folder, or "
            "true for the newest complete one in output_dir)"
        )
    if not is_complete(value):
        raise CommandError(
            f"--resume_from_checkpoint {value}: an incomplete checkpoint (its save was cut short: no "
            "trainer_state.json or grouppo_run.json); give a complete one, or true for the newest one"
        )
    return value


def writable_dir(path: str) -> None:
    """CommandError unless ``path`` can be created and written."""
    from grouppo.base import require_writable_dir

    try:
        require_writable_dir(path)
    except OSError as error:
        raise CommandError(str(error)) from None


def output_file(path: str | None, name: str | None = None) -> Path | None:
    """Where a command writes, checked before any model loads (its folder is created; CommandError if it
    cannot be written). With ``name``: a ``.jsonl`` path as it is, any other path a folder that receives
    ``name``."""
    if path is None:
        return None
    out = Path(path) if name is None or path.endswith(".jsonl") else Path(path) / name
    writable_dir(str(out.parent))
    return out


def read_data(
    path_or_name: str, *, split: str = "train", config_name: str | None = None
) -> list[dict[str, Any]]:
    """``grouppo.load.load_records``, with a missing file reported as a data error."""
    from grouppo.load import load_records

    try:
        return load_records(path_or_name, split=split, config_name=config_name)
    except FileNotFoundError as error:
        raise DataError(str(error)) from None


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"
