"""``grouppo sample`` (self-sampled, scored groups) and ``grouppo generate`` (GDPO inference: a belief,
then the answer), and the model and sampling options they share with ``grouppo eval``.

The sampling options are ``grouppo.generation.SamplingConfig``'s fields (its ``dtype`` spelled
``--generation_dtype``, beside the model's ``--dtype``); the belief options are
``grouppo.gdpo.beliefs.BeliefSampling``'s.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from grouppo.apps.cli.config import HelpFormatter, output_file, read_data
from grouppo.load import write_jsonl

SAMPLING_FLAGS = {"dtype": "generation_dtype"}  # SamplingConfig field -> flag, where the names differ


def sampling_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """The model options and one option per field of ``SamplingConfig`` (``defaults``: the command's own);
    ``progress`` is on unless ``--disable_tqdm``."""
    from grouppo.generation import SamplingConfig

    parser.add_argument(
        "--model_name_or_path", default=None, help="Hub name or local path (default: the embedded model)."
    )
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16: the model loaded.")
    for f in dataclasses.fields(SamplingConfig):
        if f.name == "progress":
            continue
        kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
        flag = SAMPLING_FLAGS.get(f.name, f.name)
        parser.add_argument(
            f"--{flag}",
            dest=f"sampling_{f.name}",
            metavar=flag.upper(),
            type=kind,
            default=defaults.get(f.name, f.default),
            help=f.metadata["help"],
            choices=f.metadata.get("choices"),
        )
    parser.add_argument("--disable_tqdm", action="store_true", help="No progress bar.")


def sampling_config(args: argparse.Namespace, progress: bool = True) -> Any:
    """The ``SamplingConfig`` the options describe."""
    from grouppo.generation import SamplingConfig

    values = {k[len("sampling_") :]: v for k, v in vars(args).items() if k.startswith("sampling_")}
    return SamplingConfig(**values, progress=progress and not args.disable_tqdm)


def load_for_sampling(args: argparse.Namespace, progress: bool = True) -> tuple[Any, Any, Any]:
    """(model, tokenizer, SamplingConfig) of the options."""
    import torch

    from grouppo.models import load_model, load_tokenizer

    sampling = sampling_config(args, progress)
    model = load_model(args.model_name_or_path, dtype=getattr(torch, args.dtype))
    return model, load_tokenizer(args.model_name_or_path), sampling


def sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="grouppo sample",
        description="Sample K responses per prompt, score them with the reward(s) and write scored groups.",
        formatter_class=HelpFormatter,
    )
    sampling_arguments(parser, temperature=1.0, max_new_tokens=256, batch_size=64)
    parser.add_argument(
        "--dataset_name",
        required=True,
        help="Prompt records (prompt + the fields the reward reads): a file, dataset folder or Hub name.",
    )
    parser.add_argument("--num_generations", type=int, default=4, help="K responses per prompt.")
    parser.add_argument(
        "--output_dir",
        required=True,
        help="Where the groups (prompt, responses, scores) go: a .jsonl file, or a folder "
        "that receives groups.jsonl.",
    )
    parser.add_argument(
        "--reward_funcs",
        nargs="+",
        default=["ifeval"],
        help="Rewards: built-in names (ifeval, ifeval_strict), module:function paths or reward models.",
    )
    parser.add_argument("--reward_weights", nargs="+", type=float, default=None, help="One per reward.")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N prompts.")
    parser.add_argument(
        "--generation_backend",
        default="transformers",
        choices=["transformers", "vllm"],
        help="transformers (model.generate) or vllm (optional extra, CUDA only).",
    )
    return parser


def sample(argv: list[str]) -> int:
    from grouppo.data import prepare_prompt_records
    from grouppo.generation import make_generator
    from grouppo.online.rewards import load_rewards
    from grouppo.online.rollout import rollout_dataset

    args = sample_parser().parse_args(argv)
    records = prepare_prompt_records(read_data(args.dataset_name), args.dataset_name, limit=args.limit)
    out = output_file(args.output_dir, "groups.jsonl")
    reward = load_rewards(args.reward_funcs, args.reward_weights)
    # The rollout's bar counts prompts; the generator's own (per call) would draw over it.
    model, tokenizer, sampling = load_for_sampling(args, progress=False)
    generator = make_generator(
        args.generation_backend, model, tokenizer, sampling, model_name_or_path=args.model_name_or_path
    )
    groups, stats = rollout_dataset(
        generator,
        reward,
        records,
        args.num_generations,
        tokenizer,
        prompts_per_call=max(1, sampling.batch_size // args.num_generations),
        progress=not args.disable_tqdm,
    )
    n = write_jsonl(groups, out)
    print(f"wrote {n} groups to {out}: {stats.summary()}")
    return 0


def belief_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, sampling and ``BeliefSampling`` options of ``generate`` and ``eval gdpo``."""
    from grouppo.gdpo.beliefs import BeliefSampling

    sampling_arguments(parser, temperature=1.0, max_new_tokens=48, batch_size=32)
    parser.add_argument(
        "--dataset_name", required=True, help="Belief records; one question per distinct prompt."
    )
    parser.add_argument("--split", default="test", help="Split of a dataset folder or Hub name.")
    for f in dataclasses.fields(BeliefSampling):
        kind = {"int": int}.get(str(f.type), str)
        parser.add_argument(
            f"--{f.name}",
            type=kind,
            default=f.default,
            help=f.metadata["help"],
            choices=f.metadata.get("choices"),
        )
    parser.add_argument("--limit", type=int, default=None, help="Only the first N questions.")


def belief_run(args: argparse.Namespace, judge: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read and check the belief records, load the model, sample beliefs and answers, score them."""
    from grouppo.data import prepare_belief_records
    from grouppo.gdpo.beliefs import BeliefSampling, evaluate_beliefs, unique_questions

    records = read_data(args.dataset_name, split=args.split)
    records = unique_questions(prepare_belief_records(records, source=args.dataset_name))[: args.limit]
    settings = BeliefSampling(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BeliefSampling)})
    model, tokenizer, sampling = load_for_sampling(args)
    return evaluate_beliefs(model, tokenizer, records, settings, judge=judge, sampling=sampling)


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="grouppo generate",
        description="GDPO inference: sample a belief per question, then the answer conditioned on it.",
        formatter_class=HelpFormatter,
    )
    belief_arguments(parser)
    parser.add_argument(
        "--output_dir",
        required=True,
        help="Where the responses (prompt, population, beliefs, belief, response) go: a "
        ".jsonl file, or a folder that receives generations.jsonl.",
    )
    return parser


def generate(argv: list[str]) -> int:
    args = generate_parser().parse_args(argv)
    args.answers = max(args.answers, args.samples) if args.mode == "belief" else args.samples
    out = output_file(args.output_dir, "generations.jsonl")
    _, details = belief_run(args)
    rows = [
        {
            "prompt": d["prompt"],
            "population": d["population"],
            "beliefs": d["beliefs"],
            "belief": g["belief"],
            "belief_label": None if g["belief"] is None else d["beliefs"][g["belief"]],
            "response": g["response"],
        }
        for d in details
        for g in d["generations"]
    ]
    print(f"wrote {write_jsonl(rows, out)} responses to {out}")
    return 0
