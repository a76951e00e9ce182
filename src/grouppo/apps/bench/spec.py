"""What every ``grouppo bench`` measurement shares: the run's shape (``BenchSpec``), its random model and
groups, the memory probes, running one measurement in a fresh process, the shape options and writing a
result beside the command and the machine."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from grouppo.embedded.synthetic import random_groups

# Peak dense bf16 tensor FLOP/s by device name (vendor data sheets, SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# On CPU, memory runs set this: glibc then serves every allocation above 128 KiB (all activations) with
# its own mmap and returns it to the OS on free. With glibc's default dynamic threshold, freed activation
# memory stays in the heap arenas, fragmentation inflates the resident set, and the high-water mark
# ``ru_maxrss`` no longer reflects what the code keeps alive.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
MIB = 2**20

# The memory-growth target of the decoupled backward: a step at K=32 needs at most 1.15x the memory of
# a step at K=2. Why: the decoupled backward keeps one chunk of responses' activations alive at a time,
# so what a step holds should not depend on K apart from a few small per-response terms (token ids, one
# log-prob per response, the loss's pair terms), which the 15% leaves room for, with allocator noise.
# The coupled backward keeps every response's activations until the loss is known: it grows linearly.
GROWTH_TARGET = 1.15


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


def spec_row(spec: BenchSpec) -> dict[str, Any]:
    return {
        "strategy": spec.strategy,
        "group_size": spec.group_size,
        "chunk_size": spec.chunk_size,
        "prompt_len": spec.prompt_len,
        "response_len": spec.response_len,
        "vocab_size": spec.vocab,
        "logits_chunk_size": None if spec.strategy.startswith("trl:") else spec.logits_chunk_size,
    }


def run_child(
    spec: BenchSpec, env: dict[str, str], timeout: float | None, kind: str = "train_step"
) -> dict[str, Any]:
    env = {**{k: v for k, v in os.environ.items() if k not in MEMORY_ENV}, **env}
    cmd = [sys.executable, "-m", "grouppo.apps.bench.child", kind, json.dumps(asdict(spec))]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec_row(spec), "error": f"timeout after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**spec_row(spec), "error": " | ".join(tail)}
    return json.loads(lines[-1])


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


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per BenchSpec field that is not the strategy or K (model, data, measurement)."""
    for name, default in asdict(BenchSpec()).items():
        if name not in _NOT_SHAPE:
            parser.add_argument(
                f"--{name}", type=type(default), default=default, help=SHAPE_HELP.get(name, name)
            )


def shape_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The BenchSpec fields set by ``add_shape_arguments``."""
    return {name: getattr(args, name) for name in asdict(BenchSpec()) if name not in _NOT_SHAPE}


def device_description() -> str:
    """The machine a row was measured on, in words."""
    import torch

    if torch.cuda.is_available():
        return f"gpu ({torch.cuda.get_device_name()}, torch {torch.__version__})"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"cpu ({name}, {os.cpu_count()} cores, torch {torch.__version__} with {threads} threads)"


def write_result(result: dict[str, Any], table: str, command: str, out: str | Path) -> None:
    """Print ``table``; write ``result`` (with ``command``) to OUT.json and the table under the command
    and the machine to OUT.md."""
    result["command"] = command
    print(table)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    header = f"`{command}` on {result['machine']}"
    out.with_suffix(".md").write_text(f"{header}\n\n{table}\n", encoding="utf-8")
