"""The ``grouppo`` command line.

Every command takes --help (its options, with their defaults). The model, the data and where results go
have the same names in every command (the older spellings in brackets still work):

grouppo quickstart [--output_dir runs/quickstart]                    # the main job: eval, train, eval
grouppo groupdpo --config cfg.yaml [--any_config_field value ...]    # offline training, like `trl dpo`
grouppo online --dataset_name P.jsonl --reward_funcs ifeval [...]    # online: sample, score, train
grouppo gdpo [--dataset_name D] [--any_config_field value ...]       # GDPO (default: embedded opinions)
grouppo sample --dataset_name P --num_generations K --output_dir OUT # self-sampled, scored groups
grouppo eval {ifeval,ifbench} --model_name_or_path M [--limit N] [--json OUT]  # instruction following
grouppo eval gdpo --model_name_or_path M --dataset_name D --json OUT # JS distance, majority bias
grouppo generate --dataset_name D --mode {belief,free} --output_dir OUT  # a belief, then the answer
grouppo data validate PATH [--positive_rule R] [--skip_invalid]      # check group or belief data
grouppo data convert --from {gdpo,trl,ultrafeedback} IN OUT          # write JSONL groups / beliefs
grouppo data make-if-prompts --n N --seed S OUT.jsonl                # instruction-following prompts
grouppo data make-opinions --seed S OUT_DIR                          # GDPO opinion data
grouppo demo [--output_dir runs/demo]                                # synthetic task, tiny model
grouppo bench [--strategies ...] [--group_sizes ...]                 # speed and memory, side by side

[older spellings: --model for --model_name_or_path; --out for --output_dir; --prompts (sample, eval) and
--dataset (generate, eval gdpo) for --dataset_name; dashes in bench's options (--group-sizes).]

Without --model_name_or_path the embedded SmolLM2-135M-Instruct is used. The training commands check
everything they can before the model loads (the --config file, output_dir, the data, the checkpoint to
resume from); a problem is reported as `error: <what, where>` on stderr, with exit code 1 (2 for a bad
option, as argparse does).
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import difflib
import importlib.metadata
import json
import os
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from grouppo.convert import CONVERTERS, convert_file, validate_file
from grouppo.data import POSITIVE_RULES, DataError, prepare_prompt_records
from grouppo.load import load_records, write_jsonl


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


class CommandError(Exception):
    """A problem the user can fix that is not a bad option (an unwritable output_dir, no checkpoint to
    resume from): ``main`` prints it as ``error: <message>`` and exits with 1."""


def version() -> str:
    """The installed grouppo's version."""
    try:
        return importlib.metadata.version("grouppo")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _read(path_or_name: str, *, split: str = "train", config_name: str | None = None) -> list[dict[str, Any]]:
    """``load_records``, with a missing file reported as a data error."""
    try:
        return load_records(path_or_name, split=split, config_name=config_name)
    except FileNotFoundError as error:
        raise DataError(str(error)) from None


# ------------------------------------------------------------------------------------- training commands
@dataclass
class ScriptArguments:
    """Model, data and PEFT options of the training commands (the training options are the config's)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub name or local path of the model (default: the embedded SmolLM2-135M-Instruct)."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "JSONL/JSON/Parquet file, local dataset directory or Hub dataset name."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation data (file, dir or name). Default: the dataset_test_split of dataset_name "
            "when it has one and eval_strategy is not 'no' (as TRL does)."
        },
    )
    dataset_test_split: str = field(
        default="test",
        metadata={"help": "Split to evaluate on (of eval_dataset_name, else of dataset_name)."},
    )
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reference model (default: policy)."}
    )
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, float32, bfloat16, float16."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (default: PEFT's choice for the architecture)."}
    )


# ``grouppo gdpo`` without --dataset_name: the embedded opinion data and these defaults (6 min 41 s from a
# clean clone on a 2-core CPU with the embedded model); any flag or YAML key overrides them.
GDPO_EMBEDDED_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/gdpo",
    "num_train_epochs": 1,
    "per_device_train_batch_size": 4,  # question x population groups (~15 rows each)
    "learning_rate": 5e-5,
    "lr_scheduler_type": "constant",
    "logging_steps": 4,
    "save_strategy": "no",
    "precompute_ref_logps": True,
    "max_length": 256,
    # Coupled: a batch of 4 short groups holds little activation memory, and on a CPU the decoupled
    # backward's extra forward would cost a quarter of the step.
    "response_chunk_size": None,
}

TRAINING_DESCRIPTIONS = {
    "groupdpo": "GroupDPO on group records (prompt, K responses, scores or labels), or on TRL pairwise or "
    "UltraFeedback data, converted.",
    "online": "Online GroupDPO: each step samples num_generations responses per prompt record from the "
    "policy, scores them with reward_funcs and trains on the groups.",
    "gdpo": "GDPO on belief records; without --dataset_name, the embedded opinion data and defaults fit "
    "for a CPU.",
}
TRAINING_EPILOG = (
    "Every option is also a key of the YAML --config file (`beta: 0.1`; a list for an option taking "
    "several values, true/false for a switch); flags given after it override it. --resume_from_checkpoint "
    "takes a checkpoint folder, or true for the latest checkpoint-N in output_dir."
)


def _trainer_classes(kind: str) -> tuple[type, type]:
    if kind == "online":
        from grouppo.online.trainer import OnlineGroupDPOConfig, OnlineGroupDPOTrainer

        return OnlineGroupDPOConfig, OnlineGroupDPOTrainer
    if kind == "gdpo":
        from grouppo.gdpo.trainer import GDPOConfig, GDPOTrainer

        return GDPOConfig, GDPOTrainer
    from grouppo.groupdpo import GroupDPOConfig, GroupDPOTrainer

    return GroupDPOConfig, GroupDPOTrainer


def _json_mapping(text: str) -> dict[str, Any]:
    """argparse type of a dict option: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def training_parser(kind: str) -> Any:
    """The HfArgumentParser of ``grouppo {kind}``: ScriptArguments, the trainer's config and --config."""
    from transformers import HfArgumentParser

    config_class, _ = _trainer_classes(kind)
    parser = HfArgumentParser(
        (ScriptArguments, config_class),
        prog=f"grouppo {kind}",
        usage=f"grouppo {kind} [--config CONFIG.yaml] [--option value ...]",
        description=TRAINING_DESCRIPTIONS[kind],
        epilog=TRAINING_EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of any of the options below; flags override it.")
    for action in parser._actions:
        if action.dest == "resume_from_checkpoint":
            action.help = (
                "A checkpoint folder to resume training from, or true: the latest checkpoint-N in "
                "output_dir (an error if there is none)."
            )
        kind_of = typing.get_origin(action.type) or action.type
        if kind_of is dict:  # HfArgumentParser leaves a dict field uncallable from the command line
            action.type = _json_mapping
    return parser


def _field_types(parser: Any) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for dtype in parser.dataclass_types:
        try:
            hints.update(typing.get_type_hints(dtype))
        except (NameError, TypeError):
            hints.update({f.name: f.type for f in dataclasses.fields(dtype)})
    return hints


def _union_args(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _admits(annotation: Any, kind: type) -> bool:
    """Whether a field of type ``annotation`` takes a value of Python type ``kind`` (list, dict, None)."""
    for option in _union_args(annotation):
        if option is kind or typing.get_origin(option) is kind:
            return True
    return False


TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
VALUE_WORDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a mapping", type(None): "null"}  # fmt: skip


def _expected(annotation: Any, choices: Any = None) -> str:
    """The type a field takes (or its choices), in words."""
    if choices is not None:
        return "one of " + ", ".join(str(c) for c in choices)
    words = []
    for option in _union_args(annotation):
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
    if type(None) in _union_args(annotation):
        words.append("null")
    return " or ".join(dict.fromkeys(words)) or "a value"


def _convert(action: argparse.Action, token: str) -> Any:
    """What argparse makes of ``token`` for ``action``; raises ValueError where it would refuse it."""
    try:
        value = action.type(token) if callable(action.type) else token
    except argparse.ArgumentTypeError as error:  # a message written for the user
        raise ValueError(str(error)) from None
    except (TypeError, ValueError):  # int("2.5"): the expected type says it all
        raise ValueError("") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError("")
    return value


def _token(value: Any, action: argparse.Action) -> str:
    if isinstance(value, bool):
        # YAML 1.1 reads a bare `no` as false: for an option whose choices include "no", it means "no".
        if value is False and action.choices is not None and "no" in action.choices:
            return "no"
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def config_arguments(parser: Any, path: str) -> tuple[list[str], dict[str, Any], set[str]]:
    """The YAML mapping of ``path`` as what the parser reads: the argv tokens that spell it, the values no
    token can spell (null, an empty list, a list for an option that takes one value of list type) as
    parser defaults, and the option names (dests) it sets.

    Each value is checked as the same flag would be (its type, its choices, one value or several), so a
    bad one is an error naming the file, the key, the value and the type expected (``parser.error``: exit
    2, before anything is loaded).
    """
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except FileNotFoundError:
        parser.error(f"--config {path}: no such file")
    except OSError as error:
        parser.error(f"--config {path}: cannot be read ({error.strerror or error})")
    except yaml.YAMLError as error:
        parser.error(f"{path}: not valid YAML ({str(error).splitlines()[0]})")
    if values is None:
        values = {}
    if not isinstance(values, dict):
        parser.error(
            f"{path}: expected a mapping of option names to values (`beta: 0.1`, one per line), got "
            f"{VALUE_WORDS.get(type(values), type(values).__name__)}: {values!r}"[:400]
        )
    hints = _field_types(parser)
    options = {
        string[2:]: action
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and action.dest != "config"
        for string in action.option_strings
        if string.startswith("--")
    }
    tokens: list[str] = []
    defaults: dict[str, Any] = {}
    dests: set[str] = set()
    for key, value in values.items():
        action = options.get(key) if isinstance(key, str) else None
        if action is None:
            near = difflib.get_close_matches(str(key), [k for k in options if "-" not in k], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            parser.error(f"{path}: unknown key {key!r}{hint}; `{parser.prog} --help` lists the options")
        annotation = hints.get(action.dest)
        expected = "true or false" if action.nargs == 0 else _expected(annotation, action.choices)
        got = VALUE_WORDS.get(type(value), type(value).__name__)

        def bad(detail: str = "", key: Any = key, value: Any = value, got: str = got, exp: str = expected):
            parser.error(f"{path}: key {key!r} has the value {value!r} ({got}); expected {exp}{detail}")

        option = f"--{key}"
        dests.add(action.dest)
        if action.nargs == 0:  # a switch: --no_x
            if not isinstance(value, bool):
                bad()
            tokens += [option] if value else []
        elif value is None:
            if not (_admits(annotation, type(None)) or action.default is None):
                bad()
            defaults[action.dest] = None
        elif isinstance(value, list):
            several = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
            if not several and not _admits(annotation, list):
                bad()
            if any(isinstance(item, list | dict) or item is None for item in value):
                bad(" (each item a single value)")
            try:
                converted = [_convert(action, _token(item, action)) for item in value]
            except ValueError as error:
                bad(f" ({error})" if str(error) else "")
            if several and value:
                tokens += [option, *(_token(item, action) for item in value)]
            else:
                defaults[action.dest] = converted
        elif isinstance(value, dict) and not _admits(annotation, dict):
            bad()
        else:
            token = _token(value, action)
            try:
                _convert(action, token)
            except ValueError as error:
                bad(f" ({error})" if str(error) else "")
            tokens.append(f"{option}={token}")
    return tokens, defaults, dests


def resume_checkpoint(value: str | None, output_dir: str) -> str | None:
    """The checkpoint ``--resume_from_checkpoint`` names: None (not set, or false), the latest
    ``checkpoint-N`` of ``output_dir`` (true), or a checkpoint folder; CommandError if there is none."""
    from transformers.trainer_utils import get_last_checkpoint

    if value is None or value.strip().lower() in ("", "false", "no", "none"):
        return None
    if value.strip().lower() in ("true", "yes", "last", "latest"):
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise CommandError(
                f"--resume_from_checkpoint {value}: output_dir {output_dir!r} holds no checkpoint-N folder "
                "to resume from; train without --resume_from_checkpoint, or name a checkpoint folder"
            )
        return last
    if not os.path.isdir(value):
        raise CommandError(
            f"--resume_from_checkpoint {value}: no such checkpoint folder (give a checkpoint-N folder, or "
            "true for the latest one in output_dir)"
        )
    return value


def _check_output_dir(output_dir: str) -> None:
    from grouppo.base import require_writable_dir

    try:
        require_writable_dir(output_dir)
    except OSError as error:
        raise CommandError(str(error)) from None


def _group_data(records: list[dict[str, Any]], config: Any, source: str) -> list[dict[str, Any]]:
    """Group data in any format ``to_group_records`` reads, as group records, checked as the trainer
    will check them (the first bad record raises, unless the config skips invalid groups)."""
    from grouppo.convert import to_group_records
    from grouppo.data import prepare_groups

    skip = config.skip_invalid_groups
    groups, message = to_group_records(
        records, merge_prompts=config.merge_prompts, skip_invalid=skip, source=source
    )
    if _is_main_process():
        print(message, flush=True)
    if not skip:
        prepare_groups(groups, positive_rule=config.positive_rule, skip_invalid=False, source=source)
    return groups


def _belief_data(records: list[dict[str, Any]], config: Any, source: str) -> list[dict[str, Any]]:
    from grouppo.data import prepare_belief_records

    if not config.skip_invalid_records:  # skipped ones would be reported twice; the trainer counts them
        prepare_belief_records(records, skip_invalid=False, source=source)
    return records


def training_data(kind: str, script: ScriptArguments, config: Any) -> tuple[list, list | None]:
    """The training and evaluation records of a training command, read and checked before any model
    loads. Without ``eval_dataset_name``, evaluation takes ``dataset_test_split`` of the training data
    set when it has that split and evaluation is on (``eval_strategy`` not "no"), as TRL does."""
    from grouppo.load import dataset_splits

    name = script.dataset_name
    train = _read(name, split=script.dataset_train_split, config_name=script.dataset_config)
    eval_name, eval_config = script.eval_dataset_name, None
    evaluating = config.eval_strategy != "no"
    if eval_name is None and evaluating:
        if script.dataset_test_split in dataset_splits(name, script.dataset_config):
            eval_name, eval_config = name, script.dataset_config
        else:
            raise CommandError(
                f"eval_strategy is {str(getattr(config.eval_strategy, 'value', config.eval_strategy))!r} but "
                f"there is no evaluation data: {name} has no {script.dataset_test_split!r} split; give "
                "--eval_dataset_name (or --dataset_test_split), or --eval_strategy no"
            )
    evaluation = None
    if eval_name is not None:
        evaluation = _read(eval_name, split=script.dataset_test_split, config_name=eval_config)
    eval_source = f"{eval_name} ({script.dataset_test_split})" if eval_name == name else eval_name
    if kind == "gdpo":
        train = _belief_data(train, config, name)
        evaluation = None if evaluation is None else _belief_data(evaluation, config, eval_source)
    else:
        train = prepare_prompt_records(train, name) if kind == "online" else _group_data(train, config, name)
        evaluation = None if evaluation is None else _group_data(evaluation, config, eval_source)
    return train, evaluation


def parse_training_arguments(argv: list[str], kind: str) -> tuple[Any, ScriptArguments, Any, bool]:
    """Parse a training command's argv (the --config YAML first, flags over it) into (parser, script
    arguments, config, embedded); ``embedded``: gdpo without --dataset_name (the embedded opinions)."""
    parser = training_parser(kind)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    tokens, defaults, dests = [], {}, set()
    if known.config:
        tokens, defaults, dests = config_arguments(parser, known.config)
    parser.set_defaults(**defaults)
    full = [*tokens, *argv]
    probe = parser.parse_args(full)  # argparse's own errors first (an unknown flag, a value of a bad type)
    embedded = kind == "gdpo" and not probe.dataset_name
    if embedded:
        parser.set_defaults(**{k: v for k, v in GDPO_EMBEDDED_DEFAULTS.items() if k not in dests})
    try:
        script, config, *_ = parser.parse_args_into_dataclasses(full)
    except ValueError as error:  # a config's own checks (__post_init__)
        parser.error(str(error))
    except OSError as error:
        raise CommandError(str(error)) from None
    if not embedded and not script.dataset_name:
        parser.error("--dataset_name is required (as a flag or a key of --config)")
    if kind == "online" and not config.reward_funcs:
        parser.error("--reward_funcs is required (built-in names such as ifeval, module:function paths "
                     "or reward model names; as a flag or a key of --config)")  # fmt: skip
    return parser, script, config, embedded


def _train(argv: list[str], kind: str = "groupdpo") -> int:
    from grouppo.models import load_tokenizer, resolve_model

    _, trainer_class = _trainer_classes(kind)
    _, script, config, embedded = parse_training_arguments(argv, kind)
    # Everything that can be checked without the model is, first: output_dir, the checkpoint, the data.
    _check_output_dir(config.output_dir)
    resume = resume_checkpoint(config.resume_from_checkpoint, config.output_dir)
    if embedded:
        from grouppo.embedded.opinions import write_opinions

        data_dir = f"{config.output_dir}/data"
        # Seed 0 always, as `grouppo data make-opinions` writes by default: the splits (and so the
        # held-out test questions) do not move with the training seed.
        write_opinions(data_dir, seed=0, template=config.belief_template)
        script.dataset_name = f"{data_dir}/train.jsonl"
        if config.eval_strategy != "no":  # else its reference pass would be computed for nothing
            script.eval_dataset_name = script.eval_dataset_name or f"{data_dir}/eval.jsonl"
        print(f"embedded opinion data (seed 0) written to {data_dir}")
    train, evaluation = training_data(kind, script, config)

    model = resolve_model(script.model_name_or_path)
    init = dict(config.model_init_kwargs or {})
    if script.dtype != "auto":
        init.setdefault("dtype", script.dtype)
    config.model_init_kwargs = init
    peft_config = None
    if script.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=script.lora_r,
            lora_alpha=script.lora_alpha,
            lora_dropout=script.lora_dropout,
            target_modules=script.lora_target_modules,
            task_type="CAUSAL_LM",
        )
    trainer = trainer_class(
        model,
        ref_model=script.ref_model_name_or_path,
        args=config,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=load_tokenizer(model),
        peft_config=peft_config,
    )
    if _is_main_process():
        print(f"training with {trainer.describe_setup()}", flush=True)
    if resume is not None and _is_main_process():
        print(f"resuming from {resume}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    if evaluation is not None:
        print(trainer.evaluate())
    # Every rank waits for the others and the process group is torn down here, not left to the
    # interpreter's teardown (see ``run`` for why that teardown is skipped under a launcher).
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    print(f"saved to {config.output_dir}")
    return 0


# ---------------------------------------------------------------------------------------------------- data
def data_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grouppo data", description="Validate, convert or make data.", formatter_class=HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    check = command(
        "validate",
        "Check a data set (group records, TRL pairs, UltraFeedback, belief records) and summarize it; exit "
        "code 1 when it holds nothing to train on.",
    )
    check.add_argument("path", help="JSONL/JSON/Parquet file, dataset directory or Hub name")
    check.add_argument("--positive_rule", default="top_bottom", choices=POSITIVE_RULES,
                       help="How scores become labels.")  # fmt: skip
    check.add_argument("--skip_invalid", action="store_true", help="Count bad records instead of stopping.")
    check.add_argument("--merge_prompts", action="store_true", help="Pairs: one group per distinct prompt.")
    check.add_argument("--split", default="train", help="Split of a dataset directory or Hub name.")
    convert = command("convert", "Convert pairwise, UltraFeedback or GDPO-release data to JSONL records.")
    convert.add_argument("--from", dest="kind", required=True, choices=sorted(CONVERTERS), help="Input kind.")
    convert.add_argument("input", help="Input file, dataset directory or Hub name.")
    convert.add_argument("output", help="Output JSONL file.")
    convert.add_argument("--merge_prompts", action="store_true", help="trl: one group per distinct prompt.")
    convert.add_argument("--skip_invalid", action="store_true", help="Count bad records instead of stopping.")
    convert.add_argument("--split", default="train", help="Split of a dataset directory or Hub name.")
    prompts = command(
        "make-if-prompts",
        "Instruction-following prompts: a base request plus 1-3 IFEval instructions with random "
        "arguments; writes OUT (train) and OUT's .eval.jsonl sibling (held-out base requests).",
    )
    prompts.add_argument("output", help="OUT.jsonl")
    prompts.add_argument("--n", type=int, required=True, help="Training prompts.")
    prompts.add_argument("--eval_n", type=int, default=200, help="Held-out evaluation prompts.")
    prompts.add_argument("--seed", type=int, default=0, help="Random seed.")
    opinions = command(
        "make-opinions",
        "The embedded GDPO opinion data: belief records, DPO pairs and SFT records, split by question.",
    )
    opinions.add_argument("output", help="OUT_DIR")
    opinions.add_argument("--seed", type=int, default=0, help="Random seed.")
    return parser


def _data(argv: list[str]) -> int:
    args = data_parser().parse_args(argv)
    if args.command == "make-opinions":
        from grouppo.embedded.opinions import write_opinions

        for path in write_opinions(args.output, args.seed):
            print(f"wrote {path}")
        return 0
    if args.command == "make-if-prompts":
        from grouppo.embedded.instructions import write_if_prompts

        for path in write_if_prompts(args.output, args.n, args.seed, args.eval_n):
            print(f"wrote {path}")
        return 0
    try:
        if args.command == "validate":
            stats = validate_file(
                args.path, positive_rule=args.positive_rule, skip_invalid=args.skip_invalid, split=args.split,
                merge_prompts=args.merge_prompts,
            )  # fmt: skip
            print(stats.summary())
            if not stats.kept:
                print(f"error: {args.path}: nothing usable: no valid group or belief record", file=sys.stderr)
                return 1
        else:
            n = convert_file(
                args.kind, args.input, args.output,
                merge_prompts=args.merge_prompts, skip_invalid=args.skip_invalid, split=args.split,
            )  # fmt: skip
            print(f"wrote {n} groups to {args.output}")
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------- demo, bench
def demo_parser() -> argparse.ArgumentParser:
    import inspect

    from grouppo.apps.demo import run_demo

    parser = argparse.ArgumentParser(
        prog="grouppo demo",
        description="Train and evaluate the built-in demo (letter reversal, a tiny model from scratch).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--output_dir", "--out", dest="output_dir", default="runs/demo",
                        help="Run directory (metrics.json, model/).")  # fmt: skip
    defaults = inspect.signature(run_demo).parameters
    helps = {"train_groups": "Training groups (words).", "epochs": "Training epochs.",
             "batch_size": "Groups per step.", "seed": "Random seed."}  # fmt: skip
    for name, kind in (("train_groups", int), ("epochs", float), ("batch_size", int), ("seed", int)):
        parser.add_argument(f"--{name}", type=kind, default=defaults[name].default, help=helps[name])
    return parser


def _demo(argv: list[str]) -> int:
    args = vars(demo_parser().parse_args(argv))
    from grouppo.apps.demo import run_demo

    run_demo(args.pop("output_dir"), **args)
    return 0


def _bench(argv: list[str]) -> int:
    from grouppo.apps.bench import main as bench_main

    return bench_main(argv)


# ------------------------------------------------------------------------------ sampling and evaluation
def _sampling_arguments(parser: argparse.ArgumentParser, temperature: float, max_new_tokens: int) -> None:
    parser.add_argument("--model_name_or_path", "--model", dest="model_name_or_path", default=None,
                        help="Hub name or local path (default: the embedded model).")  # fmt: skip
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens, help="Tokens per response.")
    parser.add_argument("--temperature", type=float, default=temperature, help="0: greedy.")
    parser.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling probability mass.")
    parser.add_argument("--batch_size", type=int, default=64, help="Sequences generated at a time.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16: the model loaded.")
    parser.add_argument("--generation_dtype", default="auto",
                        choices=["auto", "bfloat16", "float32", "model"],
                        help="auto: bfloat16 where the hardware computes it natively (a copy of the "
                        "model), else the model's dtype.")  # fmt: skip
    parser.add_argument("--disable_tqdm", action="store_true", help="No progress bar.")


def _load_for_sampling(args: argparse.Namespace, progress: bool = True) -> tuple[Any, Any, Any]:
    import torch

    from grouppo.generation import SamplingConfig
    from grouppo.models import load_model, load_tokenizer, resolve_model

    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=progress and not args.disable_tqdm,
        dtype=args.generation_dtype,
    )
    name = resolve_model(args.model_name_or_path)
    model = load_model(name, dtype=getattr(torch, args.dtype))
    return model, load_tokenizer(name), sampling


def _output_file(path: str | None, name: str | None = None) -> Path | None:
    """Where a command writes, checked before any model loads (its folder is created; CommandError if it
    cannot be written). With ``name``: a ``.jsonl`` path as it is, any other path a folder that receives
    ``name``."""
    if path is None:
        return None
    out = Path(path) if name is None or path.endswith(".jsonl") else Path(path) / name
    _check_output_dir(str(out.parent))
    return out


def sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grouppo sample",
        description="Sample K responses per prompt, score them with the reward(s) and write scored groups.",
        formatter_class=HelpFormatter,
    )
    _sampling_arguments(parser, temperature=1.0, max_new_tokens=256)
    parser.add_argument("--dataset_name", "--prompts", dest="dataset_name", required=True,
                        help="Prompt records (prompt + the fields the reward reads): a file, dataset "
                        "folder or Hub name.")  # fmt: skip
    parser.add_argument("--num_generations", type=int, default=4, help="K responses per prompt.")
    parser.add_argument("--output_dir", "--out", dest="output_dir", required=True,
                        help="Where the groups (prompt, responses, scores) go: a .jsonl file, or a folder "
                        "that receives groups.jsonl.")  # fmt: skip
    parser.add_argument(
        "--reward", nargs="+", default=["ifeval"], help="Reward specs (see grouppo.online.rewards)."
    )
    parser.add_argument("--reward_weights", nargs="+", type=float, default=None, help="One per reward.")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N prompts.")
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm"],
                        help="Generation backend.")  # fmt: skip
    return parser


def _sample(argv: list[str]) -> int:
    args = sample_parser().parse_args(argv)
    from grouppo.generation import make_generator
    from grouppo.online.rewards import load_rewards
    from grouppo.online.rollout import rollout_dataset

    records = prepare_prompt_records(_read(args.dataset_name), args.dataset_name, limit=args.limit)
    out = _output_file(args.output_dir, "groups.jsonl")
    # The rollout's bar counts prompts; the generator's own (per call) would draw over it.
    model, tokenizer, sampling = _load_for_sampling(args, progress=False)
    generator = make_generator(
        args.backend, model, tokenizer, sampling, model_name_or_path=args.model_name_or_path
    )
    reward = load_rewards(args.reward, args.reward_weights)
    groups, stats = rollout_dataset(
        generator, reward, records, args.num_generations, tokenizer,
        prompts_per_call=max(1, sampling.batch_size // args.num_generations), progress=not args.disable_tqdm,
    )  # fmt: skip
    n = write_jsonl(groups, out)
    print(f"wrote {n} groups to {out}: {stats.summary()}")
    return 0


def _belief_arguments(parser: argparse.ArgumentParser) -> None:
    _sampling_arguments(parser, temperature=1.0, max_new_tokens=48)
    parser.add_argument("--dataset_name", "--dataset", dest="dataset_name", required=True,
                        help="Belief records; one question per distinct prompt.")  # fmt: skip
    parser.add_argument("--split", default="test", help="Split of a dataset folder or Hub name.")
    parser.add_argument("--mode", default="belief", choices=["belief", "free"],
                        help="belief: draw the belief from the model's belief distribution, then answer; "
                        "free: generate the whole response and parse its belief.")  # fmt: skip
    parser.add_argument("--samples", type=int, default=8, help="Beliefs sampled per question.")
    parser.add_argument("--answers", type=int, default=2, help="Answers per question (for consistency).")
    parser.add_argument("--belief_template", default=None, help="Default: grouppo.tokenize's.")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N questions.")


def _belief_run(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from grouppo.data import prepare_belief_records
    from grouppo.gdpo.beliefs import evaluate_beliefs, unique_questions
    from grouppo.online.rewards import import_callable
    from grouppo.tokenize import DEFAULT_BELIEF_TEMPLATE

    records = _read(args.dataset_name, split=args.split)
    records = unique_questions(prepare_belief_records(records, source=args.dataset_name))[: args.limit]
    judge = import_callable(args.judge, "judge") if getattr(args, "judge", None) else None
    model, tokenizer, sampling = _load_for_sampling(args)
    return evaluate_beliefs(
        model, tokenizer, records, mode=args.mode, samples=args.samples, answers=args.answers,
        template=args.belief_template or DEFAULT_BELIEF_TEMPLATE, judge=judge, sampling=sampling,
        seed=args.seed,
    )  # fmt: skip


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grouppo generate",
        description="GDPO inference: sample a belief per question, then the answer conditioned on it.",
        formatter_class=HelpFormatter,
    )
    _belief_arguments(parser)
    parser.add_argument("--output_dir", "--out", dest="output_dir", required=True,
                        help="Where the responses (prompt, population, beliefs, belief, response) go: a "
                        ".jsonl file, or a folder that receives generations.jsonl.")  # fmt: skip
    return parser


def _generate(argv: list[str]) -> int:
    args = generate_parser().parse_args(argv)
    args.answers = max(args.answers, args.samples) if args.mode == "belief" else args.samples
    out = _output_file(args.output_dir, "generations.jsonl")
    _, details = _belief_run(args)
    rows = [
        {"prompt": d["prompt"], "population": d["population"], "beliefs": d["beliefs"],
         "belief": g["belief"], "belief_label": None if g["belief"] is None else d["beliefs"][g["belief"]],
         "response": g["response"]}
        for d in details for g in d["generations"]
    ]  # fmt: skip
    print(f"wrote {write_jsonl(rows, out)} responses to {out}")
    return 0


def eval_gdpo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grouppo eval gdpo",
        description="JS distance, majority bias and belief consistency of a model.",
        formatter_class=HelpFormatter,
    )
    _belief_arguments(parser)
    parser.add_argument(
        "--judge",
        default=None,
        help="module:function (answer, beliefs, belief) -> bool; default: the label named.",
    )
    parser.add_argument("--json", default=None, help="Write the metrics here.")
    parser.add_argument("--plot", default=None, help="PNG: target vs model distributions, first 6 questions.")
    parser.add_argument("--save_generations", default=None, help="JSONL of the per-question samples.")
    return parser


def _eval_gdpo(argv: list[str]) -> int:
    from grouppo.gdpo.beliefs import plot_distributions, table

    args = eval_gdpo_parser().parse_args(argv)
    for path in (args.json, args.plot, args.save_generations):
        _output_file(path)
    metrics, details = _belief_run(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
    if args.save_generations:
        write_jsonl(details, args.save_generations)
    if args.plot:
        plot_distributions(details, args.plot)
    print(table({"model": metrics["model"], **metrics["reference"]}))
    return 0


def eval_parser() -> argparse.ArgumentParser:
    from grouppo.embedded.instructions import BENCHMARKS

    parser = argparse.ArgumentParser(
        prog="grouppo eval",
        description="Evaluate instruction following: greedy answers to IFEval-style or IFBench prompts, "
        "checked by the official checkers.\n`grouppo eval gdpo --help`: the GDPO metrics instead; "
        "`grouppo eval compare --help`: two models' saved generations, with a paired interval.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("benchmark", choices=[*BENCHMARKS, "gdpo"], help="Benchmark (gdpo: GDPO metrics).")
    _sampling_arguments(parser, temperature=0.0, max_new_tokens=384)
    parser.add_argument("--dataset_name", "--prompts", dest="dataset_name", default=None,
                        help="Prompt records (prompt, instruction_id_list, kwargs): a file, dataset folder "
                        "or Hub name (default: the benchmark's own prompts).")  # fmt: skip
    parser.add_argument("--limit", type=int, default=None, help="Only the first N prompts.")
    parser.add_argument("--json", default=None, help="Write the metrics here.")
    parser.add_argument("--save_generations", default=None, help="Write key, prompt, response per prompt.")
    return parser


def eval_compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grouppo eval compare",
        description="Compare two models' saved generations on the same prompts (grouppo eval ... "
        "--save_generations): each IFEval metric of A and B, B - A and its paired 95%% bootstrap interval "
        "over prompts.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("a", help="Generations of model A (JSONL).")
    parser.add_argument("b", help="Generations of model B, on the same prompts (JSONL).")
    parser.add_argument("--json", default=None, help="Write the comparison here.")
    return parser


def _eval_compare(argv: list[str]) -> int:
    from grouppo.evaluation import compare_generations, compare_table

    args = eval_compare_parser().parse_args(argv)
    _output_file(args.json)
    try:
        comparison = compare_generations(load_records(args.a), load_records(args.b))
    except (FileNotFoundError, ValueError) as error:
        raise DataError(str(error)) from None
    if args.json:
        Path(args.json).write_text(json.dumps(comparison, indent=2) + "\n", encoding="utf-8")
    print(compare_table(comparison, args.a, args.b))
    return 0


def _eval(argv: list[str]) -> int:
    if argv[:1] == ["gdpo"]:
        return _eval_gdpo(argv[1:])
    if argv[:1] == ["compare"]:
        return _eval_compare(argv[1:])
    from grouppo.evaluation import benchmark_prompts, run_eval

    args = eval_parser().parse_args(argv)
    if args.benchmark == "gdpo":  # named after the options
        return _eval_gdpo([a for a in argv if a != "gdpo"])
    try:
        records = benchmark_prompts(args.benchmark, prompts=args.dataset_name, limit=args.limit)
    except FileNotFoundError as error:
        raise DataError(str(error)) from None
    for path in (args.json, args.save_generations):
        _output_file(path)
    model, tokenizer, sampling = _load_for_sampling(args)
    metrics = run_eval(
        model, tokenizer, args.benchmark, records=records, sampling=sampling,
        json_path=args.json, generations_path=args.save_generations,
    )  # fmt: skip
    print(json.dumps(metrics, indent=2))
    return 0


def _quickstart(argv: list[str]) -> int:
    from grouppo.apps.quickstart import main as quickstart_main

    return quickstart_main(argv)


COMMANDS = {
    "quickstart": _quickstart,
    "groupdpo": _train,
    "online": lambda argv: _train(argv, "online"),
    "gdpo": lambda argv: _train(argv, "gdpo"),
    "sample": _sample,
    "eval": _eval,
    "generate": _generate,
    "data": _data,
    "demo": _demo,
    "bench": _bench,
}


def build_parser() -> argparse.ArgumentParser:
    """The top level: ``grouppo COMMAND ...``, --version and --help (the commands parse their own options)."""
    head, table = __doc__.split("\n\n")[1:3]
    parser = argparse.ArgumentParser(
        prog="grouppo",
        usage="grouppo [-h] [--version] COMMAND [options]",
        description="Group-wise preference optimization (GroupDPO, GDPO) for Hugging Face causal language "
        "models.",
        epilog=f"{head}\n\n{table}\n\n" + "\n\n".join(__doc__.split("\n\n")[3:]).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"grouppo {version()}")
    parser.add_argument("command", metavar="COMMAND", choices=list(COMMANDS),
                        help=f"one of: {', '.join(COMMANDS)}")  # fmt: skip
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the command's options")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        try:
            return COMMANDS[argv[0]](argv[1:])
        except (DataError, CommandError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    parser.parse_args(argv)  # --help, --version or an unknown command: argparse answers and exits
    return 2


def run() -> NoReturn:
    """The ``grouppo`` program (and ``python -m grouppo``): ``main()``, then exit with its code.

    Under a multi-process launcher (``WORLD_SIZE`` > 1: ``accelerate launch``, ``torchrun``) the process
    ends as ``multiprocessing`` ends its children: the ``atexit`` handlers run (loggers, trackers), the
    output is flushed, then ``os._exit`` skips the interpreter's teardown. That teardown is not safe
    there: torch's gloo backend destroys a finished collective on its own worker thread, and a barrier
    keeps the collectives that were in flight when it started alive until then; if that happens after
    the main thread has begun finalizing, the worker needs the GIL to release a tensor, the interpreter
    ends the thread, and the C++ runtime aborts the process ("terminate called without an active
    exception", SIGABRT) after its work is done and saved, which the launcher reports as a failed run.
    """
    code = main()
    world_size = os.environ.get("WORLD_SIZE", "")
    if world_size.isdigit() and int(world_size) > 1:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
