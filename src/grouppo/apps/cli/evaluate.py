"""``grouppo eval``: ``ifeval`` and ``ifbench`` (instruction following, official checkers), ``gdpo`` (JS
distance, majority bias and belief consistency) and ``compare`` (two models' saved generations, with a
paired interval), each a sub-command with its own options."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from grouppo.apps.cli.config import HelpFormatter, output_file
from grouppo.apps.cli.sampling import belief_arguments, belief_run, load_for_sampling, sampling_arguments

BENCHMARKS = ("ifeval", "ifbench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="grouppo eval",
        description="Evaluate a model: instruction following (ifeval, ifbench), GDPO's belief metrics "
        "(gdpo), or compare two models' saved generations (compare).",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="{ifeval,ifbench,gdpo,compare}")
    for name in BENCHMARKS:
        bench = sub.add_parser(
            name,
            allow_abbrev=False,
            formatter_class=HelpFormatter,
            help=f"Greedy answers to {name} prompts, checked.",
            description=f"Evaluate instruction following on {name}: greedy answers to its prompts, checked "
            "by "
            "the official checkers.",
        )
        # float32: the same answers whatever the batch and the CPU (bfloat16's move with both).
        sampling_arguments(bench, temperature=0.0, max_new_tokens=384, batch_size=64, dtype="float32")
        bench.add_argument(
            "--dataset_name",
            default=None,
            help="Prompt records (prompt, instruction_id_list, kwargs): a file, dataset folder "
            "or Hub name (default: the benchmark's own prompts).",
        )
        bench.add_argument("--limit", type=int, default=None, help="Only the first N prompts.")
        bench.add_argument("--json", default=None, help="Write the metrics here.")
        bench.add_argument(
            "--save_generations",
            default=None,
            help="Write one record per prompt: key, prompt, instructions, response, results.",
        )
    gdpo = sub.add_parser(
        "gdpo",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
        help="JS distance, majority bias and belief consistency of a model.",
        description="JS distance, majority bias and belief consistency of a model on belief records.",
    )
    belief_arguments(gdpo)
    gdpo.add_argument(
        "--judge",
        default=None,
        help="module:function (answer, beliefs, belief) -> bool; default: the label named.",
    )
    gdpo.add_argument("--json", default=None, help="Write the metrics here.")
    gdpo.add_argument("--plot", default=None, help="PNG: target vs model distributions, first 6 questions.")
    gdpo.add_argument("--save_generations", default=None, help="JSONL of the per-question samples.")
    compare = sub.add_parser(
        "compare",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
        help="Two models' saved generations, with a paired interval.",
        description="Compare two models' saved generations on the same prompts (grouppo eval ... "
        "--save_generations): each IFEval metric of A and B, B - A and its paired 95%% bootstrap interval "
        "over prompts.",
    )
    compare.add_argument("a", help="Generations of model A (JSONL).")
    compare.add_argument("b", help="Generations of model B, on the same prompts (JSONL).")
    compare.add_argument("--json", default=None, help="Write the comparison here.")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.benchmark == "compare":
        return _compare(args)
    if args.benchmark == "gdpo":
        return _gdpo(args)
    from grouppo.evaluation import benchmark_prompts, run_eval

    records = benchmark_prompts(args.benchmark, prompts=args.dataset_name, limit=args.limit)
    for path in (args.json, args.save_generations):
        output_file(path)
    model, tokenizer, sampling = load_for_sampling(args)
    metrics = run_eval(
        model,
        tokenizer,
        args.benchmark,
        records=records,
        sampling=sampling,
        json_path=args.json,
        generations_path=args.save_generations,
    )
    print(json.dumps(metrics, indent=2))
    return 0


def _gdpo(args: argparse.Namespace) -> int:
    from grouppo.gdpo.beliefs import plot_distributions, table
    from grouppo.load import write_jsonl
    from grouppo.online.rewards import import_callable

    for path in (args.json, args.plot, args.save_generations):
        output_file(path)
    judge = import_callable(args.judge, "judge") if args.judge else None
    metrics, details = belief_run(args, judge=judge)
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    if args.save_generations:
        write_jsonl(details, args.save_generations)
    if args.plot:
        plot_distributions(details, args.plot)
    print(table({"model": metrics["model"], **metrics["reference"]}))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from grouppo.data import DataError
    from grouppo.evaluation import compare_generations, compare_table
    from grouppo.load import load_records

    output_file(args.json)
    try:
        comparison = compare_generations(load_records(args.a), load_records(args.b))
    except (FileNotFoundError, ValueError) as error:
        raise DataError(str(error)) from None
    if args.json:
        Path(args.json).write_text(json.dumps(comparison, indent=2) + "\n", encoding="utf-8")
    print(compare_table(comparison, args.a, args.b))
    return 0
