"""``grouppo quickstart``: improve the embedded model's instruction following with GroupDPO, measured before
and after.

``grouppo quickstart`` (``make run``) evaluates the model on held-out IFEval-style prompts and on IFBench
test prompts, trains it with GroupDPO on groups of K self-sampled responses scored by the official
IFEval checkers (``all_pairs`` loss, NLL on positives, decoupled backward), evaluates again, and writes a
run directory: ``metrics.json``, ``summary.md`` (the before/after table), ``groups.jsonl`` (offline),
``model/``, ``eval/`` (generations) and ``plots.png`` (reward and loss curves, before/after accuracy).

The defaults are small, so that the whole run fits a laptop-class CPU; every knob is an option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grouppo.embedded.instructions import make_if_prompts
from grouppo.environment import describe_environment
from grouppo.evaluation import benchmark_prompts, compare_generations, evaluate_instruction_following
from grouppo.generation import SamplingConfig, TransformersGenerator, bfloat16_is_native
from grouppo.load import load_records, write_jsonl
from grouppo.models import load_model, load_tokenizer, resolve_model
from grouppo.online.rewards import load_rewards
from grouppo.online.rollout import RolloutStats, rollout_dataset

logger = logging.getLogger(__name__)

METRICS = ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict", "instruction_level_loose")


def _knob(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class QuickstartConfig:
    """Every knob of ``grouppo quickstart``; the defaults are what ``make run`` runs."""

    output_dir: str = _knob(
        "runs/quickstart", "Run directory (metrics.json, summary.md, model/, eval/, plots.png)."
    )
    model_name_or_path: str | None = _knob(
        None, "Hub name or local path (default: the embedded SmolLM2-135M-Instruct)."
    )
    mode: str = _knob("offline", "offline: sample the groups once, then train; online: sample every step.")
    seed: int = _knob(0, "Seed of the prompts, the sampling and the training.")
    train_prompts: int = _knob(96, "Training prompts (generated, split train).")
    eval_prompts: int = _knob(128, "Held-out IFEval-style evaluation prompts.")
    ifbench_prompts: int = _knob(64, "IFBench test prompts evaluated (of 294).")
    num_generations: int = _knob(4, "Responses sampled per training prompt (K).")
    max_completion_length: int = _knob(128, "Maximum tokens of a sampled training response.")
    eval_max_new_tokens: int = _knob(192, "Maximum tokens of an evaluation answer.")
    eval_dtype: str = _knob(
        "float32",
        "Generation dtype of the evaluations: float32 gives the same answers whatever the batch and the "
        "CPU's matrix kernels; bfloat16 (or auto) is faster where the hardware has BF16 instructions, and "
        "its answers move with both.",
    )
    temperature: float = _knob(1.0, "Sampling temperature of the training responses.")
    generation_batch_size: int = _knob(64, "Sequences generated at a time.")
    reward_funcs: str = _knob("ifeval", "Reward: a built-in name, module:function or a reward model.")
    loss_type: str = _knob("all_pairs", "GroupDPO loss.")
    positive_rule: str = _knob("top_bottom", "How scores become positive and negative labels.")
    beta: float = _knob(0.1, "Inverse temperature of the implicit reward.")
    nll_weight: float = _knob(0.2, "Weight of the NLL on positives.")
    learning_rate: float = _knob(2e-5, "Learning rate.")
    num_train_epochs: float = _knob(1.0, "Training epochs.")
    per_device_train_batch_size: int = _knob(2, "Groups per training step.")
    response_chunk_size: int = _knob(2, "Responses recomputed at a time (decoupled backward).")
    max_length: int = _knob(512, "Maximum prompt + response tokens.")
    training_dtype: str = _knob(
        "auto",
        "auto: bfloat16 autocast (float32 weights) where the hardware computes bfloat16 natively, "
        "else float32; or bfloat16 / float32.",
    )


class ConfigError(ValueError):
    """A QuickstartConfig that cannot run (a bad mode, loss, rule or reward): found before the model loads."""


def evaluate_benchmarks(
    model: Any, tokenizer: Any, cfg: QuickstartConfig, tag: str, out: Path, progress: bool = False
) -> dict[str, dict[str, Any]]:
    """Greedy answers to ``cfg.eval_prompts`` held-out IFEval-style prompts and ``cfg.ifbench_prompts``
    IFBench test prompts, checked; writes ``out/eval/{tag}_{benchmark}.jsonl``, returns the metrics.
    ``progress`` shows a bar of the answers generated (stderr)."""
    sampling = SamplingConfig(
        max_new_tokens=cfg.eval_max_new_tokens,
        temperature=0.0,
        batch_size=cfg.generation_batch_size,
        progress=progress,
        dtype=cfg.eval_dtype,
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
    model: Any,
    tokenizer: Any,
    cfg: QuickstartConfig,
    prompts: list[dict[str, Any]],
    num_generations: int,
    progress: bool = False,
    reward: Any = None,
) -> tuple[list[dict[str, Any]], RolloutStats]:
    """``num_generations`` sampled responses per prompt record, scored with ``reward`` (default: loaded
    from ``cfg.reward_funcs``), as groups; ``progress`` shows a bar of the prompts sampled (stderr)."""
    sampling = SamplingConfig(
        max_new_tokens=cfg.max_completion_length,
        temperature=cfg.temperature,
        batch_size=cfg.generation_batch_size,
        seed=cfg.seed,
    )
    return rollout_dataset(
        TransformersGenerator(model, tokenizer, sampling),
        reward if reward is not None else load_rewards([cfg.reward_funcs]),
        prompts,
        num_generations,
        tokenizer,
        prompts_per_call=max(1, cfg.generation_batch_size // num_generations),
        progress=progress,
    )


def train_config(cfg: QuickstartConfig, out: Path, online: bool) -> Any:
    """The GroupDPOConfig (offline, reference precomputed) or OnlineGroupDPOConfig that ``cfg`` describes."""
    from grouppo.groupdpo import GroupDPOConfig
    from grouppo.online.trainer import OnlineGroupDPOConfig

    if cfg.training_dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"training_dtype must be auto, bfloat16 or float32, got {cfg.training_dtype!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = cfg.training_dtype == "bfloat16" or (cfg.training_dtype == "auto" and bfloat16_is_native(device))
    common = dict(
        bf16=bf16,
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
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
        max_completion_length=cfg.max_completion_length,
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
    online = [h for h in steps if "reward" in h]
    if online:
        axes[0].plot([h["step"] for h in online], [h["reward"] for h in online], marker="o")
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


def summary_table(before: dict[str, dict], after: dict[str, dict], changes: dict[str, dict]) -> str:
    """A markdown table of every metric before and after, per benchmark, each with its 95% bootstrap
    interval over prompts, and the change with its paired interval (``grouppo.evaluation.
    compare_generations``), saying plainly where that interval includes 0."""
    lines = [
        "| benchmark | metric | before [95% CI] | after [95% CI] | change [paired 95% CI] | |",
        "|---|---|---:|---:|---:|---|",
    ]

    def cell(value: float, interval: list[float], sign: str = "") -> str:
        return f"{value:{sign}.3f} [{interval[0]:{sign}.3f}, {interval[1]:{sign}.3f}]"

    for benchmark in before:
        for metric in METRICS:
            b, a, c = before[benchmark], after[benchmark], changes[benchmark][metric]
            verdict = "includes 0: no detectable change" if c["includes_zero"] else "excludes 0"
            lines.append(
                f"| {benchmark} | {metric} | {cell(b[metric], b['ci95'][metric])} | "
                f"{cell(a[metric], a['ci95'][metric])} | {cell(c['difference'], c['interval'], '+')} | "
                f"{verdict} |"
            )
        lines.append(
            f"| {benchmark} | prompts (unscored instructions) | {before[benchmark]['num_prompts']} "
            f"({before[benchmark]['unscored_instructions']}) | | | |"
        )
    return "\n".join(lines)


def run_quickstart(cfg: QuickstartConfig, progress: bool = True) -> dict[str, Any]:
    """Evaluate, train, evaluate; returns and writes the metrics (see the module docstring).

    Each phase is announced on stdout (``[2/4] sample ...``); ``progress`` shows its bar on stderr (the
    answers generated, the prompts sampled, the training steps), with rate and ETA.
    """
    from grouppo.base import require_writable_dir
    from grouppo.groupdpo import GroupDPOTrainer
    from grouppo.online.trainer import OnlineGroupDPOTrainer

    # What can be checked without the model is, first: the options, the reward, the run directory.
    if cfg.mode not in ("offline", "online"):
        raise ConfigError(f"mode must be offline or online, got {cfg.mode!r}")
    start = time.perf_counter()
    online = cfg.mode == "online"
    out = Path(cfg.output_dir)
    try:
        args = train_config(cfg, out, online)
        reward = load_rewards([cfg.reward_funcs])
    except ValueError as error:
        raise ConfigError(str(error)) from error
    require_writable_dir(out)
    args.disable_tqdm = not progress
    phases = [
        "evaluate before training",
        *([] if online else ["sample the training groups"]),
        f"train ({cfg.mode} GroupDPO)",
        "evaluate after training",
    ]

    started: dict[str, float] = {}  # each phase's start, seconds into the run (metrics.json: phase_seconds)

    def phase(index: int) -> None:
        started[phases[index - 1]] = round(time.perf_counter() - start, 1)
        print(
            f"[{index}/{len(phases)}] {phases[index - 1]} ({time.perf_counter() - start:.0f} s so far)",
            flush=True,
        )

    torch.manual_seed(cfg.seed)
    name = resolve_model(cfg.model_name_or_path)
    model, tokenizer = load_model(name, dtype=torch.float32), load_tokenizer(name)
    phase(1)
    before = evaluate_benchmarks(model, tokenizer, cfg, "before", out, progress=progress)

    prompts = make_if_prompts(cfg.train_prompts, cfg.seed, split="train")
    write_jsonl(prompts, out / "train_prompts.jsonl")
    sampled: list[float] = []
    sampling: dict[str, int] = {}
    if online:
        trainer = OnlineGroupDPOTrainer(
            model,
            reward_funcs=reward,
            args=args,
            train_dataset=prompts,
            processing_class=tokenizer,
        )
    else:
        phase(2)
        groups, stats = sample_groups(
            model, tokenizer, cfg, prompts, cfg.num_generations, progress=progress, reward=reward
        )
        print(f"[sample] {stats.summary()} ({time.perf_counter() - start:.0f} s so far)", flush=True)
        write_jsonl(groups, out / "groups.jsonl")
        sampled = stats.rewards
        sampling = {k: v for k, v in dataclasses.asdict(stats).items() if k != "rewards"}  # the counts
        trainer = GroupDPOTrainer(model, args=args, train_dataset=groups, processing_class=tokenizer)
    phase(len(phases) - 1)
    trainer.train()
    history = trainer.state.log_history
    trainer.save_model(str(out / "model"))
    model = trainer.accelerator.unwrap_model(trainer.model)
    phase(len(phases))
    after = evaluate_benchmarks(model, tokenizer, cfg, "after", out, progress=progress)

    changes = {
        benchmark: compare_generations(
            *(load_records(str(out / "eval" / f"{tag}_{benchmark}.jsonl")) for tag in ("before", "after"))
        )
        for benchmark in before
    }
    table = summary_table(before, after, changes)
    results = {
        "config": dataclasses.asdict(cfg),
        "before": before,
        "after": after,
        "changes": changes,
        "train_history": history,
        "sampling": sampling,
        "seconds": round(time.perf_counter() - start, 1),
        "environment": describe_environment(),
    }
    ends = [*list(started.values())[1:], results["seconds"]]
    spans = zip(started.items(), ends, strict=True)
    results["phase_seconds"] = {name: round(end - t, 1) for (name, t), end in spans}  # loading: the rest
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(table + "\n", encoding="utf-8")
    _plot(history, before, after, out / "plots.png", sampled)
    print(table)
    print(f"run directory: {out} ({results['seconds']:.0f} s)")
    return results


def build_parser() -> argparse.ArgumentParser:
    """``grouppo quickstart``'s options: one per QuickstartConfig field, and ``--disable_tqdm``."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="grouppo quickstart",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(QuickstartConfig):
        kind = {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"])
    parser.add_argument("--disable_tqdm", action="store_true", help="No progress bars.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    progress = not args.pop("disable_tqdm")
    try:
        run_quickstart(QuickstartConfig(**args), progress=progress)
    except ConfigError as error:
        parser.error(str(error))
    except PermissionError as error:  # the run directory cannot be written
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
