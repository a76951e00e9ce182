"""Rebuild every reported table from the raw records committed under ``experiments/results/``; no model.

Each results folder holds its experiment's per-prompt records (``*.jsonl.gz``), ``environment.json``
(the hardware and library versions it ran on; the main job's folder: inside ``metrics.json``) and
``results.md``, the tables this rebuilds:

    python experiments/recompute.py            # rewrite every results.md from its records
    python experiments/recompute.py --check    # exit 1 when a committed results.md differs
    python experiments/recompute.py --quickstart runs/quickstart   # take in a `make run` directory
    python experiments/recompute.py --quickstart runs/quickstart --into quickstart_amx   # from another CPU

The test suite runs ``--check`` over the committed folders.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import gdpo_curve  # noqa: E402
import if_groups  # noqa: E402
import reproducibility  # noqa: E402
from if_groups import BENCHMARKS, read_gz, write_gz  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def quickstart_report(results: Path, across: Path | None = None) -> str:
    """The main job's before/after table (``grouppo quickstart``'s summary.md) from its generations; with
    ``across``, another machine's run of the same job, how many of the same prompts' answers differ, and
    how many prompt-level strict outcomes, before and after training (as the other cross-CPU tables)."""
    from grouppo.apps.quickstart import summary_table
    from grouppo.embedded.instructions import if_units
    from grouppo.environment import hardware_line
    from grouppo.evaluation import compare_generations
    from grouppo.intervals import ratio_interval

    rows = read_gz(results / "generations.jsonl.gz")
    metrics = json.loads((results / "metrics.json").read_text())

    def summary(part: list[dict[str, Any]]) -> dict[str, Any]:
        units = if_units(part)
        out: dict[str, Any] = {metric: sum(n) / sum(d) for metric, (n, d) in units.items()}
        out["ci95"] = {metric: ratio_interval(n, d) for metric, (n, d) in units.items()}
        out["num_prompts"] = len(part)
        out["unscored_instructions"] = sum(r["strict"].count(None) for r in part)
        return out

    split = {
        (w, b): [r for r in rows if r["when"] == w and r["benchmark"] == b]
        for w in ("before", "after")
        for b in BENCHMARKS
    }
    benchmarks = [b for b in BENCHMARKS if split[("before", b)]]
    before = {b: summary(split[("before", b)]) for b in benchmarks}
    after = {b: summary(split[("after", b)]) for b in benchmarks}
    changes = {b: compare_generations(split[("before", b)], split[("after", b)]) for b in benchmarks}
    config = metrics["config"]
    text = (
        f"# The main job (`make run`)\n\nHardware: {hardware_line(metrics['environment'])}. "
        f"{config['train_prompts']} training prompts, K = {config['num_generations']}, "
        f"seed {config['seed']}; "
        f"{metrics['seconds']:.0f} s. Recompute: `python experiments/recompute.py`.\n\n"
        + summary_table(before, after, changes)
        + "\n"
    )
    if across is None:
        return text
    theirs = read_gz(across / "generations.jsonl.gz")
    other = {(r["when"], r["benchmark"], r["key"]): r for r in theirs}
    mine = [(r["when"], r["benchmark"], r["key"]) for r in rows]
    if len(other) != len(theirs) or set(other) != set(mine) or len(set(mine)) != len(mine):
        raise ValueError(f"{across}: not the same prompts, each once, as {results}")
    other_metrics = json.loads((across / "metrics.json").read_text())
    dtypes = [
        f"{m['config']['eval_dtype']} evaluation, {m['config']['training_dtype']} training"
        for m in (metrics, other_metrics)
    ]
    lines = [
        "",
        f"## The same job on another machine (`{across.name}`)",
        "",
        f"Its hardware: {hardware_line(other_metrics['environment'])}. Dtypes: {dtypes[0]} here, "
        f"{dtypes[1]} there (auto: bfloat16 where the CPU computes it natively, as the training groups are "
        "always sampled; bfloat16 kernels differ between CPUs). Training groups kept (responses not all "
        "scored the same): "
        f"{metrics['sampling']['groups']} here, {other_metrics['sampling']['groups']} there. Differing: "
        "answers that differ in any character / prompts whose prompt-level strict outcome differs.",
        "",
        "| when | benchmark | differing |",
        "|---|---|---:|",
    ]
    for (when, benchmark), part in split.items():
        if not part:
            continue
        answers, outcomes = if_groups._differing(
            {r["key"]: r for r in part}, {r["key"]: other[(when, benchmark, r["key"])] for r in part}
        )
        lines.append(f"| {when} | {benchmark} | {answers} / {outcomes} of {len(part)} |")
    return text + "\n".join(lines) + "\n"


def take_quickstart(run_dir: Path, results: Path) -> None:
    """Copy a ``grouppo quickstart`` run's generations and metrics into ``results`` and write its table."""
    rows = []
    for when in ("before", "after"):
        for benchmark in BENCHMARKS:
            path = run_dir / "eval" / f"{when}_{benchmark}.jsonl"
            if path.exists():
                rows += [
                    {"when": when, "benchmark": benchmark, **json.loads(line)}
                    for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip()
                ]
    results.mkdir(parents=True, exist_ok=True)
    write_gz(rows, results / "generations.jsonl.gz")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (results / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    write_table(results, quickstart_report)


QUICKSTARTS = ("quickstart", "quickstart_amx")  # the main job's folders, the first CPU's first
REPORTS: dict[str, Callable[[Path], str]] = {
    "quickstart": quickstart_report,
    # The main job from a clean clone on the second CPU (with AMX), against the first CPU's answers.
    "quickstart_amx": lambda folder: quickstart_report(folder, across=folder.parent / "quickstart"),
    "if_groups": if_groups.report,
    # Section 2 on a second CPU (amendment 8), with how far its shared models moved from section 1's.
    "if_groups_section2": lambda folder: if_groups.report(folder, across=folder.parent / "if_groups"),
    "gdpo_curve": gdpo_curve.report,
    "gdpo_curve_20epochs": gdpo_curve.report,  # exploratory: 20 epochs, and GDPO at lr 2e-4 (amendments 6-9)
    "reproducibility": reproducibility.report,
    # Some of the same configurations on a second CPU (with AMX), against the first CPU's answers.
    "reproducibility_amx": lambda folder: reproducibility.report(
        folder, across=folder.parent / "reproducibility"
    ),
}


def write_table(folder: Path, default: Callable[[Path], str]) -> str:
    """Write ``folder/results.md`` as ``recompute`` rebuilds it (the report registered for the folder's
    name, which may compare it with another folder; ``default`` for a folder not registered here), and
    return it: an export writes the very table that ``--check`` then expects."""
    text = REPORTS.get(folder.name, default)(folder)
    (folder / "results.md").write_text(text, encoding="utf-8")
    return text


def recompute(root: Path = RESULTS, check: bool = False) -> list[str]:
    """Rebuild each results folder's results.md under ``root``; with ``check``, only compare. Returns the
    folders whose committed table differs from what their records give."""
    differing = []
    for name, report in REPORTS.items():
        folder = root / name
        if not (folder / "results.md").exists():
            continue
        text = report(folder)
        if (folder / "results.md").read_text(encoding="utf-8") != text:
            differing.append(name)
            if not check:
                (folder / "results.md").write_text(text, encoding="utf-8")
        state = "same" if name not in differing else "differs" if check else "differed (rewritten)"
        print(f"{name}: {state}")
    return differing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare only; exit 1 when a table differs")
    p.add_argument("--root", default=str(RESULTS), help="the results folder")
    p.add_argument("--quickstart", metavar="RUN_DIR", help="take in a `make run` directory first")
    p.add_argument(
        "--into", default="quickstart", choices=QUICKSTARTS, help="with --quickstart: its folder under --root"
    )
    args = p.parse_args(argv)
    if args.into != "quickstart" and not args.quickstart:
        p.error("--into needs --quickstart")
    if args.quickstart:
        take_quickstart(Path(args.quickstart), Path(args.root) / args.into)
    differing = recompute(Path(args.root), check=args.check)
    return 1 if args.check and differing else 0


if __name__ == "__main__":
    raise SystemExit(main())
