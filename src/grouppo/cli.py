"""The ``grouppo`` command line.

grouppo quickstart [--out runs/quickstart]                          # the main job: eval, train, eval
grouppo groupdpo --config cfg.yaml [--any_config_field value ...]   # offline training, like `trl dpo`
grouppo online --dataset_name P.jsonl --reward_funcs ifeval [...]   # online: sample, score, train
grouppo sample --model M --prompts P --num_generations K --out OUT  # self-sampled, scored groups
grouppo eval {ifeval,ifbench} --model M [--limit N] [--json OUT]    # instruction following
grouppo data validate PATH [--positive_rule R] [--skip_invalid]     # check group data
grouppo data convert --from {trl,ultrafeedback} IN OUT              # write JSONL groups
grouppo data make-if-prompts --n N --seed S OUT.jsonl               # instruction-following prompts
grouppo demo [--out runs/demo]                                      # synthetic task, tiny model
grouppo bench [--strategies ...] [--group-sizes ...]                # speed and memory, side by side

Without --model / --model_name_or_path the embedded SmolLM2-135M-Instruct is used.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from grouppo.data import (
    CONVERTERS,
    POSITIVE_RULES,
    DataError,
    convert_file,
    load_records,
    validate_file,
    write_jsonl,
)


@dataclass
class ScriptArguments:
    """Model, data and PEFT options of ``grouppo groupdpo`` (the training options are GroupDPOConfig's)."""

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


def _train(argv: list[str], online: bool = False) -> int:
    from transformers import HfArgumentParser

    from grouppo.models import load_tokenizer, resolve_model

    if online:
        from grouppo.online import OnlineGroupDPOConfig as Config
        from grouppo.online import OnlineGroupDPOTrainer as Trainer
    else:
        from grouppo.trainer import GroupDPOConfig as Config
        from grouppo.trainer import GroupDPOTrainer as Trainer

    prog = "grouppo online" if online else "grouppo groupdpo"
    parser = HfArgumentParser((ScriptArguments, Config), prog=prog)
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
    if not script.dataset_name:
        parser.error("--dataset_name is required (as a flag or in --config)")
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
    train = load_records(
        script.dataset_name, split=script.dataset_train_split, config_name=script.dataset_config
    )
    evaluation = None
    if script.eval_dataset_name:
        evaluation = load_records(script.eval_dataset_name, split=script.dataset_test_split)
    trainer = Trainer(
        model,
        ref_model=script.ref_model_name_or_path,
        args=config,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=load_tokenizer(model),
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
    prompts = sub.add_parser(
        "make-if-prompts",
        help="Instruction-following prompts: a base request plus 1-3 IFEval instructions with random "
        "arguments; writes OUT (train) and OUT's .eval.jsonl sibling (held-out base requests).",
    )
    prompts.add_argument("output", help="OUT.jsonl")
    prompts.add_argument("--n", type=int, required=True, help="Training prompts.")
    prompts.add_argument("--eval_n", type=int, default=200, help="Held-out evaluation prompts.")
    prompts.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "make-if-prompts":
        from grouppo.instructions import write_if_prompts

        for path in write_if_prompts(args.output, args.n, args.seed, args.eval_n):
            print(f"wrote {path}")
        return 0
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


def _sampling_arguments(parser: argparse.ArgumentParser, temperature: float, max_new_tokens: int) -> None:
    parser.add_argument("--model", default=None, help="Hub name or local path (default: the embedded model).")
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=temperature, help="0: greedy.")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=16, help="Sequences generated at a time.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16.")


def _load_for_sampling(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    import torch

    from grouppo.generation import SamplingConfig
    from grouppo.models import load_model, load_tokenizer, resolve_model

    name = resolve_model(args.model)
    model = load_model(name, dtype=getattr(torch, args.dtype))
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    return model, load_tokenizer(name), sampling


def _sample(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="grouppo sample",
        description="Sample K responses per prompt, score them with the reward(s) and write scored groups.",
    )
    _sampling_arguments(parser, temperature=1.0, max_new_tokens=256)
    parser.add_argument("--prompts", required=True, help="JSONL of prompt records (prompt + reward fields).")
    parser.add_argument("--num_generations", type=int, default=4, help="K responses per prompt.")
    parser.add_argument("--out", required=True, help="Output JSONL of groups (prompt, responses, scores).")
    parser.add_argument("--reward", nargs="+", default=["ifeval"], help="Reward specs (see grouppo.rewards).")
    parser.add_argument("--reward_weights", nargs="+", type=float, default=None)
    parser.add_argument("--limit", type=int, default=None, help="Only the first N prompts.")
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    args = parser.parse_args(argv)
    from grouppo.generation import make_generator
    from grouppo.rewards import load_rewards
    from grouppo.rollout import rollout_dataset

    model, tokenizer, sampling = _load_for_sampling(args)
    records = load_records(args.prompts)[: args.limit]
    generator = make_generator(args.backend, model, tokenizer, sampling, model_name_or_path=args.model)
    reward = load_rewards(args.reward, args.reward_weights)
    groups, stats = rollout_dataset(
        generator, reward, records, args.num_generations, tokenizer,
        prompts_per_call=max(1, sampling.batch_size // args.num_generations),
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )  # fmt: skip
    n = write_jsonl(groups, args.out)
    print(f"wrote {n} groups to {args.out}: {stats.summary()}")
    return 0


def _eval(argv: list[str]) -> int:
    from grouppo.evaluate import BENCHMARKS, run_eval

    parser = argparse.ArgumentParser(prog="grouppo eval", description="Evaluate instruction following.")
    parser.add_argument("benchmark", choices=BENCHMARKS)
    _sampling_arguments(parser, temperature=0.0, max_new_tokens=384)
    parser.add_argument("--prompts", default=None, help="JSONL of prompt records (default: the benchmark's).")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N prompts.")
    parser.add_argument("--json", default=None, help="Write the metrics here.")
    parser.add_argument("--save_generations", default=None, help="Write key, prompt, response per prompt.")
    args = parser.parse_args(argv)
    model, tokenizer, sampling = _load_for_sampling(args)
    metrics = run_eval(
        model, tokenizer, args.benchmark, prompts=args.prompts, limit=args.limit, sampling=sampling,
        json_path=args.json, generations_path=args.save_generations,
    )  # fmt: skip
    print(json.dumps(metrics, indent=2))
    return 0


def _quickstart(argv: list[str]) -> int:
    from grouppo.quickstart import main as quickstart_main

    return quickstart_main(argv)


COMMANDS = {
    "quickstart": _quickstart,
    "groupdpo": _train,
    "online": lambda argv: _train(argv, online=True),
    "sample": _sample,
    "eval": _eval,
    "data": _data,
    "demo": _demo,
    "bench": _bench,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
