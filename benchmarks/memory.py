"""Peak memory of one GroupDPO training step: coupled vs decoupled backward, as the group size K grows.

A front end to ``grouppo bench memory`` (``grouppo.apps.bench``: ``run_backward_memory``
says what is measured, ``measure_step_memory`` how, ``GROWTH_TARGET`` what the growth is held to and
why), kept for its command line, its defaults and its file names:

    .venv/bin/python benchmarks/memory.py --group_sizes 2 8 32 --chunk_sizes 2

runs

    grouppo bench memory --strategies coupled decoupled:2 --group_sizes 2 8 32 \\
        --prompt_len 128 --response_len 256 --hidden 512 --intermediate 1408 --heads 8 --kv_heads 8 \\
        --layers 8 --vocab 32000 --seed 0 --output_dir benchmarks/results/memory_cpu

One group of K responses per step, ``--chunk_sizes`` the decoupled ``response_chunk_size`` values.
Output: ``<out>/memory_cpu.json`` (the command and one row per run) and ``<out>/memory_cpu.md`` (the
table, the growth of the step increment from the smallest to the largest K for each strategy against
the target, and the command).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--group_sizes", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--chunk_sizes", type=int, nargs="+", default=[2], help="decoupled response_chunk_size(s)")
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--response_len", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--heads", type=int, default=8, help="attention heads, key/value heads as many")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", type=Path, default=Path("benchmarks/results"), help="a directory")
    return p.parse_args(argv)


def bench_argv(args: argparse.Namespace) -> list[str]:
    """The ``grouppo bench`` arguments that run what ``args`` asks for."""
    flags = {
        "prompt_len": args.prompt_len,
        "response_len": args.response_len,
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "heads": args.heads,
        "kv_heads": args.heads,
        "layers": args.layers,
        "vocab": args.vocab,
        "seed": args.seed,
    }
    return [
        "memory",
        "--strategies",
        "coupled",
        *[f"decoupled:{c}" for c in args.chunk_sizes],
        "--group_sizes",
        *map(str, args.group_sizes),
        *[part for name, value in flags.items() for part in (f"--{name}", str(value))],
        "--output_dir",
        str(args.output_dir / "memory_cpu"),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import grouppo  # noqa: F401
    except ImportError:  # run from a checkout without installing: the children need the path too
        sys.path.insert(0, str(SRC))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    from grouppo.apps.bench import main as bench

    return bench(bench_argv(args))


if __name__ == "__main__":
    sys.exit(main())
