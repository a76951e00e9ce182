"""The ``grouppo`` command line.

grouppo groupdpo --config cfg.yaml [--any_config_field value ...]   # train, like `trl dpo`
grouppo data validate PATH [--positive_rule R] [--skip_invalid]     # check group data
grouppo data convert --from {trl,ultrafeedback} IN OUT              # write JSONL groups
grouppo demo [--out runs/demo]                                      # the built-in end-to-end run
grouppo bench [--strategies ...] [--group-sizes ...]                # speed and memory, side by side
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import yaml

from grouppo.data import CONVERTERS, POSITIVE_RULES, DataError, convert_file, load_records, validate_file


@dataclass
class ScriptArguments:
    """Model, data and PEFT options of ``grouppo groupdpo`` (the training options are GroupDPOConfig's)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub name or local path of the model."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "JSONL/JSON/Parquet file, local dataset directory or Hub dataset name."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Evaluation data (file, dir or name)."}
    )
    dataset_test_split: str = field(
        default="test", metadata={"help": "Split of eval_dataset_name to evaluate on."}
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


def _train(argv: list[str]) -> int:
    from transformers import HfArgumentParser

    from grouppo.trainer import GroupDPOConfig, GroupDPOTrainer

    parser = HfArgumentParser((ScriptArguments, GroupDPOConfig), prog="grouppo groupdpo")
    parser.add_argument("--config", help="YAML file of any of the options below; flags override it.")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        with open(known.config) as f:
            values = yaml.safe_load(f) or {}
        names = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - names)
        if unknown:
            parser.error(f"{known.config}: unknown option(s) {unknown}")
        parser.set_defaults(**values)
    script, config, _ = parser.parse_args_into_dataclasses(argv)
    if not script.model_name_or_path or not script.dataset_name:
        parser.error("--model_name_or_path and --dataset_name are required (as flags or in --config)")
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
    train = load_records(
        script.dataset_name, split=script.dataset_train_split, config_name=script.dataset_config
    )
    evaluation = None
    if script.eval_dataset_name:
        evaluation = load_records(script.eval_dataset_name, split=script.dataset_test_split)
    trainer = GroupDPOTrainer(
        script.model_name_or_path,
        ref_model=script.ref_model_name_or_path,
        args=config,
        train_dataset=train,
        eval_dataset=evaluation,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(config.output_dir)
    if evaluation is not None:
        print(trainer.evaluate())
    print(f"saved to {config.output_dir}")
    return 0


def _data(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="grouppo data", description="Validate or convert group data.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("validate", help="Check a data set of groups and summarize it.")
    check.add_argument("path", help="JSONL/JSON/Parquet file, dataset directory or Hub name")
    check.add_argument("--positive_rule", default="top_bottom", choices=POSITIVE_RULES)
    check.add_argument("--skip_invalid", action="store_true", help="Count bad groups instead of stopping.")
    check.add_argument("--split", default="train")
    convert = sub.add_parser("convert", help="Convert pairwise or UltraFeedback data to JSONL groups.")
    convert.add_argument("--from", dest="kind", required=True, choices=sorted(CONVERTERS))
    convert.add_argument("input")
    convert.add_argument("output")
    convert.add_argument("--merge_prompts", action="store_true", help="trl: one group per distinct prompt.")
    convert.add_argument("--skip_invalid", action="store_true")
    convert.add_argument("--split", default="train")
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            stats = validate_file(
                args.path, positive_rule=args.positive_rule, skip_invalid=args.skip_invalid, split=args.split
            )
            print(stats.summary())
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


def _demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="grouppo demo", description="Train and evaluate the built-in demo.")
    parser.add_argument("--out", default="runs/demo")
    for name, kind in (("train_groups", int), ("epochs", float), ("batch_size", int), ("seed", int)):
        parser.add_argument(f"--{name}", type=kind, help="default: grouppo.demo.run_demo's")
    args = vars(parser.parse_args(argv))
    from grouppo.demo import run_demo

    run_demo(args.pop("out"), **{key: value for key, value in args.items() if value is not None})
    return 0


def _bench(argv: list[str]) -> int:
    from grouppo.bench import main as bench_main

    return bench_main(argv)


COMMANDS = {"groupdpo": _train, "data": _data, "demo": _demo, "bench": _bench}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
