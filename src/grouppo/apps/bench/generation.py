"""``grouppo bench generation``: the throughput of grouppo's generator against plain ``model.generate``.

On one model and one set of IFEval-style prompts, in one run: the baseline is plain ``model.generate``
in float32, 16 sequences at a time, in the prompts' order; grouppo's ``TransformersGenerator`` runs with
its defaults (generation dtype chosen by the hardware, prompts sorted by length into batches of
``--batch_size``), and again with each of its choices undone, so that the table shows where the time
goes. Two workloads: greedy answers to ``--prompts`` prompts (evaluation) and ``--num_generations``
samples of each (training rollouts, temperature 1). Tokens counted: each sequence's completion up to
and including its EOS (what the caller gets), the same count for every row.

Beside the measurements, a bound for one decoding step at the generator's batch size, from quantities
measured on this machine in the same run: the time to read the model's weights once at the measured
memory bandwidth (a large copy), and the time of the step's matrix products at the measured matmul rate
(a square bfloat16/float32 matmul): decoding cannot step faster than the larger of the two.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import torch

from grouppo.apps.bench.spec import device_description, write_result
from grouppo.generation import left_padded

BASELINE_BATCH = 16


def _useful_tokens(completions: torch.Tensor, eos: set[int]) -> int:
    total = 0
    for row in completions.tolist():
        total += next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
    return total


def plain_generate(
    model: Any,
    rows: Sequence[list[int]],
    *,
    max_new_tokens: int,
    sample: bool,
    pad: int,
    eos: list[int],
    batch_size: int = BASELINE_BATCH,
) -> int:
    """Plain ``model.generate`` on ``rows`` in order, ``batch_size`` at a time; completion tokens made."""
    tokens = 0
    for start in range(0, len(rows), batch_size):
        ids, mask = left_padded(rows[start : start + batch_size], pad)
        kwargs = {"temperature": 1.0, "top_p": 1.0, "top_k": 0} if sample else {}
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
                do_sample=sample,
                **kwargs,
            )
        tokens += _useful_tokens(out[:, ids.shape[1] :], set(eos))
    return tokens


def memory_bandwidth_bytes_per_s(size_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """A large tensor copy (read + write), best of ``repeats``: bytes moved per second."""
    src = torch.empty(size_bytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * size_bytes / best


def matmul_flops_per_s(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """A square ``n x n`` matmul in ``dtype``, best of ``repeats``: FLOP per second."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def step_bound_s(
    model: Any, dtype: torch.dtype, batch: int, bandwidth: float, flops: float
) -> dict[str, float]:
    """The bound on one decoding step of ``batch`` sequences: weights read once, 2 FLOP per weight and
    sequence (attention over the cache left out: small at these lengths)."""
    params = sum(p.numel() for p in model.parameters())
    read = params * torch.finfo(dtype).bits / 8 / bandwidth
    compute = 2 * params * batch / flops
    return {"read_s": read, "compute_s": compute, "bound_s": max(read, compute)}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bench_prompt_ids(tokenizer: Any, prompts: int, seed: int = 0) -> list[list[int]]:
    """The benchmark's prompts, token ids each: ``prompts`` IFEval-style prompts of the evaluation split
    (``seed``), in the tokenizer's chat template. The decoding benchmarks in ``benchmarks/`` use them too."""
    from grouppo.embedded.instructions import make_if_prompts
    from grouppo.tokenize import chat_prompt, prompt_token_ids

    records = make_if_prompts(prompts, seed, split="eval")
    return [prompt_token_ids(chat_prompt(r["prompt"], tokenizer), tokenizer) for r in records]


def run(
    model_name: str | None = None,
    *,
    prompts: int = 16,
    num_generations: int = 4,
    batch_size: int = 64,
    max_new_tokens: int = 192,
    seed: int = 0,
) -> dict[str, Any]:
    """Every row of the benchmark (see the module docstring)."""
    from grouppo.generation import SamplingConfig, TransformersGenerator, generation_dtype
    from grouppo.models import load_model, load_tokenizer, resolve_model

    torch.manual_seed(seed)
    name = resolve_model(model_name)
    model, tokenizer = load_model(name, dtype=torch.float32).eval(), load_tokenizer(name)
    ids = bench_prompt_ids(tokenizer, prompts, seed)
    eos = TransformersGenerator(model, tokenizer).eos_token_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    auto = generation_dtype("auto", model)

    rows: list[dict[str, Any]] = []

    def measure(workload: str, what: str, fn: Any) -> None:
        start = time.perf_counter()
        tokens = fn()
        seconds = time.perf_counter() - start
        row = {
            "workload": workload,
            "generator": what,
            "tokens": tokens,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    workloads = (("greedy answers", 1, False), (f"{num_generations} samples each", num_generations, True))
    for workload, k, sample in workloads:
        expanded = [r for r in ids for _ in range(k)]
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            options = {"max_new_tokens": max_new_tokens, "sample": sample, "pad": pad, "eos": eos}
            label = f"plain generate, {_name(dtype)}, batch {BASELINE_BATCH}"
            measure(workload, label, lambda rows=expanded, kw=options: plain_generate(model, rows, **kw))
        model.to(torch.float32)
        for setting, size in (("float32", batch_size), ("auto", BASELINE_BATCH), ("auto", batch_size)):
            cfg = SamplingConfig(
                max_new_tokens=max_new_tokens,
                temperature=1.0 if sample else 0.0,
                batch_size=size,
                seed=seed,
                dtype=setting,
            )
            generator = TransformersGenerator(model, tokenizer, cfg)

            def go(generator: Any = generator, k: int = k) -> int:
                generator.generate_from_ids(ids, k)
                return generator.last_num_tokens

            measure(workload, f"grouppo, {_name(generation_dtype(setting, model))}, batch {size}", go)

    bandwidth = memory_bandwidth_bytes_per_s()
    flops = {_name(d): matmul_flops_per_s(d) for d in (torch.float32, auto)}
    bounds = {
        f"{_name(d)}, batch {b}": step_bound_s(model, d, b, bandwidth, flops[_name(d)])
        for d, b in ((torch.float32, BASELINE_BATCH), (auto, batch_size))
    }
    return {
        "model": name,
        "machine": device_description(),
        "prompts": prompts,
        "num_generations": num_generations,
        "max_new_tokens": max_new_tokens,
        "generation_dtype_auto": _name(auto),
        "rows": rows,
        "measured": {
            "copy_bandwidth_GB_per_s": round(bandwidth / 1e9, 1),
            "matmul_GFLOP_per_s": {k: round(v / 1e9, 1) for k, v in flops.items()},
        },
        "step_bounds": {k: {n: round(v * 1000, 1) for n, v in b.items()} for k, b in bounds.items()},
    }


def markdown(result: dict[str, Any]) -> str:
    """The README table: tokens/s per generator and workload, and the ratio to the plain baseline."""
    lines = [
        "| workload | generator | tokens | s | tokens/s | vs plain float32 batch 16 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    base = {
        r["workload"]: r["tokens_per_s"]
        for r in result["rows"]
        if r["generator"].startswith("plain generate, float32")
    }
    for r in result["rows"]:
        ratio = r["tokens_per_s"] / base[r["workload"]]
        lines.append(
            f"| {r['workload']} | {r['generator']} | {r['tokens']} | {r['seconds']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {ratio:.2f}x |"
        )
    m = result["measured"]
    lines.append("")
    rates = ", ".join(f"{k} {v} GFLOP/s" for k, v in m["matmul_GFLOP_per_s"].items())
    lines.append(
        f"Measured in the same run: copy bandwidth {m['copy_bandwidth_GB_per_s']} GB/s, matmul {rates}."
    )
    for key, b in result["step_bounds"].items():
        lines.append(
            f"Bound on one decoding step ({key}): weights read {b['read_s']} ms, matrix "
            f"products {b['compute_s']} ms: at least {b['bound_s']} ms a step."
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``grouppo bench generation``'s options."""
    parser.add_argument(
        "--model_name_or_path", default=None, help="Hub name or local path (default: the embedded model)"
    )
    parser.add_argument(
        "--output_dir", default="benchmarks/results/generation", help="writes OUTPUT_DIR.json and .md"
    )
    parser.add_argument("--prompts", type=int, default=16, help="IFEval-style prompts (split eval)")
    parser.add_argument("--num_generations", type=int, default=4, help="samples per prompt (second workload)")
    parser.add_argument("--batch_size", type=int, default=64, help="grouppo's sequences per generate call")
    parser.add_argument("--max_new_tokens", type=int, default=192, help="tokens per completion, at most")
    parser.add_argument("--seed", type=int, default=0, help="prompts and sampling")


def run_command(args: argparse.Namespace, command: str) -> int:
    result = run(
        args.model_name_or_path,
        prompts=args.prompts,
        num_generations=args.num_generations,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    write_result(result, markdown(result), command, args.output_dir)
    return 0
