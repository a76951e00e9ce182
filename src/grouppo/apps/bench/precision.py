"""``grouppo bench precision``: a GroupDPO training step in float32 against bfloat16 autocast.

On one model, in one run: the same training groups (IFEval-style prompts with K responses of the main
job's lengths, 2 groups per step, all pairs, NLL on positives, reference precomputed) trained for
``--steps`` steps by ``GroupDPOTrainer`` twice, with ``bf16=False`` and ``bf16=True``. Under ``bf16`` the
weights, gradients and optimizer state stay float32 (autocast only changes the dtype of the matrix
products) and grouppo keeps the LM head and the log-softmax in float32. The median step time (the first
step left out: it warms up the allocator and the kernels) and the ratio go in the table.

Beside the time, what bfloat16 costs in accuracy, measured on the same batch: the mean and largest
absolute difference of the per-response summed log-probs from float32's, and between two bfloat16
passes over the same responses batched differently (which is what separates a precomputed reference
from the policy at step 0, where they should agree).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from grouppo.apps.bench.spec import device_description, write_result

WORDS = (
    "the model answers each instruction with care and gives a short list of points about the topic"
).split()


def _groups(prompts: int, k: int, seed: int) -> list[dict[str, Any]]:
    from grouppo.embedded.instructions import make_if_prompts

    rng = random.Random(seed)
    records = []
    for p in make_if_prompts(prompts, seed, split="train"):
        responses = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 140))) for _ in range(k)]
        scores = [1.0 - i / (k - 1) for i in range(k)]
        records.append({"prompt": p["prompt"], "responses": responses, "scores": scores})
    return records


def _time_steps(name: str, records: list[dict[str, Any]], bf16: bool, steps: int, out: Path) -> list[float]:
    from transformers import TrainerCallback

    from grouppo.groupdpo import GroupDPOConfig, GroupDPOTrainer
    from grouppo.models import load_model, load_tokenizer

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter() - self.start)

    clock = Clock()
    args = GroupDPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=2,
        max_steps=steps + 1,
        learning_rate=2e-5,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        precompute_ref_logps=True,
        ref_logps_cache=False,
        response_chunk_size=2,
        max_length=512,
        nll_weight=0.2,
        use_cpu=not torch.cuda.is_available(),
        bf16=bf16,
        disable_tqdm=True,
        seed=0,
    )
    torch.manual_seed(0)
    trainer = GroupDPOTrainer(
        load_model(name, dtype=torch.float32),
        args=args,
        train_dataset=records,
        processing_class=load_tokenizer(name),
        callbacks=[clock],
    )
    trainer.train()
    return clock.times[1:]


def logp_errors(name: str, records: list[dict[str, Any]]) -> dict[str, float]:
    """Differences of per-response summed log-probs: bfloat16 autocast against float32 on one batch, and
    two bfloat16 passes over the same responses in different batches (2 groups, then 4 groups)."""
    from grouppo.collate import GroupCollator
    from grouppo.decoupled import group_logps
    from grouppo.models import load_model, load_tokenizer
    from grouppo.tokenize import tokenize_group

    model, tokenizer = load_model(name, dtype=torch.float32).eval(), load_tokenizer(name)
    labelled = [{**r, "labels": [int(s >= 0.5) for s in r["scores"]]} for r in records[:4]]
    features = [tokenize_group(r, tokenizer, max_length=512) for r in labelled]
    collate = GroupCollator(pad_token_id=tokenizer.pad_token_id)
    small, large = collate(features[:2]), collate(features)

    def score(batch: dict[str, torch.Tensor], bf16: bool, chunk: int) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(model.device.type, torch.bfloat16, enabled=bf16):
            return group_logps(model, batch, response_chunk_size=chunk).double()

    full = score(small, False, 2)
    half = score(small, True, 2)
    rows = full.numel()
    other = score(large, True, 8)[:rows]
    return {
        "bf16_vs_fp32_mean": float((half - full).abs().mean()),
        "bf16_vs_fp32_max": float((half - full).abs().max()),
        "bf16_rebatched_mean": float((half - other).abs().mean()),
        "bf16_rebatched_max": float((half - other).abs().max()),
        "response_tokens_mean": float(small["response_mask"].sum(-1).float().mean()),
    }


def run(
    model_name: str | None = None,
    *,
    steps: int = 5,
    k: int = 4,
    seed: int = 0,
    out: Path = Path("/tmp/grouppo-bench-precision"),
) -> dict[str, Any]:
    """Both step timings and the log-prob differences (see the module docstring)."""
    from grouppo.models import resolve_model

    name = resolve_model(model_name)
    records = _groups(2 * (steps + 1), k, seed)
    rows = []
    for label, bf16 in (("float32", False), ("bfloat16 autocast", True)):
        times = _time_steps(name, records, bf16, steps, out)
        row = {
            "precision": label,
            "steps": len(times),
            "median_step_s": round(statistics.median(times), 2),
            "step_s": [round(t, 2) for t in times],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {
        "model": name,
        "machine": device_description(),
        "groups_per_step": 2,
        "k": k,
        "rows": rows,
        "logp_differences": {key: round(v, 3) for key, v in logp_errors(name, records).items()},
    }


def markdown(result: dict[str, Any]) -> str:
    """The table: median step time per precision and the ratio to float32, then the log-prob costs."""
    base = result["rows"][0]["median_step_s"]
    lines = ["| precision | steps timed | median s/step | speed vs float32 |", "|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['precision']} | {r['steps']} | {r['median_step_s']:.2f} | "
            f"{base / r['median_step_s']:.2f}x |"
        )
    d = result["logp_differences"]
    lines += [
        "",
        f"Summed log-prob of a response (mean {d['response_tokens_mean']:.0f} tokens), bfloat16 "
        f"autocast minus float32: mean |diff| {d['bf16_vs_fp32_mean']:.3f}, max "
        f"{d['bf16_vs_fp32_max']:.3f} nats; two bfloat16 passes batched differently: mean "
        f"{d['bf16_rebatched_mean']:.3f}, max {d['bf16_rebatched_max']:.3f} nats.",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``grouppo bench precision``'s options."""
    parser.add_argument(
        "--model_name_or_path", default=None, help="Hub name or local path (default: the embedded model)"
    )
    parser.add_argument(
        "--output_dir", default="benchmarks/results/precision_cpu", help="writes OUTPUT_DIR.json and .md"
    )
    parser.add_argument("--steps", type=int, default=5, help="steps timed per precision (after one warm-up)")
    parser.add_argument("--k", type=int, default=4, help="responses per group")
    parser.add_argument("--seed", type=int, default=0)


def run_command(args: argparse.Namespace, command: str) -> int:
    result = run(args.model_name_or_path, steps=args.steps, k=args.k, seed=args.seed)
    write_result(result, markdown(result), command, args.output_dir)
    return 0
