"""``grouppo data``: validate, convert or make data (``validate``, ``convert``, ``make-if-prompts``,
``make-opinions``)."""

from __future__ import annotations

import argparse
import sys

from grouppo.apps.cli.config import HelpFormatter
from grouppo.data import POSITIVE_RULES


def build_parser() -> argparse.ArgumentParser:
    from grouppo.convert import converter_names

    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="grouppo data", description="Validate, convert or make data.", formatter_class=HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, allow_abbrev=False, help=help, description=help, formatter_class=HelpFormatter
        )

    check = command(
        "validate",
        "Check a data set (group records, TRL pairs, UltraFeedback, belief records) and summarize it; exit "
        "code 1 when it holds nothing to train on.",
    )
    check.add_argument("path", help="JSONL/JSON/Parquet file, dataset directory or Hub name")
    check.add_argument(
        "--positive_rule", default="top_bottom", choices=POSITIVE_RULES, help="How scores become labels."
    )
    check.add_argument("--skip_invalid", action="store_true", help="Count bad records instead of stopping.")
    check.add_argument("--merge_prompts", action="store_true", help="Pairs: one group per distinct prompt.")
    check.add_argument("--split", default="train", help="Split of a dataset directory or Hub name.")
    convert = command("convert", "Convert pairwise, UltraFeedback or GDPO-release data to JSONL records.")
    convert.add_argument(
        "--from", dest="kind", required=True, choices=sorted(converter_names()), help="Input kind."
    )
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


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
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
    from grouppo.convert import convert_file, validate_file

    if args.command == "validate":
        stats = validate_file(
            args.path,
            positive_rule=args.positive_rule,
            skip_invalid=args.skip_invalid,
            split=args.split,
            merge_prompts=args.merge_prompts,
        )
        print(stats.summary())
        if not stats.kept:
            print(f"error: {args.path}: nothing usable: no valid group or belief record", file=sys.stderr)
            return 1
        return 0
    n = convert_file(
        args.kind,
        args.input,
        args.output,
        merge_prompts=args.merge_prompts,
        skip_invalid=args.skip_invalid,
        split=args.split,
    )
    print(f"wrote {n} groups to {args.output}")
    return 0
