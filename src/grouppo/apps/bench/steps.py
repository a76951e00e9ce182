"""``grouppo bench steps``: one training step per strategy, side by side, on the same model and groups.

Strategies (``--strategies``):

* ``coupled``: grouppo with ``response_chunk_size=None`` (every response's activations kept to the loss);
* ``decoupled:C``: grouppo's decoupled backward, ``C`` responses recomputed at a time;
* ``trl:best_vs_rest``: TRL 1.16 ``DPOTrainer`` on the groups split into pairs, the best response
  against each other one (K - 1 pairs per group);
* ``trl:all_pairs``: TRL on every positive-negative pair (P x N pairs per group), the comparisons
  that grouppo's ``all_pairs`` loss makes.

Every strategy runs through its own trainer's ``training_step`` (loss, backward) followed by the
optimizer's step (AdamW), on a random-init Llama-shaped model with random token ids, the top half of
each group positive, and precomputed reference log-probs (the reference pass is not part of a step).
Each (strategy, K) runs in a fresh subprocess, so memory high-water marks never mix (on CPU, two: one
measures memory, the other time; see ``run_isolated``).

Measured per row: ``peak_mem_bytes`` (GPU: ``torch.cuda.max_memory_allocated`` over the run; CPU:
``ru_maxrss`` of a subprocess run with ``MALLOC_MMAP_THRESHOLD_=131072`` so freed activations go back
to the OS), ``static_mem_bytes`` (the same measure after the model, the optimizer's state and the batch
exist, after the warm-up step: GPU ``memory_allocated``, CPU resident set ``VmRSS``; the part that does
not depend on the strategy), ``step_time_s``
(median of ``--steps`` steps after ``--warmup``), ``tokens_per_s`` (the groups' tokens, each prompt
counted once, per second: the same data for every strategy, however a strategy lays it out) and
``mfu`` on GPU (``6 x parameters x tokens_per_s`` over the device's peak dense bf16 FLOP/s; the
recompute of the decoupled backward is overhead, not useful FLOPs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from grouppo.apps.bench.spec import (
    GROWTH_TARGET,
    MEMORY_ENV,
    PEAK_BF16_FLOPS,
    BenchSpec,
    add_shape_arguments,
    build_groups,
    build_model,
    current_memory_bytes,
    device_description,
    group_labels,
    pair_indices,
    peak_memory_bytes,
    run_child,
    shape_from_args,
    spec_row,
    to_pairs,
)


def trainer_and_batch(
    spec: BenchSpec, model: Any, groups: list[dict[str, Any]], out: str
) -> tuple[Any, Any]:
    """The trainer that runs the strategy, and one batch it collated from the groups."""
    from datasets import Dataset

    from grouppo.embedded.synthetic import tiny_tokenizer

    tokenizer = tiny_tokenizer()  # only its pad id and the trainers' bookkeeping are used
    # Same precision for every strategy: the model's dtype, no autocast (TRL's DPOConfig defaults to bf16).
    common = dict(
        output_dir=out,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-6,
        bf16=False,
        fp16=False,
    )
    if spec.strategy.startswith("trl:"):
        from trl import DPOConfig, DPOTrainer

        pairs = to_pairs(groups, spec.strategy.split(":")[1])
        args = DPOConfig(
            **common, per_device_train_batch_size=len(pairs), max_length=None, precompute_ref_log_probs=True
        )
        dummy = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
        trainer = DPOTrainer(model, args=args, train_dataset=dummy, processing_class=tokenizer)
        batch = trainer.data_collator(pairs)
    else:
        from grouppo.groupdpo import GroupDPOConfig, GroupDPOTrainer

        args = GroupDPOConfig(
            **common,
            per_device_train_batch_size=len(groups),
            response_chunk_size=spec.chunk_size,
            logits_chunk_size=spec.logits_chunk_size,
            loss_type="all_pairs",
            precompute_ref_logps=True,
        )
        trainer = GroupDPOTrainer(
            model, args=args, train_dataset=Dataset.from_list(groups), processing_class=tokenizer
        )
        batch = trainer.data_collator(groups)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which the bench bypasses
    return trainer, trainer._prepare_inputs(batch)


def run_one(spec: BenchSpec, out: str = "/tmp/grouppo-bench") -> dict[str, Any]:
    """Run one strategy in this process and return its row (call in a fresh process for memory)."""
    import torch

    model = build_model(spec)
    groups = build_groups(spec)
    trainer, batch = trainer_and_batch(spec, model, groups, out)
    optimizer = trainer.optimizer

    losses = []

    def step() -> float:
        start = time.perf_counter()
        losses.append(trainer.training_step(model, batch))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(max(spec.warmup, 1)):  # the first step also creates AdamW's state
        step()
    static = current_memory_bytes()  # weights, AdamW state, batch (zero_grad freed the gradients)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(spec.steps)]
    peak = max(
        peak_memory_bytes(), static
    )  # Linux updates ru_maxrss lazily: it can trail VmRSS by a page or so
    step_time = statistics.median(times)
    tokens = spec.groups * (spec.prompt_len + spec.group_size * spec.response_len)
    params = sum(p.numel() for p in model.parameters())
    mfu = None
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        if peak_flops:
            mfu = 6 * params * tokens / step_time / peak_flops
    return {
        **spec_row(spec),
        "peak_mem_bytes": peak,
        "static_mem_bytes": static,
        "step_time_s": step_time,
        "step_times_s": times,
        "tokens_per_s": tokens / step_time,
        "first_loss": float(losses[0]),  # equal across strategies making the same comparisons
        "mfu": mfu,
        "device": device_description(),
        "params": params,
        "groups": spec.groups,
        "dtype": spec.dtype,
        "pairs": len(to_pairs(groups, spec.strategy[4:])) if spec.strategy[:4] == "trl:" else None,
    }


def run_isolated(spec: BenchSpec, timeout: float | None = None) -> dict[str, Any]:
    """Run one strategy in fresh subprocesses; a failure (e.g. out of memory) becomes a row with ``error``.

    On CPU the memory is measured in a process with ``MALLOC_MMAP_THRESHOLD_=131072`` (freed blocks go
    back to the OS, so ``ru_maxrss`` shows what the code keeps), and the time in a second process
    without it: under that setting every large allocation is a fresh mmap whose pages fault in on first
    touch, which slows strategies that allocate many small blocks (the decoupled recompute) unfairly.
    """
    import torch

    memory = run_child(spec, MEMORY_ENV, timeout)
    if torch.cuda.is_available() or "error" in memory:
        return memory
    timing = run_child(spec, {}, timeout)
    if "error" in timing:
        return timing
    keep = ("peak_mem_bytes", "static_mem_bytes")
    return {**timing, **{k: memory[k] for k in keep}, "step_time_in_memory_run_s": memory["step_time_s"]}


def add_timing_round(row: dict[str, Any], timing: dict[str, Any]) -> None:
    """Fold one more timing run of the same spec into ``row``: the step time becomes the median over
    rounds (each round's own figure is the median of its steps), and tokens/s and MFU follow it."""
    if "error" in timing:
        row.setdefault("failed_rounds", []).append(timing["error"])
        return
    rounds = row.setdefault("round_step_times_s", [row["step_time_s"]])
    rounds.append(timing["step_time_s"])
    scale = row["step_time_s"] / statistics.median(rounds)
    row["step_time_s"] = statistics.median(rounds)
    row["tokens_per_s"] *= scale
    if row.get("mfu"):
        row["mfu"] *= scale


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Peak memory and step time against K, one line per strategy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        ok = sorted(
            (r for r in rows if r["strategy"] == strategy and "error" not in r), key=lambda r: r["group_size"]
        )
        if not ok:
            continue
        ks = [r["group_size"] for r in ok]
        mem_ax.plot(ks, [r["peak_mem_bytes"] / 2**20 for r in ok], marker="o", label=strategy)
        time_ax.plot(ks, [r["step_time_s"] for r in ok], marker="o", label=strategy)
    for ax, label in ((mem_ax, "peak memory (MiB)"), (time_ax, "step time (s, median)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("group size K")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    mem_ax.legend(fontsize=8)
    fig.suptitle(next((r["device"] for r in rows if "device" in r), ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows: list[dict[str, Any]], command: str = "") -> str:
    """A markdown table of the rows and the ratios that the performance targets are stated in."""
    ok = [r for r in rows if "error" not in r]
    first = ok[0] if ok else {}
    lines = [
        f"Device: {first.get('device', '?')}. Model: random-init Llama, {first.get('params', 0) / 1e6:.1f}M "
        f"parameters, {first.get('dtype', '?')}; prompt {first.get('prompt_len')} and responses "
        f"{first.get('response_len')} tokens, {first.get('groups')} group(s) per step; AdamW.",
        "",
        f"Command: `{command}`",
        "",
        "| K | strategy | peak memory (MiB) | step time (s) | tokens/s | MFU |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['group_size']} | {r['strategy']} | failed: {r['error'][:80]} | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "n/a"
        lines.append(
            f"| {r['group_size']} | {r['strategy']} | {r['peak_mem_bytes'] / 2**20:.0f} "
            f"| {r['step_time_s']:.2f} | {r['tokens_per_s']:.0f} | {mfu} |"
        )
    get = {(r["strategy"], r["group_size"]): r for r in ok}
    ks = sorted({r["group_size"] for r in ok})
    ours = sorted({r["strategy"] for r in ok if not r["strategy"].startswith("trl:")})
    out = ["", "Ratios, all from this run:", ""]
    for s in (s for s in ours if s.startswith("decoupled:")):
        if (s, ks[0]) in get and (s, ks[-1]) in get:
            growth = get[s, ks[-1]]["peak_mem_bytes"] / get[s, ks[0]]["peak_mem_bytes"]
            coupled = get.get(("coupled", ks[-1]), {}).get("peak_mem_bytes")
            tail = f"; coupled: {coupled / get['coupled', ks[0]]['peak_mem_bytes']:.2f}x" if coupled else ""
            out.append(
                f"- (a) peak memory K={ks[-1]} / K={ks[0]}, {s}: {growth:.2f}x "
                f"(target <= {GROWTH_TARGET}x{tail})"
            )
    for k in ks:
        for s in (s for s in ours if s.startswith("decoupled:")):
            if (s, k) in get and ("coupled", k) in get:
                ratio = get[s, k]["step_time_s"] / get["coupled", k]["step_time_s"]
                out.append(f"- (b) step time {s} / coupled at K={k}: {ratio:.2f}x")
    for k in ks:
        mine = [get[s, k] for s in ours if (s, k) in get]
        for trl in ("trl:best_vs_rest", "trl:all_pairs"):
            if (trl, k) not in get or not mine:
                continue
            best = max(mine, key=lambda r: r["tokens_per_s"])
            other = get[trl, k]
            out.append(
                f"- (c/d) K={k}: grouppo {best['strategy']} vs {trl} ({other['pairs']} pairs): "
                f"{best['tokens_per_s'] / other['tokens_per_s']:.2f}x the tokens/s, "
                f"{best['step_time_s'] / other['step_time_s']:.2f}x the time per group, "
                f"{best['peak_mem_bytes'] / other['peak_mem_bytes']:.2f}x the peak memory"
            )
    return "\n".join(lines + out) + "\n"


def _summary(row: dict[str, Any]) -> str:
    head = f"K={row['group_size']:<3} {row['strategy']:<18}"
    if "error" in row:
        return f"{head} failed: {row['error'][:200]}"
    return (
        f"{head} peak {row['peak_mem_bytes'] / 2**20:8.0f} MiB  step {row['step_time_s']:7.2f} s  "
        f"{row['tokens_per_s']:9.0f} tok/s" + (f"  MFU {row['mfu']:.1%}" if row["mfu"] else "")
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``grouppo bench steps``'s options, beside the shape options."""
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=["coupled", "decoupled:2", "trl:best_vs_rest", "trl:all_pairs"],
        help="coupled, decoupled:C, trl:best_vs_rest, trl:all_pairs",
    )
    parser.add_argument("--group_sizes", nargs="+", type=int, default=[2, 8, 32], help="group sizes K")
    parser.add_argument(
        "--max_pairs", type=int, default=64, help="skip TRL runs with more pairs per step than this"
    )
    parser.add_argument(
        "--output_dir", default="benchmarks/results/bench", help="writes OUTPUT_DIR.json, .md and .png"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument(
        "--find_max_k",
        action="store_true",
        help="per strategy, double K from the first --group_sizes value until a run fails (out of memory)",
    )
    parser.add_argument("--max_k", type=int, default=1024, help="upper bound of --find_max_k")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time every run this many times, round-robin over all runs, and report the "
        "median: on a shared machine the load drifts, and alternating keeps it from "
        "favouring one strategy",
    )
    parser.add_argument("--disable_tqdm", action="store_true", help="no progress bar")
    add_shape_arguments(parser)


def run_command(args: argparse.Namespace, command: str) -> int:
    """Run every (strategy, K) in fresh processes; write the rows, the table and the plot."""
    from tqdm.auto import tqdm

    shape = shape_from_args(args)

    def bar(total: int | None) -> Any:  # runs done, rate and ETA on stderr; results on stdout above it
        return tqdm(total=total, desc="bench", unit="run", disable=args.disable_tqdm or total == 0)

    rows, max_k = [], {}
    if args.find_max_k:
        with bar(None) as progress:
            for strategy in args.strategies:
                k, max_k[strategy] = args.group_sizes[0], None
                while k <= args.max_k:
                    row = run_isolated(
                        BenchSpec(strategy=strategy, group_size=k, **shape), timeout=args.timeout
                    )
                    rows.append(row)
                    progress.update()
                    progress.write(_summary(row), file=sys.stdout)
                    if "error" in row:
                        break
                    max_k[strategy], k = k, 2 * k
    specs = []
    for k in [] if args.find_max_k else args.group_sizes:
        for strategy in args.strategies:
            trl = strategy.startswith("trl:")
            pairs = args.groups * len(pair_indices(group_labels(k), strategy[4:])) if trl else 0
            if pairs <= args.max_pairs:
                specs.append(BenchSpec(strategy=strategy, group_size=k, **shape))
    with bar(len(specs) * args.rounds) as progress:
        for spec in specs:
            rows.append(run_isolated(spec, timeout=args.timeout))
            progress.update()
            progress.write(_summary(rows[-1]), file=sys.stdout)
        for round_index in range(1, args.rounds):
            progress.write(f"timing round {round_index + 1} of {args.rounds}", file=sys.stdout)
            for spec, row in zip(specs, rows, strict=True):
                if "error" not in row:
                    add_timing_round(row, run_child(spec, {}, args.timeout))
                progress.update()
    out = Path(args.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "rows": rows, **({"max_k": max_k} if args.find_max_k else {})}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(rows, out.with_suffix(".png"))
    table = report(rows, command)
    if args.find_max_k:
        table += "".join(
            f"- largest K trained, {s}: {k} (doubling, up to {args.max_k})\n" for s, k in max_k.items()
        )
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0
