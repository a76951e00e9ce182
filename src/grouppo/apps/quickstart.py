"""The main job: improve the embedded model's instruction following with GroupDPO, measured before/after.

``grouppo quickstart`` (``make run``) evaluates the model on held-out IFEval-style prompts and on IFBench
test prompts, trains it with GroupDPO on groups of K self-sampled responses scored by the official
IFEval checkers (``all_pairs`` loss, NLL on positives, decoupled backward), evaluates again, and writes a
run directory: ``metrics.json``, ``summary.md`` (the before/after table), ``groups.jsonl`` (offline),
``model/``, ``eval/`` (generations) and ``plots.png`` (reward and loss curves, before/after accuracy).

The defaults fit about 15 minutes on a 2-core CPU, so they are small: see docs/experiments.md for the longer
configuration behind the headline result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grouppo.apps.evaluate import benchmark_prompts, evaluate_instruction_following
from grouppo.data import write_jsonl
from grouppo.embedded.instructions import make_if_prompts
from grouppo.embedded.models import load_model, load_tokenizer, resolve_model
from grouppo.online.generation import SamplingConfig, TransformersGenerator
from grouppo.online.rewards import load_rewards
from grouppo.online.rollout import RolloutStats, rollout_dataset

logger = logging.getLogger(__name__)

METRICS = ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict", "instruction_level_loose")


@dataclass
class QuickstartConfig:
    """Every knob of the main job; the defaults are the README's main command."""

    out: str = "runs/quickstart"
    model: str | None = None
    mode: str = "offline"
    seed: int = 0
    train_prompts: int = 40
    eval_prompts: int = 32
    ifbench_prompts: int = 32
    num_generations: int = 4
    max_new_tokens: int = 128
    eval_max_new_tokens: int = 192
    temperature: float = 1.0
    generation_batch_size: int = 32
    reward: str = "ifeval"
    loss_type: str = "all_pairs"
    positive_rule: str = "top_bottom"
    beta: float = 0.1
    nll_weight: float = 0.2
    learning_rate: float = 2e-5
    epochs: float = 1.0
    batch_size: int = 2
    response_chunk_size: int = 2
    max_length: int = 512


def evaluate_benchmarks(
    model: Any, tokenizer: Any, cfg: QuickstartConfig, tag: str, out: Path
) -> dict[str, dict[str, Any]]:
    """Greedy answers to ``cfg.eval_prompts`` held-out IFEval-style prompts and ``cfg.ifbench_prompts``
    IFBench test prompts, checked; writes ``out/eval/{tag}_{benchmark}.jsonl``, returns the metrics."""
    sampling = SamplingConfig(
        max_new_tokens=cfg.eval_max_new_tokens, temperature=0.0, batch_size=cfg.generation_batch_size
    )
    generator = TransformersGenerator(model, tokenizer, sampling)
    results = {}
    for benchmark, n in (("ifeval", cfg.eval_prompts), ("ifbench", cfg.ifbench_prompts)):
        if n <= 0:
            continue
        start = time.perf_counter()
        records = benchmark_prompts(benchmark, n=n, limit=n)
        metrics, generations = evaluate_instruction_following(generator, tokenizer, records, benchmark)
        write_jsonl(generations, out / "eval" / f"{tag}_{benchmark}.jsonl")
        results[benchmark] = metrics
        print(
            f"[{tag}] {benchmark}: {metrics['num_prompts']} prompts, prompt-level strict "
            f"{metrics['prompt_level_strict']:.3f}, loose {metrics['prompt_level_loose']:.3f} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    return results


def sample_groups(
    model: Any, tokenizer: Any, cfg: QuickstartConfig, prompts: list[dict[str, Any]], num_generations: int
) -> tuple[list[dict[str, Any]], RolloutStats]:
    """``num_generations`` sampled responses per prompt record, scored with ``cfg.reward``, as groups."""
    sampling = SamplingConfig(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        batch_size=cfg.generation_batch_size,
        seed=cfg.seed,
    )
    return rollout_dataset(
        TransformersGenerator(model, tokenizer, sampling), load_rewards([cfg.reward]), prompts,
        num_generations, tokenizer, prompts_per_call=max(1, cfg.generation_batch_size // num_generations),
    )  # fmt: skip


def train_config(cfg: QuickstartConfig, out: Path, online: bool) -> Any:
    """The GroupDPOConfig (offline, reference precomputed) or OnlineGroupDPOConfig that ``cfg`` describes."""
    from grouppo.online.trainer import OnlineGroupDPOConfig
    from grouppo.trainer import GroupDPOConfig

    common = dict(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        nll_weight=cfg.nll_weight,
        positive_rule=cfg.positive_rule,
        skip_invalid_groups=True,
        response_chunk_size=cfg.response_chunk_size,
        max_length=cfg.max_length,
        use_cpu=not torch.cuda.is_available(),
    )
    if not online:
        return GroupDPOConfig(precompute_ref_logps=True, ref_logps_cache=False, **common)
    return OnlineGroupDPOConfig(
        num_generations=cfg.num_generations,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        generation_batch_size=cfg.generation_batch_size,
        **common,
    )


def _plot(history: list[dict[str, Any]], before: dict, after: dict, path: Path, sampled: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [h for h in history if "loss" in h]
    online = [h for h in steps if "reward/mean" in h]
    if online:
        axes[0].plot([h["step"] for h in online], [h["reward/mean"] for h in online], marker="o")
        axes[0].set_title("mean IFEval reward of the sampled responses")
    else:
        axes[0].hist(sampled, bins=11, range=(0, 1))
        axes[0].set_title("IFEval reward of the sampled training responses")
        axes[0].set_xlabel("fraction of instructions satisfied")
    axes[0].set_xlabel(axes[0].get_xlabel() or "step")
    for key, label in (("loss", "loss"), ("rewards/margins", "reward margin"), ("nll", "NLL on positives")):
        if any(key in h for h in steps):
            axes[1].plot(
                [h["step"] for h in steps if key in h], [h[key] for h in steps if key in h], label=label
            )
    axes[1].set_title("training curves")
    axes[1].set_xlabel("step")
    axes[1].legend()
    names = [f"{b} {m.replace('_level_', ' ')}" for b in before for m in METRICS]
    x = range(len(names))
    axes[2].bar([i - 0.2 for i in x], [before[b][m] for b in before for m in METRICS], 0.4, label="before")
    axes[2].bar([i + 0.2 for i in x], [after[b][m] for b in after for m in METRICS], 0.4, label="after")
    axes[2].set_xticks(list(x), names, fontsize=7, rotation=30, ha="right")
    axes[2].set_title("accuracy before / after")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(before: dict[str, dict], after: dict[str, dict]) -> str:
    """A markdown table of every metric before and after, per benchmark."""
    lines = ["| benchmark | metric | before | after | change |", "|---|---|---:|---:|---:|"]
    for benchmark in before:
        for metric in METRICS:
            b, a = before[benchmark][metric], after[benchmark][metric]
            lines.append(f"| {benchmark} | {metric} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
        lines.append(
            f"| {benchmark} | prompts (unscored instructions) | {before[benchmark]['num_prompts']} "
            f"({before[benchmark]['unscored_instructions']}) | | |"
        )
    return "\n".join(lines)


def run_quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    """Evaluate, train, evaluate; returns and writes the metrics (see the module docstring)."""
    from grouppo.online.trainer import OnlineGroupDPOTrainer
    from grouppo.trainer import GroupDPOTrainer

    if cfg.mode not in ("offline", "online"):
        raise ValueError(f"mode must be offline or online, got {cfg.mode!r}")
    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    name = resolve_model(cfg.model)
    model, tokenizer = load_model(name, dtype=torch.float32), load_tokenizer(name)
    before = evaluate_benchmarks(model, tokenizer, cfg, "before", out)

    prompts = make_if_prompts(cfg.train_prompts, cfg.seed, split="train")
    write_jsonl(prompts, out / "train_prompts.jsonl")
    online = cfg.mode == "online"
    args = train_config(cfg, out, online)
    sampled: list[float] = []
    if online:
        trainer = OnlineGroupDPOTrainer(
            model,
            reward_funcs=load_rewards([cfg.reward]),
            args=args,
            train_dataset=prompts,
            processing_class=tokenizer,
        )
    else:
        groups, stats = sample_groups(model, tokenizer, cfg, prompts, cfg.num_generations)
        print(f"[sample] {stats.summary()} ({time.perf_counter() - start:.0f} s so far)", flush=True)
        write_jsonl(groups, out / "groups.jsonl")
        sampled = stats.rewards
        trainer = GroupDPOTrainer(model, args=args, train_dataset=groups, processing_class=tokenizer)
    trainer.train()
    history = trainer.state.log_history
    trainer.save_model(str(out / "model"))
    model = trainer.accelerator.unwrap_model(trainer.model)
    after = evaluate_benchmarks(model, tokenizer, cfg, "after", out)

    table = summary_table(before, after)
    results = {
        "config": dataclasses.asdict(cfg),
        "before": before,
        "after": after,
        "train_history": history,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(table + "\n", encoding="utf-8")
    _plot(history, before, after, out / "plots.png", sampled)
    print(table)
    print(f"run directory: {out} ({results['seconds']:.0f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grouppo quickstart", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(QuickstartConfig):
        kind = {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f"default: {f.default}")
    run_quickstart(QuickstartConfig(**vars(parser.parse_args(argv))))
    return 0
