"""What reproduces where: the main job's evaluation of the starting model, run several ways on one machine.

Greedy decoding is a chain of argmaxes; two runs agree only as long as every logit is computed to the
same bits. The same model, prompts and code give the same answers on one machine, but the matrix-product
kernels differ with the dtype (bfloat16 or float32), the batch (what a row is padded with, which kernel
blocking a shape gets), the thread count and the CPU's instruction set (AMX, AVX-512 BF16, AVX2), and
each sums in its own order. This script measures how far that moves an evaluation: the embedded model
answers the main job's 128 IFEval-style and 64 IFBench prompts under each configuration below, each in
a fresh process (the kernel settings are read at start-up), and the report counts, against the main
job's own setting (bfloat16, batch 64), how many answers differ and how many prompts change outcome.
``ONEDNN_MAX_CPU_ISA`` caps the instruction set oneDNN may use, which imitates an older CPU on this one
(it cannot imitate a newer one, such as AMX on a CPU without it).

    .venv/bin/python experiments/reproducibility.py --out runs/reproducibility
    .venv/bin/python experiments/reproducibility.py --out runs/reproducibility \\
        --export experiments/results/reproducibility

On a second CPU, some of the configurations, compared with the first CPU's answers under the same
configuration (what no ``ONEDNN_MAX_CPU_ISA`` cap can imitate, such as AMX):

    .venv/bin/python experiments/reproducibility.py --out runs/reproducibility_amx \\
        --configs bf16_b64 bf16_b64_again fp32_b64 fp32_b16 fp32_b64_isa_avx2
    .venv/bin/python experiments/reproducibility.py --out runs/reproducibility_amx \\
        --export experiments/results/reproducibility_amx
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from if_groups import BENCHMARKS, _differing, _units, read_gz, write_gz  # noqa: E402

# name: (generation dtype, batch size, environment)
CONFIGS: dict[str, tuple[str, int, dict[str, str]]] = {
    "bf16_b64": ("bfloat16", 64, {}),
    "bf16_b64_again": ("bfloat16", 64, {}),
    "bf16_b16": ("bfloat16", 16, {}),
    "bf16_b64_1thread": ("bfloat16", 64, {"OMP_NUM_THREADS": "1"}),
    "bf16_b64_isa_avx512core": ("bfloat16", 64, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}),
    "bf16_b64_isa_avx2": ("bfloat16", 64, {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
    "fp32_b64": ("float32", 64, {}),
    "fp32_b16": ("float32", 16, {}),
    "fp32_b64_isa_avx2": ("float32", 64, {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}),
}
REFERENCE = "bf16_b64"
PROMPTS = {"ifeval": 128, "ifbench": 64}  # the main job's evaluation


def evaluate_one(name: str, out: Path) -> None:
    """Run in a fresh process: evaluate the embedded model under configuration ``name``."""
    from grouppo.environment import describe_environment
    from grouppo.evaluation import benchmark_prompts, evaluate_instruction_following
    from grouppo.generation import SamplingConfig, TransformersGenerator
    from grouppo.models import load_model, load_tokenizer

    dtype, batch, _ = CONFIGS[name]
    import torch

    model, tokenizer = load_model(None, dtype=torch.float32), load_tokenizer(None)
    generator = TransformersGenerator(
        model, tokenizer, SamplingConfig(max_new_tokens=192, temperature=0.0, batch_size=batch, dtype=dtype)
    )
    start = time.perf_counter()
    rows = []
    for benchmark, n in PROMPTS.items():
        records = benchmark_prompts(benchmark, n=n, limit=n)
        _, generations = evaluate_instruction_following(generator, tokenizer, records, benchmark)
        rows += [{"config": name, "benchmark": benchmark, **g} for g in generations]
    write_gz(rows, out / f"{name}.jsonl.gz")
    info = {
        "config": name,
        "dtype": dtype,
        "batch_size": batch,
        "env": CONFIGS[name][2],
        "seconds": round(time.perf_counter() - start, 1),
        **describe_environment(),
    }
    (out / f"{name}.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def run(out: Path, configs: list[str] | None = None) -> None:
    """Each configuration (all of ``CONFIGS`` unless ``configs`` names some) not yet under ``out``, each
    in a fresh process."""
    out.mkdir(parents=True, exist_ok=True)
    for name, (_, _, env) in CONFIGS.items():
        if (out / f"{name}.json").exists() or (configs and name not in configs):
            continue
        print(f"[{name}]", flush=True)
        subprocess.run(
            [sys.executable, __file__, "--one", name, "--out", str(out)],
            check=True,
            env={**os.environ, **env},
        )


def export(out: Path, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    names = [name for name in CONFIGS if (out / f"{name}.json").exists()]
    rows = [r for name in names for r in read_gz(out / f"{name}.jsonl.gz")]
    write_gz(rows, results / "generations.jsonl.gz")
    runs = [json.loads((out / f"{name}.json").read_text()) for name in names]
    (results / "environment.json").write_text(json.dumps(runs, indent=1) + "\n", encoding="utf-8")
    from recompute import write_table  # the table as recompute.py rebuilds it

    write_table(results, report)


def _metric(rows: list[dict[str, Any]], metric: str) -> float:
    num, den = _units(rows, metric)
    return sum(num) / sum(den)


def _load(
    results: Path,
) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], dict[str, dict[str, Any]]]]:
    """(configuration -> its run's record, (configuration, benchmark) -> key -> answer row)."""
    runs = {r["config"]: r for r in json.loads((results / "environment.json").read_text())}
    table: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in read_gz(results / "generations.jsonl.gz"):
        table.setdefault((row["config"], row["benchmark"]), {})[str(row["key"])] = row
    return runs, table


def report(results: Path, across: Path | None = None) -> str:
    """results.md from the records alone: per configuration, the accuracies and how many answers and
    prompt-level outcomes differ from the main job's configuration (bfloat16, batch 64) and from the
    default configuration of the same dtype; with ``across`` (the same script's export from another CPU),
    also from the same configuration there."""
    from grouppo.environment import hardware_line

    runs, table = _load(results)
    other_runs, other = _load(across) if across is not None else ({}, {})
    own = {"bfloat16": REFERENCE, "float32": "fp32_b64"}
    columns = ["prompt strict", "instruction strict", f"differing vs {REFERENCE}", "differing vs same dtype"]
    if across is not None:
        columns.append(f"differing vs same configuration on `{across.name}`")
    lines = [
        "# Reproducibility of the main job's evaluation",
        "",
        "Recompute: `python experiments/recompute.py`. Hardware: "
        + "; ".join(sorted({hardware_line(r) for r in runs.values()}))
        + "."
        + (
            f" Compared with `{across.name}`, on "
            + "; ".join(sorted({hardware_line(r) for r in other_runs.values()}))
            + "."
            if across is not None
            else ""
        ),
        "",
        f"Each configuration answers the main job's {PROMPTS['ifeval']} IFEval-style and "
        f"{PROMPTS['ifbench']} IFBench prompts greedily. Differing: answers that differ in any character / "
        f"prompts whose prompt-level strict outcome differs, against `{REFERENCE}` (the main job's setting) "
        "and against the default (batch 64) configuration of the same dtype"
        + (", each on this CPU, and against the same configuration on the other CPU." if across else "."),
        "",
        "| configuration | dtype | batch | environment | "
        + " | ".join(f"{b} {c}" for b in BENCHMARKS for c in columns)
        + " |",
        "|---|---|---:|---|" + "---:|" * (len(columns) * len(BENCHMARKS)),
    ]

    def differing(mine: dict[str, Any], ref: dict[str, Any] | None) -> str:
        if ref is None:
            return "not run"
        a, o = _differing(mine, ref)
        return f"{a} / {o} of {len(mine)}"

    for name, info in runs.items():
        env = " ".join(f"{k}={v}" for k, v in info["env"].items())
        cells = [name, info["dtype"], str(info["batch_size"]), env]
        for benchmark in BENCHMARKS:
            mine = table[(name, benchmark)]
            rows_ = [mine[k] for k in sorted(mine)]
            cells += [
                f"{_metric(rows_, 'prompt_level_strict'):.3f}",
                f"{_metric(rows_, 'instruction_level_strict'):.3f}",
                differing(mine, table.get((REFERENCE, benchmark))),
                differing(mine, table.get((own[info["dtype"]], benchmark))),
            ]
            if across is not None:
                cells.append(differing(mine, other.get((name, benchmark))))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/reproducibility")
    p.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--export", metavar="DIR")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="only these configurations")
    args = p.parse_args(argv)
    if args.one:
        evaluate_one(args.one, Path(args.out))
    elif args.export:
        export(Path(args.out), Path(args.export))
        print((Path(args.export) / "results.md").read_text())
    else:
        run(Path(args.out), args.configs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
