"""``grouppo bench``: speed and memory, measured side by side in one run.

* ``steps``: one training step per strategy (coupled, decoupled:C, TRL's pairs) at each K;
* ``memory``: the memory one backward adds as K grows, coupled against decoupled;
* ``generation``: grouppo's generator against plain ``model.generate``;
* ``precision``: a training step in float32 against bfloat16 autocast, and what bfloat16 costs.

Each has its own options (``grouppo bench steps --help``) and writes its rows, its table (with the
command and the machine) and, for ``steps``, a plot.
"""

from __future__ import annotations

import argparse
import importlib

from grouppo.apps.cli.config import HelpFormatter

MODES = {
    "steps": "One training step per strategy, side by side: time, peak memory, tokens/s.",
    "memory": "The memory one forward + loss + backward adds as K grows, coupled against decoupled:C.",
    "generation": "Generation throughput: grouppo's generator against plain model.generate.",
    "precision": "A training step in float32 against bfloat16 autocast, and its log-prob error.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="grouppo bench",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="mode", required=True, metavar="{" + ",".join(MODES) + "}")
    for mode, help in MODES.items():
        module = importlib.import_module(f"grouppo.apps.bench.{mode}")
        module.add_arguments(
            sub.add_parser(
                mode, allow_abbrev=False, help=help, description=help, formatter_class=HelpFormatter
            )
        )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"grouppo.apps.bench.{args.mode}")
    return module.run_command(args, "grouppo bench " + " ".join(argv))
