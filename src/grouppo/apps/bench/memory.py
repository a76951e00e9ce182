"""``grouppo bench memory`` measures something narrower, for ``coupled`` and ``decoupled:C`` only: the memory
that one forward + loss + backward of grouppo adds (no trainer, no optimizer step; see
``run_backward_memory``), each (strategy, K) in a fresh subprocess under the same memory setting, and
reports its growth from the smallest to the largest K against ``GROWTH_TARGET``.
``benchmarks/memory.py`` is a front end to this command with its own defaults and file names.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from grouppo.apps.bench.spec import (
    GROWTH_TARGET,
    MEMORY_ENV,
    MIB,
    BenchSpec,
    add_shape_arguments,
    build_groups,
    build_model,
    current_memory_bytes,
    device_description,
    peak_memory_bytes,
    run_child,
    shape_from_args,
    spec_row,
)


def run_backward_memory(spec: BenchSpec) -> dict[str, Any]:
    """One forward + loss + backward of grouppo in this process, and the memory the step adds.

    No trainer and no optimizer step: ``group_logps`` (policy forward, ``response_chunk_size`` from the
    strategy), ``group_dpo_loss`` (all pairs, against the groups' precomputed reference log-probs) and
    ``loss.backward()``. ``step_increment_bytes`` is the high-water mark (``peak_memory_bytes``) after
    the step minus the one after building the model and the batch: the activations, the parameters'
    gradients and autograd's bookkeeping. The mark never goes down, so call this in a fresh process
    (``measure_step_memory``). ``baseline_current_mem_bytes``, the memory held at the baseline, checks
    that building the model left no transient mark above what it keeps (which would make the increment
    an underestimate).
    """
    import torch

    from grouppo.collate import GroupCollator
    from grouppo.decoupled import group_logps
    from grouppo.losses import FlatGroupBatch, group_dpo_loss

    if spec.strategy != "coupled" and spec.chunk_size is None:
        raise ValueError(f"a memory-growth run takes coupled or decoupled:C, not {spec.strategy!r}")
    model = build_model(spec)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in GroupCollator(pad_token_id=0)(build_groups(spec)).items()}

    baseline, baseline_current = peak_memory_bytes(), current_memory_bytes()
    start = time.perf_counter()
    logps = group_logps(
        model, batch, response_chunk_size=spec.chunk_size, logits_chunk_size=spec.logits_chunk_size
    )
    loss, _ = group_dpo_loss(
        FlatGroupBatch(
            logps,
            batch["ref_logps"],
            batch["response_mask"].sum(-1),
            batch["labels"],
            batch["scores"],
            batch["group_index"],
            batch["slot"],
        ),
        beta=0.1,
        loss_type="all_pairs",
    )
    loss.backward()
    peak = peak_memory_bytes()  # synchronizes a GPU
    step_time = time.perf_counter() - start
    config = model.config
    return {
        **spec_row(spec),
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "layers": config.num_hidden_layers,
        "params": sum(p.numel() for p in model.parameters()),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "torch_threads": torch.get_num_threads(),
        "groups": spec.groups,
        "dtype": spec.dtype,
        "baseline_mem_bytes": baseline,
        "baseline_current_mem_bytes": baseline_current,
        "peak_mem_bytes": peak,
        "step_increment_bytes": peak - baseline,
        "step_time_s": round(step_time, 3),
        "loss": float(loss.detach()),
        "device": device_description(),
    }


def measure_step_memory(spec: BenchSpec, timeout: float | None = None) -> dict[str, Any]:
    """``run_backward_memory`` in a fresh subprocess (with ``MEMORY_ENV``); a failure becomes a row with
    ``error``."""
    return run_child(spec, MEMORY_ENV, timeout, kind="backward")


def memory_growth_report(rows: list[dict[str, Any]], command: str = "", wall_s: float | None = None) -> str:
    """The markdown table of ``run_backward_memory`` rows: the step increment per K, coupled against each
    decoupled chunk size, and its growth from the smallest to the largest K against ``GROWTH_TARGET``.

    A row is coupled when its ``chunk_size`` is None, else decoupled with that chunk size (rows written
    by ``benchmarks/memory.py`` before it became a front end of this mode name the strategy
    ``decoupled``, without the chunk size). The grid is read from the rows; failed rows show as such.
    """
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return "Every run failed:\n\n" + "".join(f"- {_memory_summary(r)}\n" for r in rows)
    get = {(r["group_size"], r["chunk_size"]): r for r in rows}
    ks = sorted({r["group_size"] for r in rows})
    chunks = sorted({r["chunk_size"] for r in rows if r["chunk_size"] is not None})
    first = ok[0]
    gpu = first["device"].startswith("gpu")
    measure = "`max_memory_allocated`" if gpu else "`ru_maxrss`"
    groups = first.get("groups", 1)
    dtype = first.get("dtype", "float32")

    def inc(k: int, c: int | None) -> float | None:
        row = get.get((k, c), {})
        return None if "step_increment_bytes" not in row else row["step_increment_bytes"] / MIB

    def cell(value: float | None, fmt: str) -> str:  # a measurement: None when the run failed
        return "failed" if value is None else format(value, fmt)

    def ratio(a: float | None, b: float | None) -> float | None:  # None without both measurements
        return None if a is None or not b else a / b

    def fold(value: float | None) -> str:  # a ratio, as in 1.47x
        return "n/a" if value is None else f"{value:.2f}"

    header = ["K", "coupled step increment (MiB)"]
    for c in chunks:
        header += [f"decoupled (chunk {c}) step increment (MiB)", f"ratio coupled / decoupled (chunk {c})"]
    header += ["coupled step time (s)"] + [f"decoupled (chunk {c}) step time (s)" for c in chunks]
    lines = [
        f"# Peak memory of one GroupDPO training step ({'GPU' if gpu else 'CPU'})",
        "",
        f"Model: random-init Llama, hidden {first['hidden_size']}, {first['layers']} layers, "
        f"{first['heads']} heads, intermediate {first['intermediate_size']}, vocab {first['vocab_size']}, "
        f"{dtype}, {first['params'] / 1e6:.1f}M parameters, attention "
        f"`{first['attn_implementation']}`. {'One group' if groups == 1 else f'{groups} groups, each'}: "
        f"prompt {first['prompt_len']} tokens, K responses of {first['response_len']} tokens, "
        "top half positive, all-pairs loss, precomputed reference log-probs. Step = forward + loss + "
        f"backward (no optimizer step). Step increment = {measure} after the step minus {measure} "
        "after building model and batch, each run in a fresh process"
        + ("." if gpu else " with `MALLOC_MMAP_THRESHOLD_=131072`."),
        "",
        f"Device: {first['device']}"  # device_description names the threads; older rows' did not
        + ("." if "threads" in first["device"] else f", torch threads {first['torch_threads']}."),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" for _ in header) + "|",
    ]
    for k in ks:
        cells = [str(k), cell(inc(k, None), ".0f")]
        for c in chunks:
            single = "*" if k <= c and inc(k, c) is not None else ""  # one chunk: nothing is decoupled
            cells += [cell(inc(k, c), ".0f") + single, fold(ratio(inc(k, None), inc(k, c)))]
        step_times = [get.get((k, c), {}).get("step_time_s") for c in [None, *chunks]]
        lines.append("| " + " | ".join(cells + [cell(t, ".1f") for t in step_times]) + " |")
    lo, hi = ks[0], ks[-1]
    lines += [
        "",
        f"Growth of the step increment, K={hi} vs K={lo} (target for decoupled: <= {GROWTH_TARGET}x):",
    ]
    lines.append(f"- coupled: {fold(ratio(inc(hi, None), inc(lo, None)))}x")
    for c in chunks:
        growth = ratio(inc(hi, c), inc(lo, c))
        verdict = (
            ""
            if growth is None
            else f" ({'meets' if growth <= GROWTH_TARGET else 'misses'} the {GROWTH_TARGET}x target)"
        )
        lines.append(f"- decoupled (chunk {c}): {fold(growth)}x{verdict}")
        multi = [k for k in ks if k > c]
        if multi and min(multi) not in (lo, hi):
            growth = ratio(inc(hi, c), inc(min(multi), c))
            lines.append(
                f"  - K={hi} vs K={min(multi)}, the smallest K with at least 2 chunks: {fold(growth)}x"
            )
    grads = first["params"] * {"float64": 8, "float32": 4}.get(dtype, 2) / MIB
    lines += [
        "",
        "`*`: K <= chunk size, a single chunk: the run is checkpointed but nothing is decoupled. With one "
        "chunk the parameter gradients are allocated while the activations are being freed layer by layer; "
        "with two or more chunks every later chunk's recomputed activations sit on top of the complete "
        f"parameter-gradient buffers ({grads:.0f} MiB for {first['params'] / 1e6:.1f}M {dtype} parameters), "
        "a constant that does not grow with K.",
    ]
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- {_memory_summary(r)}" for r in failed]
    lines += [
        "",
        "Step times are single measurements on a shared machine (noisy)"
        + (
            ""
            if gpu
            else ", taken under `MALLOC_MMAP_THRESHOLD_=131072`: every large allocation is a fresh mmap "
            "whose pages fault in on first touch, a cost that weighs more on the decoupled runs (the "
            "recompute allocates everything twice)"
        )
        + ". They are memory-run timings, not throughput numbers: `grouppo bench steps` times "
        "steps for that."
        + ("" if wall_s is None else f" Total wall time {wall_s:.0f} s."),
        "",
        "Command (from the repository root):",
        "",
        f"    {command}",
        "",
    ]
    return "\n".join(lines)


def _memory_summary(row: dict[str, Any]) -> str:
    head = f"K={row['group_size']:<3} {row['strategy']:<14}"
    if "error" in row:
        return f"{head} failed: {row['error'][:200]}"
    return (
        f"{head} baseline {row['baseline_mem_bytes'] / MIB:7.0f} MiB"
        f"  peak {row['peak_mem_bytes'] / MIB:7.0f} MiB"
        f"  step +{row['step_increment_bytes'] / MIB:7.0f} MiB  {row['step_time_s']:6.1f} s"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``grouppo bench memory``'s options, beside the shape options."""
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=["coupled", "decoupled:2"],
        help="coupled and decoupled:C strategies to compare",
    )
    parser.add_argument("--group_sizes", nargs="+", type=int, default=[2, 8, 32], help="group sizes K")
    parser.add_argument(
        "--output_dir", default="benchmarks/results/memory", help="writes OUTPUT_DIR.json and .md"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--disable_tqdm", action="store_true", help="no progress bar")
    add_shape_arguments(parser)


def run_command(args: argparse.Namespace, command: str) -> int:
    """Measure the memory one step adds per (K, strategy), each in a fresh process; write the table."""
    from tqdm.auto import tqdm

    if "coupled" not in args.strategies or any(
        s != "coupled" and BenchSpec(strategy=s).chunk_size is None for s in args.strategies
    ):
        raise ValueError(
            "grouppo bench memory compares coupled with decoupled:C: --strategies coupled decoupled:C"
        )
    shape = shape_from_args(args)
    out = Path(args.output_dir)
    start = time.perf_counter()
    rows = []
    total = len(args.group_sizes) * len(args.strategies)
    with tqdm(total=total, desc="bench", unit="run", disable=args.disable_tqdm) as progress:
        for k in args.group_sizes:
            for strategy in args.strategies:
                rows.append(
                    measure_step_memory(BenchSpec(strategy=strategy, group_size=k, **shape), args.timeout)
                )
                progress.update()
                progress.write(_memory_summary(rows[-1]), file=sys.stdout)
    table = memory_growth_report(rows, command, time.perf_counter() - start)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0
