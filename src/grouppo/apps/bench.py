"""``grouppo bench``: one training step per strategy, side by side, on the same model and groups.

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

``--memory_growth`` measures something narrower, for ``coupled`` and ``decoupled:C`` only: the memory
that one forward + loss + backward of grouppo adds (no trainer, no optimizer step; see
``run_backward_memory``), each (strategy, K) in a fresh subprocess under the same memory setting, and
reports its growth from the smallest to the largest K against ``GROWTH_TARGET``.
``benchmarks/memory.py`` is a front end to this mode with its own defaults and file names.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from grouppo.apps.bench_generation import device_description

# Peak dense bf16 tensor FLOP/s by device name (vendor data sheets, SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# The memory-growth target of the decoupled backward: a step at K=32 needs at most 1.15x the memory of
# a step at K=2. Why: the decoupled backward keeps one chunk of responses' activations alive at a time,
# so what a step holds should not depend on K apart from a few small per-response terms (token ids, one
# log-prob per response, the loss's pair terms), which the 15% leaves room for, with allocator noise.
# The coupled backward keeps every response's activations until the loss is known: it grows linearly.
GROWTH_TARGET = 1.15

# On CPU, memory runs set this: glibc then serves every allocation above 128 KiB (all activations) with
# its own mmap and returns it to the OS on free. With glibc's default dynamic threshold, freed activation
# memory stays in the heap arenas, fragmentation inflates the resident set, and the high-water mark
# ``ru_maxrss`` no longer reflects what the code keeps alive.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
MIB = 2**20


@dataclass
class BenchSpec:
    """One benchmark run: model shape, data shape, strategy and measurement settings."""

    strategy: str = "decoupled:2"
    group_size: int = 8
    groups: int = 1
    prompt_len: int = 128
    response_len: int = 128
    hidden: int = 512
    intermediate: int = 1408
    layers: int = 8
    heads: int = 8
    kv_heads: int = 8
    vocab: int = 32000
    dtype: str = "float32"
    logits_chunk_size: int = 512  # grouppo's token chunk for the LM head; a huge value = full logits
    steps: int = 3
    warmup: int = 1
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def chunk_size(self) -> int | None:
        return int(self.strategy.split(":")[1]) if self.strategy.startswith("decoupled:") else None


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_memory_bytes() -> int:
    """High-water mark: GPU ``max_memory_allocated``, else the process's ``ru_maxrss``."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def current_memory_bytes() -> int:
    """Memory held now: GPU ``memory_allocated``, else the resident set (``VmRSS``; 0 where unknown)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    rss = [line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")]
    return int(rss[0]) * 1024 if rss else 0


def build_model(spec: BenchSpec) -> Any:
    """A random-init Llama of the spec's shape, on the bench device, in the spec's dtype."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=max(2048, spec.prompt_len + spec.response_len),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config).to(device=_device(), dtype=getattr(torch, spec.dtype)).train()


def group_labels(k: int) -> list[int]:
    """The benchmark's labels for a group of ``k``: the first half positive."""
    return [1] * (k // 2) + [0] * (k - k // 2)


def random_groups(
    sizes: Sequence[int],
    positives: Sequence[int],
    *,
    seed: int = 0,
    prompt_lens: Sequence[int] | None = None,
    response_len: int | None = None,
    max_response: int = 6,
    vocab: int = 300,
    random_scores: bool = True,
    ref_logps: bool = False,
) -> list[dict[str, Any]]:
    """Tokenized groups of random token ids, from 3 up (never pad, bos or eos: every position is real).

    Group ``g`` has ``sizes[g]`` responses, the first ``positives[g]`` labelled positive, and a prompt of
    ``prompt_lens[g]`` tokens (default ``3 + g``). Every response has ``response_len`` tokens or, without
    it, a random length from 1 to ``max_response``. Scores are uniform random (``random_scores``) or the
    labels. With ``ref_logps`` each group carries reference log-probs as a real run would precompute
    them: about ``-log(vocab)`` per token, plus standard normal noise.

    One generator seeded with ``seed`` draws, group by group: the prompt, each response (its length when
    random, then its ids), the scores when random, the reference log-probs. The benchmarks' recorded
    results and the tests' exact values depend on this order.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    per_token = float(torch.log(torch.tensor(float(vocab))))
    groups = []
    for g, (k, p) in enumerate(zip(sizes, positives, strict=True)):
        prompt = torch.randint(3, vocab, (prompt_lens[g] if prompt_lens else 3 + g,), generator=gen)
        responses = []
        for _ in range(k):
            n = (
                response_len
                if response_len is not None
                else int(torch.randint(1, max_response + 1, (1,), generator=gen))
            )
            responses.append(torch.randint(3, vocab, (n,), generator=gen).tolist())
        labels = [1] * p + [0] * (k - p)
        group = {
            "prompt_ids": prompt.tolist(),
            "response_ids": responses,
            "labels": labels,
            "scores": torch.rand(k, generator=gen).tolist() if random_scores else [float(x) for x in labels],
        }
        if ref_logps:
            typical = torch.tensor([-len(r) * per_token for r in responses])
            group["ref_logps"] = (typical + torch.randn(k, generator=gen)).tolist()
        groups.append(group)
    return groups


def build_groups(spec: BenchSpec) -> list[dict[str, Any]]:
    """The spec's groups (``random_groups``): K responses of ``response_len`` tokens, the top half
    positive, scores equal to the labels, with reference log-probs."""
    k, n = spec.group_size, spec.groups
    return random_groups(
        [k] * n,
        [sum(group_labels(k))] * n,
        seed=spec.seed + 1,
        prompt_lens=[spec.prompt_len] * n,
        response_len=spec.response_len,
        vocab=spec.vocab,
        random_scores=False,
        ref_logps=True,
    )


def pair_indices(labels: list[int], mode: str) -> list[tuple[int, int]]:
    """(chosen, rejected) indices: ``best_vs_rest`` (the first positive vs every other response, K - 1
    pairs) or ``all_pairs`` (every positive vs every negative, P x N pairs)."""
    pos = [i for i, label in enumerate(labels) if label == 1]
    neg = [i for i, label in enumerate(labels) if label == 0]
    if mode == "best_vs_rest":
        return [(pos[0], j) for j in range(len(labels)) if j != pos[0]]
    if mode == "all_pairs":
        return [(i, j) for i in pos for j in neg]
    raise ValueError(f"unknown pair decomposition {mode!r}")


def to_pairs(groups: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """TRL preference examples from groups, decomposed by ``pair_indices``."""
    return [
        {
            "prompt_ids": g["prompt_ids"],
            "chosen_ids": g["response_ids"][i],
            "rejected_ids": g["response_ids"][j],
            "ref_chosen_logps": g["ref_logps"][i],
            "ref_rejected_logps": g["ref_logps"][j],
        }
        for g in groups
        for i, j in pair_indices(g["labels"], mode)
    ]


def _trainer_and_batch(
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
    trainer, batch = _trainer_and_batch(spec, model, groups, out)
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
        **_spec_row(spec),
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

    memory = _run_child(spec, MEMORY_ENV, timeout)
    if torch.cuda.is_available() or "error" in memory:
        return memory
    timing = _run_child(spec, {}, timeout)
    if "error" in timing:
        return timing
    keep = ("peak_mem_bytes", "static_mem_bytes")
    return {**timing, **{k: memory[k] for k in keep}, "step_time_in_memory_run_s": memory["step_time_s"]}


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
        FlatGroupBatch(logps, batch["ref_logps"], batch["response_mask"].sum(-1), batch["labels"],
                       batch["scores"], batch["group_index"], batch["slot"]),
        beta=0.1,
        loss_type="all_pairs",
    )  # fmt: skip
    loss.backward()
    peak = peak_memory_bytes()  # synchronizes a GPU
    step_time = time.perf_counter() - start
    config = model.config
    return {
        **_spec_row(spec),
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
    return _run_child(spec, MEMORY_ENV, timeout, kind="backward")


# What a child process runs: ``--child-kind`` names one of these.
CHILDREN = {"train_step": run_one, "backward": run_backward_memory}


def _run_child(
    spec: BenchSpec, env: dict[str, str], timeout: float | None, kind: str = "train_step"
) -> dict[str, Any]:
    env = {**{k: v for k, v in os.environ.items() if k not in MEMORY_ENV}, **env}
    cmd = [
        sys.executable,
        "-m",
        "grouppo.apps.bench",
        "--child",
        json.dumps(asdict(spec)),
        "--child-kind",
        kind,
    ]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**_spec_row(spec), "error": f"timeout after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**_spec_row(spec), "error": " | ".join(tail)}
    return json.loads(lines[-1])


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


def _spec_row(spec: BenchSpec) -> dict[str, Any]:
    return {
        "strategy": spec.strategy,
        "group_size": spec.group_size,
        "chunk_size": spec.chunk_size,
        "prompt_len": spec.prompt_len,
        "response_len": spec.response_len,
        "vocab_size": spec.vocab,
        "logits_chunk_size": None if spec.strategy.startswith("trl:") else spec.logits_chunk_size,
    }


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
        + ". They are memory-run timings, not throughput numbers: `grouppo bench` without "
        "`--memory-growth` times steps for that."
        + ("" if wall_s is None else f" Total wall time {wall_s:.0f} s."),
        "",
        "Command (from the repository root):",
        "",
        f"    {command}",
        "",
    ]
    return "\n".join(lines)


_NOT_SHAPE = ("strategy", "group_size", "extra")
SHAPE_HELP = {
    "groups": "groups per step",
    "prompt_len": "prompt tokens",
    "response_len": "tokens per response",
    "hidden": "model hidden size",
    "intermediate": "MLP size",
    "layers": "decoder layers",
    "heads": "attention heads",
    "kv_heads": "key/value heads",
    "vocab": "vocabulary size",
    "dtype": "float32, bfloat16 or float16",
    "logits_chunk_size": "grouppo's LM-head token chunk (a huge value: full logits)",
    "steps": "timed steps (the median is reported)",
    "warmup": "untimed steps first",
    "seed": "random seed of the model and the data",
}


def _flags(name: str) -> list[str]:
    """``--name`` (underscores, as every grouppo command), and ``--name-with-dashes`` as an alias."""
    return list(dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"]))


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per BenchSpec field that is not the strategy or K (model, data, measurement)."""
    for name, default in asdict(BenchSpec()).items():
        if name not in _NOT_SHAPE:
            parser.add_argument(
                *_flags(name), dest=name, type=type(default), default=default, help=SHAPE_HELP.get(name, name)
            )


def shape_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The BenchSpec fields set by ``add_shape_arguments``."""
    return {name: getattr(args, name) for name in asdict(BenchSpec()) if name not in _NOT_SHAPE}


def build_parser() -> argparse.ArgumentParser:
    """``grouppo bench``'s options: underscores, each also spelled with dashes (``--group-sizes``)."""
    parser = argparse.ArgumentParser(
        prog="grouppo bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--generation", action="store_true",
        help="instead of training steps: generation throughput, grouppo's generator against plain "
        "model.generate (grouppo bench --generation --help for its options)",
    )  # fmt: skip
    parser.add_argument(
        "--precision", action="store_true",
        help="instead of the strategies: a training step in float32 against bfloat16 autocast, and "
        "what bfloat16 costs in log-prob accuracy (grouppo bench --precision --help for its options)",
    )  # fmt: skip
    parser.add_argument(
        *_flags("child_kind"), dest="child_kind", choices=sorted(CHILDREN), default="train_step",
        help=argparse.SUPPRESS,
    )  # fmt: skip
    parser.add_argument(
        "--strategies",
        nargs="+",
        help="coupled, decoupled:C, trl:best_vs_rest, trl:all_pairs; default: coupled decoupled:2 "
        "trl:best_vs_rest trl:all_pairs (--memory_growth: coupled decoupled:2)",
    )
    parser.add_argument(
        *_flags("group_sizes"), dest="group_sizes", nargs="+", type=int, default=[2, 8, 32],
        help="group sizes K",
    )  # fmt: skip
    parser.add_argument(
        *_flags("max_pairs"), dest="max_pairs", type=int, default=64,
        help="skip TRL runs with more pairs per step than this",
    )  # fmt: skip
    parser.add_argument(
        "--output_dir",
        "--out",
        dest="output_dir",
        help="writes OUTPUT_DIR.json, .md and .png (--memory_growth: .json and .md); default "
        "benchmarks/results/bench (--memory_growth: benchmarks/results/memory)",
    )
    parser.add_argument(
        *_flags("memory_growth"),
        dest="memory_growth",
        action="store_true",
        help="instead of training steps: the memory one forward + loss + backward adds, per K, coupled "
        f"against decoupled:C, and its growth over K against the {GROWTH_TARGET}x target",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument(
        *_flags("find_max_k"),
        dest="find_max_k",
        action="store_true",
        help="per strategy, double K from the first --group_sizes value until a run fails (out of memory)",
    )
    parser.add_argument(*_flags("max_k"), dest="max_k", type=int, default=1024,
                        help="upper bound of --find_max_k")  # fmt: skip
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time every run this many times, round-robin over all runs, and report the median: on a "
        "shared machine the load drifts, and alternating keeps it from favouring one strategy",
    )
    parser.add_argument(*_flags("disable_tqdm"), dest="disable_tqdm", action="store_true",
                        help="no progress bar")  # fmt: skip
    add_shape_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--generation" in argv:
        from grouppo.apps.bench_generation import main as generation_main

        return generation_main([a for a in argv if a != "--generation"])
    if "--precision" in argv:
        from grouppo.apps.bench_training import main as precision_main

        return precision_main([a for a in argv if a != "--precision"])
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child_kind](BenchSpec(**json.loads(args.child)))), flush=True)
        return 0
    shape = shape_from_args(args)
    command = "grouppo bench " + " ".join(argv)

    def bar(total: int | None) -> Any:  # runs done, rate and ETA on stderr; results on stdout above it
        return tqdm(total=total, desc="bench", unit="run", disable=args.disable_tqdm or total == 0)

    if args.memory_growth:
        strategies = args.strategies or ["coupled", "decoupled:2"]
        if args.find_max_k or args.rounds != 1:
            parser.error("--memory_growth takes neither --find_max_k nor --rounds")
        if "coupled" not in strategies or any(
            s != "coupled" and BenchSpec(strategy=s).chunk_size is None for s in strategies
        ):
            parser.error(
                "--memory_growth compares coupled with decoupled:C: --strategies coupled decoupled:C ..."
            )
        out = Path(args.output_dir or "benchmarks/results/memory")
        start = time.perf_counter()
        rows = []
        with bar(len(args.group_sizes) * len(strategies)) as progress:
            for k in args.group_sizes:
                for strategy in strategies:
                    spec = BenchSpec(strategy=strategy, group_size=k, **shape)
                    rows.append(measure_step_memory(spec, args.timeout))
                    progress.update()
                    progress.write(_memory_summary(rows[-1]), file=sys.stdout)
        table = memory_growth_report(rows, command, time.perf_counter() - start)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(table)
        print(table)
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
        return 0
    args.strategies = args.strategies or ["coupled", "decoupled:2", "trl:best_vs_rest", "trl:all_pairs"]
    rows, max_k = [], {}
    if args.find_max_k:
        with bar(None) as progress:
            for strategy in args.strategies:
                k, max_k[strategy] = args.group_sizes[0], None
                while k <= args.max_k:
                    spec = BenchSpec(strategy=strategy, group_size=k, **shape)
                    row = run_isolated(spec, timeout=args.timeout)
                    rows.append(row)
                    progress.update()
                    progress.write(_summary(row), file=sys.stdout)
                    if "error" in row:
                        break
                    max_k[strategy], k = k, 2 * k
    specs = []
    for k in [] if args.find_max_k else args.group_sizes:
        for strategy in args.strategies:
            pairs = (
                args.groups * len(pair_indices(group_labels(k), strategy[4:]))
                if strategy[:4] == "trl:"
                else 0
            )
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
                    add_timing_round(row, _run_child(spec, {}, args.timeout))
                progress.update()
    out = Path(args.output_dir or "benchmarks/results/bench")
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


def _memory_summary(row: dict[str, Any]) -> str:
    head = f"K={row['group_size']:<3} {row['strategy']:<14}"
    if "error" in row:
        return f"{head} failed: {row['error'][:200]}"
    return (
        f"{head} baseline {row['baseline_mem_bytes'] / MIB:7.0f} MiB"
        f"  peak {row['peak_mem_bytes'] / MIB:7.0f} MiB"
        f"  step +{row['step_increment_bytes'] / MIB:7.0f} MiB  {row['step_time_s']:6.1f} s"
    )


def _summary(row: dict[str, Any]) -> str:
    head = f"K={row['group_size']:<3} {row['strategy']:<18}"
    if "error" in row:
        return f"{head} failed: {row['error'][:200]}"
    return (
        f"{head} peak {row['peak_mem_bytes'] / 2**20:8.0f} MiB  step {row['step_time_s']:7.2f} s  "
        f"{row['tokens_per_s']:9.0f} tok/s" + (f"  MFU {row['mfu']:.1%}" if row["mfu"] else "")
    )


if __name__ == "__main__":
    sys.exit(main())
