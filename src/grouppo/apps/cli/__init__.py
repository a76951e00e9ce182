"""The ``grouppo`` command line: ``grouppo COMMAND [options]``.

Each command lives in its own module and parses its own options (``grouppo COMMAND --help`` lists them
with their defaults); this module only picks the command, so that ``grouppo --help`` imports nothing
heavy. Without ``--model_name_or_path`` the embedded SmolLM2-135M-Instruct is used. Every command checks
what it can before a model loads; a problem is reported as one line ``error: <what, where>`` on stderr
with exit code 1 (2 for a bad option, as argparse does), and ``--debug`` (or ``GROUPPO_DEBUG=1``) shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import shlex
import sys
from typing import NoReturn

from grouppo.environment import grouppo_version

# name: (module:function taking the command's argv, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": (
        "grouppo.apps.quickstart:main",
        "Evaluate the embedded model, train it with GroupDPO on self-sampled groups, evaluate it again.",
    ),
    "groupdpo": (
        "grouppo.apps.cli.train:groupdpo",
        "Offline GroupDPO on group, TRL pair or UltraFeedback data.",
    ),
    "online": (
        "grouppo.apps.cli.train:online",
        "Online GroupDPO: sample K responses from the policy, score, train.",
    ),
    "gdpo": ("grouppo.apps.cli.train:gdpo", "GDPO on belief records (default: the embedded opinion data)."),
    "sample": ("grouppo.apps.cli.sampling:sample", "Sample K responses per prompt and write scored groups."),
    "generate": ("grouppo.apps.cli.sampling:generate", "GDPO inference: sample a belief, then the answer."),
    "eval": ("grouppo.apps.cli.evaluate:main", "Evaluate: ifeval, ifbench, gdpo, or compare two models."),
    "data": ("grouppo.apps.cli.data:main", "Validate, convert or make data."),
    "demo": ("grouppo.apps.demo:main", "A from-scratch toy task (word reversal, a tiny model)."),
    "bench": ("grouppo.apps.bench:main", "Speed and memory of the decoupled backward and generation."),
}


def build_parser() -> argparse.ArgumentParser:
    """``grouppo [--debug] [--version] COMMAND ...``: the command's own options are left to it."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="grouppo",
        description="Group-wise preference optimization (GroupDPO, GDPO) for Hugging Face causal language "
        "models. `grouppo COMMAND --help` lists a command's options.",
        epilog="Every failure is one line `error: <what, where>` and exit code 1; --debug shows the "
        "traceback.",
    )
    parser.add_argument("--version", action="version", version=f"grouppo {grouppo_version()}")
    parser.add_argument("--debug", action="store_true", help="Show the traceback of a failure.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (_, help) in COMMANDS.items():
        sub.add_parser(name, allow_abbrev=False, help=help, add_help=False, prog=f"grouppo {name}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` names; returns its exit code."""
    from grouppo.apps.cli.config import CommandError
    from grouppo.data import DataError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("GROUPPO_DEBUG", "") not in ("", "0")
    module, _, function = COMMANDS[args.command][0].partition(":")
    from grouppo.environment import quiet_start
    from grouppo.models import ModelLoadError
    from grouppo.runs import RunChangedError, RunLockedError, TrainingInterrupted

    quiet_start()
    try:
        return getattr(importlib.import_module(module), function)(rest)
    except TrainingInterrupted as error:
        if os.environ.get("RANK", "0") == "0":  # every rank stops; one says so
            command = " ".join(shlex.quote(a) for a in ["grouppo", *argv, "--resume_from_checkpoint", "true"])
            print(f"error: {error}\nresume with: {command}", file=sys.stderr)
        return 128 + error.signum
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted (a second signal: stopped at once, without saving)", file=sys.stderr)
        return 130
    except (DataError, CommandError, ModelLoadError, RunChangedError, RunLockedError) as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        if debug:
            raise
        print(
            f"error: {type(error).__name__}: {error} (grouppo --debug {args.command} ... shows where)",
            file=sys.stderr,
        )
        return 1


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
