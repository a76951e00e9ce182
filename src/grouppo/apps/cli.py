"""The ``grouppo`` command line.

grouppo quickstart [--out runs/quickstart]                          # the main job: eval, train, eval
grouppo groupdpo --config cfg.yaml [--any_config_field value ...]   # offline training, like `trl dpo`
grouppo online --dataset_name P.jsonl --reward_funcs ifeval [...]   # online: sample, score, train
grouppo sample --model M --prompts P --num_generations K --out OUT  # self-sampled, scored groups
grouppo eval {ifeval,ifbench} --model M [--limit N] [--json OUT]    # instruction following
grouppo data validate PATH [--positive_rule R] [--skip_invalid]     # check group data
grouppo gdpo [--dataset_name D] [--any_config_field value ...]   # GDPO (default: embedded opinions)
grouppo generate --dataset D --mode {belief,free} --out OUT.jsonl  # sample a belief, then answer
grouppo eval gdpo --model M --dataset D --samples N --json OUT     # JS distance, majority bias
grouppo data convert --from {gdpo,trl,ultrafeedback} IN OUT         # write JSONL groups / beliefs
grouppo data make-if-prompts --n N --seed S OUT.jsonl               # instruction-following prompts
grouppo data make-opinions --seed S OUT_DIR                         # GDPO opinion data
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

from grouppo.convert import CONVERTERS, convert_file
from grouppo.data import POSITIVE_RULES, DataError, load_records, validate_file, write_jsonl


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


def _trainer_classes(kind: str) -> tuple[type, type]:
    if kind == "online":
        from grouppo.online.trainer import OnlineGroupDPOConfig, OnlineGroupDPOTrainer

        return OnlineGroupDPOConfig, OnlineGroupDPOTrainer
    if kind == "gdpo":
        from grouppo.gdpo.trainer import GDPOConfig, GDPOTrainer

        return GDPOConfig, GDPOTrainer
    from grouppo.trainer import GroupDPOConfig, GroupDPOTrainer

    return GroupDPOConfig, GroupDPOTrainer


def _train(argv: list[str], kind: str = "groupdpo") -> int:
    from transformers import HfArgumentParser

    from grouppo.embedded.models import load_tokenizer, resolve_model

    Config, Trainer = _trainer_classes(kind)
    parser = HfArgumentParser((ScriptArguments, Config), prog=f"grouppo {kind}")
    parser.add_argument("--config", help="YAML file of any of the options below; flags override it.")
    known, _ = parser.parse_known_args(argv)
    values: dict[str, Any] = {}
    if known.config:
        with open(known.config) as f:
            values = yaml.safe_load(f) or {}
        names = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - names)
        if unknown:
            parser.error(f"{known.config}: unknown option(s) {unknown}")
        parser.set_defaults(**values)
    known, _ = parser.parse_known_args(argv)
    embedded = kind == "gdpo" and not known.dataset_name
    if embedded:
        parser.set_defaults(**{key: value for key, value in GDPO_EMBEDDED_DEFAULTS.items()
                               if key not in values})  # fmt: skip
    script, config, _ = parser.parse_args_into_dataclasses(argv)
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
    # Every rank waits for the others, then the process group is torn down before the interpreter exits:
    # a gloo/NCCL group left to the interpreter's shutdown can abort a rank ("terminate called without an
    # active exception") after its work is done.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
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
    opinions = sub.add_parser(
        "make-opinions",
        help="The embedded GDPO opinion data: belief records, DPO pairs and SFT records, split by question.",
    )
    opinions.add_argument("output", help="OUT_DIR")
    opinions.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
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
        parser.add_argument(f"--{name}", type=kind, help="default: grouppo.apps.demo.run_demo's")
    args = vars(parser.parse_args(argv))
    from grouppo.apps.demo import run_demo

    run_demo(args.pop("out"), **{key: value for key, value in args.items() if value is not None})
    return 0


def _bench(argv: list[str]) -> int:
    from grouppo.apps.bench import main as bench_main

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

    from grouppo.embedded.models import load_model, load_tokenizer, resolve_model
    from grouppo.online.generation import SamplingConfig

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
    parser.add_argument(
        "--reward", nargs="+", default=["ifeval"], help="Reward specs (see grouppo.online.rewards)."
    )
    parser.add_argument("--reward_weights", nargs="+", type=float, default=None)
    parser.add_argument("--limit", type=int, default=None, help="Only the first N prompts.")
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    args = parser.parse_args(argv)
    from grouppo.online.generation import make_generator
    from grouppo.online.rewards import load_rewards
    from grouppo.online.rollout import rollout_dataset

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


def _belief_arguments(parser: argparse.ArgumentParser) -> None:
    _sampling_arguments(parser, temperature=1.0, max_new_tokens=48)
    parser.add_argument("--dataset", required=True, help="Belief records; one question per distinct prompt.")
    parser.add_argument("--split", default="test", help="Split of a dataset folder or Hub name.")
    parser.add_argument("--mode", default="belief", choices=["belief", "free"],
                        help="belief: draw the belief from the model's belief distribution, then answer; "
                        "free: generate the whole response and parse its belief.")  # fmt: skip
    parser.add_argument("--samples", type=int, default=8, help="Beliefs sampled per question.")
    parser.add_argument("--answers", type=int, default=2, help="Answers per question (for consistency).")
    parser.add_argument("--belief_template", default=None, help="default: grouppo.tokenize's")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N questions.")


def _belief_run(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from grouppo.data import prepare_belief_records
    from grouppo.gdpo.evaluate import evaluate_beliefs, unique_questions
    from grouppo.online.rewards import import_callable
    from grouppo.tokenize import DEFAULT_BELIEF_TEMPLATE

    model, tokenizer, sampling = _load_for_sampling(args)
    records = prepare_belief_records(load_records(args.dataset, split=args.split), source=args.dataset)
    records = unique_questions(records)[: args.limit]
    judge = import_callable(args.judge, "judge") if getattr(args, "judge", None) else None
    return evaluate_beliefs(
        model, tokenizer, records, mode=args.mode, samples=args.samples, answers=args.answers,
        template=args.belief_template or DEFAULT_BELIEF_TEMPLATE, judge=judge, sampling=sampling,
        seed=args.seed,
    )  # fmt: skip


def _generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="grouppo generate",
        description="GDPO inference: sample a belief per question, then the answer conditioned on it.",
    )
    _belief_arguments(parser)
    parser.add_argument("--out", required=True, help="JSONL: prompt, population, beliefs, belief, response.")
    args = parser.parse_args(argv)
    args.answers = max(args.answers, args.samples) if args.mode == "belief" else args.samples
    _, details = _belief_run(args)
    rows = [
        {"prompt": d["prompt"], "population": d["population"], "beliefs": d["beliefs"],
         "belief": g["belief"], "belief_label": None if g["belief"] is None else d["beliefs"][g["belief"]],
         "response": g["response"]}
        for d in details for g in d["generations"]
    ]  # fmt: skip
    print(f"wrote {write_jsonl(rows, args.out)} responses to {args.out}")
    return 0


def _eval_gdpo(argv: list[str]) -> int:
    from grouppo.gdpo.evaluate import plot_distributions, table

    parser = argparse.ArgumentParser(
        prog="grouppo eval gdpo", description="JS distance, majority bias and belief consistency of a model."
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
    args = parser.parse_args(argv)
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


def _eval(argv: list[str]) -> int:
    if argv[:1] == ["gdpo"]:
        return _eval_gdpo(argv[1:])
    from grouppo.apps.evaluate import run_eval
    from grouppo.embedded.instructions import BENCHMARKS

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
    from grouppo.apps.quickstart import main as quickstart_main

    return quickstart_main(argv)


COMMANDS = {
    "quickstart": _quickstart,
    "groupdpo": _train,
    "online": lambda argv: _train(argv, "online"),
    "gdpo": lambda argv: _train(argv, "gdpo"),
    "generate": _generate,
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
