"""Does GDPO keep a population's spread of beliefs where DPO collapses it?

Five models, all from the embedded SmolLM2-135M-Instruct, evaluated on the embedded opinion data
(`grouppo data make-opinions`, seed 0), each question asked of 4 populations whose belief distributions
differ, in two regimes (``--eval_splits``):

* ``train``: the 24 training questions, as the GDPO paper evaluates: the populations' distributions on
  these questions are what calibration trains towards, so this asks whether a method *learns* them.
  The model's belief distribution is scored on the belief prefixes alone, and the answers it generates
  are its own, never the training responses;
* ``test``: the 8 questions never trained on: whether it carries the populations' shapes to new
  questions.

The models:

* ``untrained``: the embedded model as shipped;
* ``sft``: supervised fine-tuning (TRL's ``SFTTrainer``) on ``sft_train``, belief-prefixed answers
  with every belief equally often: it teaches the response format, not the population's distribution;
* ``sft_dpo``: ``sft`` then DPO (``GroupDPOTrainer``; K = 2 ``all_pairs`` is DPO's sigmoid loss) on
  ``dpo_train``: the more widely held belief's answer preferred over a less held one's, the preference
  data DPO is given when a population disagrees;
* ``sft_dpo_small_lr``: the same at ``--dpo_small_learning_rate`` (5e-6), in DPO's usual range: in the
  run in docs/experiments.md, DPO at the shared 5e-5 drove down the likelihood of chosen and rejected
  answers alike and lost the response format;
* ``sft_gdpo``: ``sft`` then GDPO (``GDPOTrainer``) on ``train``: calibration to the population's
  distribution, belief-conditioned preference and belief NLL.

``sft_dpo`` and ``sft_gdpo`` share the optimizer, learning rate, batch size, beta and epochs; every
preference arm takes the SFT model as its reference. Every arm is evaluated the same way
(``grouppo.gdpo.beliefs``): the model's belief distribution scored once per question
(``js_distance_prob``, ``majority_bias_prob``), beliefs sampled from it and answers generated after
their prefixes (``belief`` mode: ``js_distance_sampled``, ``majority_bias``, ``belief_consistency``),
and whole responses sampled freely with the belief parsed from their opening prefix (``free`` mode:
``free_js_distance_sampled``, ``free_unparsed_rate``). Beside them, the fixed references ``uniform``
and ``majority`` (always the most held belief).

Every number comes with its uncertainty: per split, each model's mean JS distance and majority bias
(model probabilities) with a 95% percentile-bootstrap interval over the split's prompts (question x
population), and the paired differences of JS distance from SFT, DPO and the uniform distribution,
resampling the same prompts for both sides. Majority bias is called above (or below) 1 only when its
whole interval is.

Writes ``OUT/results.json``, ``OUT/results.md`` (a table per population and overall) and
``OUT/distributions_ARM.png`` (first test questions: target, model probabilities, samples); each
arm's model, metrics and generations under ``OUT/arms/NAME/``. A finished arm is read back, not
rerun. The run in docs/experiments.md:

    .venv/bin/python experiments/gdpo_arms.py --out runs/gdpo_arms --epochs 3 \\
        --arms untrained sft sft_dpo_small_lr sft_gdpo
    .venv/bin/python experiments/gdpo_arms.py --out runs/gdpo_arms_seed1 --seed 1 --epochs 3 \\
        --arms sft sft_dpo_small_lr sft_gdpo --seed_runs runs/gdpo_arms
    .venv/bin/python experiments/gdpo_arms.py --out runs/gdpo_arms_seed2 --seed 2 --epochs 3 \\
        --arms sft sft_dpo_small_lr sft_gdpo --seed_runs runs/gdpo_arms runs/gdpo_arms_seed1

The second and third train the three models again at other seeds (data order, sampling);
``--seed_runs`` adds ``OUT/seeds.md``: each model's JS distance at every seed, and GDPO's paired
differences from SFT, DPO and uniform per seed (``seed_table``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from grouppo.embedded.opinions import write_opinions
from grouppo.gdpo.beliefs import (
    evaluate_beliefs,
    exact_metrics,
    plot_distributions,
    reference_distributions,
)
from grouppo.gdpo.trainer import GDPOConfig, GDPOTrainer
from grouppo.generation import SamplingConfig
from grouppo.groupdpo import GroupDPOConfig, GroupDPOTrainer
from grouppo.intervals import paired_difference, ratio_interval
from grouppo.load import load_records
from grouppo.models import load_model, load_tokenizer

ARMS = ("untrained", "sft", "sft_dpo", "sft_dpo_small_lr", "sft_gdpo")
COLUMNS = (
    "js_distance_prob",
    "js_distance_sampled",
    "majority_bias_prob",
    "majority_bias",
    "belief_consistency",
    "free_js_distance_sampled",
    "free_unparsed_rate",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gdpo_arms")
    p.add_argument("--model", default="default", help="starting model (default: the embedded one)")
    p.add_argument("--seed", type=int, default=0, help="training and sampling seed")
    p.add_argument("--sft_learning_rate", type=float, default=5e-5)
    p.add_argument("--sft_epochs", type=float, default=1.0)
    p.add_argument("--learning_rate", type=float, default=5e-5, help="DPO and GDPO")
    p.add_argument(
        "--dpo_small_learning_rate",
        type=float,
        default=5e-6,
        help="sft_dpo_small_lr: DPO at a learning rate in DPO's usual range",
    )
    p.add_argument("--epochs", type=float, default=3.0, help="DPO and GDPO")
    p.add_argument("--sft_batch_size", type=int, default=8, help="SFT records per step")
    p.add_argument(
        "--batch_size",
        type=int,
        default=4,
        help="groups per step: DPO pairs; GDPO question x population groups (all their pairs)",
    )
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--samples", type=int, default=32, help="beliefs sampled per question (belief mode)")
    p.add_argument("--free_samples", type=int, default=16, help="whole responses per question (free mode)")
    p.add_argument("--answers", type=int, default=2, help="answers generated per question (belief mode)")
    p.add_argument("--max_new_tokens", type=int, default=40)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--seed_runs", nargs="+", default=[], metavar="DIR",
                   help="finished runs of this script at other --seed values: their results are read and "
                   "OUT/seeds.md tabulates every arm over all the seeds")  # fmt: skip
    p.add_argument("--eval_splits", nargs="+", default=["train", "test"], choices=["train", "test"],
                   help="questions evaluated: train (trained on: the paper's regime), test (unseen)")
    p.add_argument("--free_splits", nargs="+", default=["test"], choices=["train", "test"],
                   help="splits also evaluated in free mode (whole responses sampled; the format check)")
    return p.parse_args(argv)


def _common(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    return {
        "output_dir": str(out),
        "lr_scheduler_type": "constant",
        "logging_steps": 5,
        "save_strategy": "no",
        "report_to": [],
        "seed": args.seed,
        "disable_tqdm": True,
    }


def train_sft(args: argparse.Namespace, data: Path, out: Path) -> None:
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        **_common(args, out), learning_rate=args.sft_learning_rate, num_train_epochs=args.sft_epochs,
        per_device_train_batch_size=args.sft_batch_size,
        max_length=256, completion_only_loss=True, bf16=False,  # TRL defaults to bf16; float32 here
    )  # fmt: skip
    tokenizer = load_tokenizer(args.model)
    _fit(SFTTrainer(
        load_model(args.model), args=config, train_dataset=_dataset(data / "sft_train.jsonl"),
        processing_class=tokenizer,
    ), tokenizer, out)  # fmt: skip


def _dataset(path: Path) -> Any:
    from datasets import Dataset

    return Dataset.from_list(load_records(str(path)))


def train_preference(
    args: argparse.Namespace, kind: str, start: Path, data: Path, out: Path, learning_rate: float
) -> None:
    """DPO (``kind`` "dpo") or GDPO from the SFT model, which is also the reference."""
    common = {**_common(args, out), "learning_rate": learning_rate, "num_train_epochs": args.epochs,
              "beta": args.beta, "precompute_ref_logps": True, "max_length": 256,
              "per_device_train_batch_size": args.batch_size, "response_chunk_size": None}  # fmt: skip
    if kind == "dpo":
        config, Trainer, file = GroupDPOConfig(**common, loss_type="all_pairs"), GroupDPOTrainer, "dpo_train"
    else:
        config, Trainer, file = GDPOConfig(**common), GDPOTrainer, "train"
    tokenizer = load_tokenizer(str(start))
    _fit(Trainer(
        load_model(str(start)), args=config, train_dataset=load_records(str(data / f"{file}.jsonl")),
        processing_class=tokenizer,
    ), tokenizer, out)  # fmt: skip


def _fit(trainer: Any, tokenizer: Any, out: Path) -> None:
    """Train; save the model and tokenizer under ``out/model`` and the log history beside it."""
    trainer.train()
    trainer.save_model(str(out / "model"))
    tokenizer.save_pretrained(str(out / "model"))
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))


def per_prompt(details: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per prompt (question x population): the model's and the uniform distribution's JS distance to the
    target and the model's majority bias, from the model's belief probabilities."""
    rows = []
    for d in details:
        model = exact_metrics(d["target"], d["probabilities"])
        uniform = exact_metrics(d["target"], reference_distributions(d["target"])["uniform"])
        rows.append({"population": d["population"], "js_distance_prob": model["js_distance_prob"],
                     "majority_bias_prob": model["majority_bias_prob"],
                     "uniform_js_distance_prob": uniform["js_distance_prob"]})  # fmt: skip
    return rows


def evaluate(
    args: argparse.Namespace, model_path: str, splits: dict[str, list[dict[str, Any]]], out: Path
) -> dict:
    """Belief-mode (and, on ``--free_splits``, free-mode) metrics of one model on each split's questions,
    with the per-prompt values the intervals are drawn from; written to ``out``."""
    model, tokenizer = load_model(model_path).eval(), load_tokenizer(model_path)
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=32, seed=args.seed
    )
    metrics, generations = {}, {}
    for split, records in splits.items():
        torch.manual_seed(args.seed)
        belief, details = evaluate_beliefs(
            model, tokenizer, records, mode="belief", samples=args.samples, answers=args.answers,
            sampling=sampling, seed=args.seed,
        )  # fmt: skip
        metrics[split] = {"belief": belief, "per_prompt": per_prompt(details)}
        generations[split] = {"belief": details}
        if split in args.free_splits:
            free, free_details = evaluate_beliefs(
                model, tokenizer, records, mode="free", samples=args.free_samples, answers=args.answers,
                sampling=sampling, seed=args.seed,
            )  # fmt: skip
            metrics[split]["free"] = free
            generations[split]["free"] = free_details
    (out / "generations.json").write_text(json.dumps(generations, indent=1))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def rows(metrics: dict[str, Any], key: str) -> dict[str, dict[str, float]]:
    """One table row per arm and reference for ``key`` ("overall" or a population)."""

    def pick(agg: dict[str, Any]) -> dict[str, float]:
        return agg["overall"] if key == "overall" else agg["populations"][key]

    out = {}
    for arm, m in metrics.items():
        row = dict(pick(m["belief"]["model"]))
        if "free" in m:
            free = pick(m["free"]["model"])
            row["free_js_distance_sampled"] = free["js_distance_sampled"]
            row["free_unparsed_rate"] = free["unparsed_rate"]
        out[arm] = row
    any_arm = next(iter(metrics.values()))
    for name in ("uniform", "majority"):
        out[f"({name})"] = pick(any_arm["belief"]["reference"][name])
    return out


def _cell(value: float, interval: list[float], sign: bool = False) -> str:
    fmt = "{:+.3f}" if sign else "{:.3f}"
    return f"{fmt.format(value)} [{fmt.format(interval[0])}, {fmt.format(interval[1])}]"


VERSUS = ("sft", "sft_dpo_small_lr", "sft_dpo")


def _difference_cell(base: list[float], values: list[float]) -> str:
    """``mean(values - base)`` over the same prompts with its paired 95% interval, marked closer/further
    (to the populations) when the interval excludes 0."""
    ones = [1.0] * len(values)
    d = paired_difference((base, ones), (values, ones))
    verdict = "" if d["includes_zero"] else (" closer" if d["difference"] < 0 else " further")
    return _cell(d["difference"], d["interval"], sign=True) + verdict


def interval_table(metrics: dict[str, Any], versus: tuple[str, ...] = VERSUS) -> str:
    """Markdown, one row per model: mean JS distance (model probabilities) with its 95% interval over
    prompts, its paired difference from each model of ``versus`` that was run and from the uniform
    distribution (negative: closer to the populations), and the majority bias with its interval and
    whether the whole interval lies above or below 1."""
    others = [name for name in versus if name in metrics]
    head = ["model", "JS distance [95% CI]", *[f"JS - {name}" for name in others], "JS - uniform",
            "majority bias [95% CI]", "majority bias vs 1"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    ones = None
    for arm, m in metrics.items():
        rows = m["per_prompt"]
        js = [r["js_distance_prob"] for r in rows]
        ones = [1.0] * len(js)
        bias = [r["majority_bias_prob"] for r in rows]
        cells = [arm, _cell(sum(js) / len(js), ratio_interval(js))]
        for name in [*others, "uniform"]:
            if name == arm:
                cells.append("")
                continue
            base = [r["uniform_js_distance_prob"] if name == "uniform" else r["js_distance_prob"]
                    for r in (rows if name == "uniform" else metrics[name]["per_prompt"])]  # fmt: skip
            cells.append(_difference_cell(base, js))
        low, high = ratio_interval(bias)
        side = "above 1" if low > 1 else "below 1" if high < 1 else "includes 1"
        cells += [_cell(sum(bias) / len(bias), [low, high]), side]
        lines.append("| " + " | ".join(cells) + " |")
    if ones is not None:
        uniform = [r["uniform_js_distance_prob"] for r in next(iter(metrics.values()))["per_prompt"]]
        cells = ["(uniform)", _cell(sum(uniform) / len(uniform), ratio_interval(uniform))]
        lines.append("| " + " | ".join(cells + [""] * (len(head) - 2)) + " |")
    return "\n".join(lines)


def population_table(metrics: dict[str, Any]) -> str:
    """Markdown, one row per model: per population, the JS distance and the majority bias (model
    probabilities) with their 95% intervals over that population's prompts; a bias whose whole interval
    lies above 1 is marked (collapsing onto that population's majority)."""
    populations = sorted({r["population"] for m in metrics.values() for r in m["per_prompt"]})
    head = ["model", *[f"{p}: JS / majority bias" for p in populations]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(populations)]
    for arm, m in metrics.items():
        cells = [arm]
        for population in populations:
            rows = [r for r in m["per_prompt"] if r["population"] == population]
            js, bias = ([r[key] for r in rows] for key in ("js_distance_prob", "majority_bias_prob"))
            low, high = ratio_interval(bias)
            mark = " (above 1)" if low > 1 else ""
            cells.append(f"{_cell(sum(js) / len(js), ratio_interval(js))} / "
                         f"{_cell(sum(bias) / len(bias), [low, high])}{mark}")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SPLIT_TITLES = {
    "train": "Training questions (trained on: the paper's regime)",
    "test": "Test questions (never trained on)",
}


def markdown(by_split: dict[str, dict[str, Any]]) -> str:
    """results.md: per split, the interval table, then the metric tables overall and per population."""
    parts = []
    for split, metrics in by_split.items():
        parts.append(f"## {SPLIT_TITLES[split]}\n\n{interval_table(metrics)}\n\nPer population:\n\n"
                     f"{population_table(metrics)}\n{metric_tables(metrics)}")
    return "\n".join(parts)


def metric_tables(metrics: dict[str, Any]) -> str:
    any_arm = next(iter(metrics.values()))
    keys = ["overall", *sorted(any_arm["belief"]["model"]["populations"])]
    lines = []
    for key in keys:
        model = any_arm["belief"]["model"]
        n = model["num_questions"] if key == "overall" else model["populations"][key]["num_questions"]
        lines += [f"\n**{key}** ({n} questions)\n", "| model | " + " | ".join(COLUMNS) + " |",
                  "|---|" + "---:|" * len(COLUMNS)]  # fmt: skip
        for name, row in rows(metrics, key).items():
            cells = [f"{row[c]:.3f}" if c in row else "" for c in COLUMNS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seed_table(runs: dict[int, dict[str, dict[str, Any]]], versus: tuple[str, ...] = VERSUS) -> str:
    """Markdown over training seeds (``runs``: seed -> split -> arm -> metrics with ``per_prompt``).

    First, per split and model run at every seed: the mean JS distance (model probabilities) of each
    seed, their mean and range. Then, per split and seed, GDPO's paired difference in JS distance from
    each model of ``versus`` that was run and from the uniform distribution, with its 95% interval
    over prompts: whether GDPO's lead holds at every seed, not only in one run."""
    seeds = sorted(runs)
    lines = [f"Seeds: {', '.join(map(str, seeds))}.", "",
             "| questions | model | JS distance per seed | mean (range) |", "|---|---|---|---:|"]  # fmt: skip
    splits = [split for split in SPLIT_TITLES if all(split in runs[seed] for seed in seeds)]
    for split in splits:
        arms = [arm for arm in runs[seeds[0]][split] if all(arm in runs[seed][split] for seed in seeds)]
        for arm in [*arms, "(uniform)"]:
            uniform = arm == "(uniform)"
            key, name = ("uniform_js_distance_prob", arms[0]) if uniform else ("js_distance_prob", arm)
            values = [sum(r[key] for r in rows) / len(rows)
                      for rows in (runs[seed][split][name]["per_prompt"] for seed in seeds)]  # fmt: skip
            mean = sum(values) / len(values)
            cells = [split, arm, ", ".join(f"{v:.3f}" for v in values),
                     f"{mean:.3f} ({min(values):.3f} to {max(values):.3f})"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    others = [name for name in versus if all(name in runs[seed][split] for seed in seeds for split in splits)]
    if not all("sft_gdpo" in runs[seed][split] for seed in seeds for split in splits):
        return "\n".join(lines) + "\n"
    head = ["questions", "seed", *[f"GDPO - {name}" for name in others], "GDPO - uniform"]
    lines += ["", "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for split in splits:
        for seed in seeds:
            gdpo = runs[seed][split]["sft_gdpo"]["per_prompt"]
            js = [r["js_distance_prob"] for r in gdpo]
            cells = [split, str(seed)]
            for name in others:
                cells.append(_difference_cell([r["js_distance_prob"] for r in
                                               runs[seed][split][name]["per_prompt"]], js))  # fmt: skip
            cells.append(_difference_cell([r["uniform_js_distance_prob"] for r in gdpo], js))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    data = out / "data"
    write_opinions(data, seed=0)
    splits = {split: load_records(str(data / f"{split}.jsonl")) for split in args.eval_splits}
    metrics: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for arm in args.arms:
        arm_dir = out / "arms" / arm
        arm_dir.mkdir(parents=True, exist_ok=True)
        if (arm_dir / "metrics.json").exists():
            metrics[arm] = json.loads((arm_dir / "metrics.json").read_text())
            print(f"[{arm}] read back from {arm_dir}")
            continue
        start = time.time()
        model_path = args.model
        if arm != "untrained":
            if not (out / "arms" / "sft" / "model").exists():
                (out / "arms" / "sft").mkdir(parents=True, exist_ok=True)
                train_sft(args, data, out / "arms" / "sft")
            model_path = str(out / "arms" / "sft" / "model")
        if arm != "untrained" and arm != "sft":
            kind = "gdpo" if arm == "sft_gdpo" else "dpo"
            lr = args.dpo_small_learning_rate if arm == "sft_dpo_small_lr" else args.learning_rate
            train_preference(args, kind, Path(model_path), data, arm_dir, lr)
            model_path = str(arm_dir / "model")
        trained = time.time() - start
        metrics[arm] = evaluate(args, model_path, splits, arm_dir)
        timings[arm] = time.time() - start
        print(f"[{arm}] trained {trained:.0f} s, evaluated {timings[arm] - trained:.0f} s", flush=True)
    by_split = {split: {arm: m[split] for arm, m in metrics.items()} for split in args.eval_splits}
    table = markdown(by_split)
    print(table)
    (out / "results.md").write_text(table)
    results = {"args": vars(args), "seconds": timings, "metrics": by_split}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if args.seed_runs:
        runs = {args.seed: by_split}
        for path in args.seed_runs:
            other = json.loads((Path(path) / "results.json").read_text())
            runs[other["args"]["seed"]] = other["metrics"]
        (out / "seeds.md").write_text(seed_table(runs))
        print(seed_table(runs))
    shown = [a for a in ("sft_dpo", "sft_dpo_small_lr", "sft_gdpo") if a in metrics]
    for arm in shown:
        generations = json.loads((out / "arms" / arm / "generations.json").read_text())
        for split in args.eval_splits:
            path = out / f"distributions_{split}_{arm}.png"
            plot_distributions(generations[split]["belief"], path, limit=6)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
