"""Pairs against groups on the same self-sampled responses.

One sampling pass draws ``--k`` (8) responses per training prompt from the starting model and scores
them with the IFEval reward (fraction of a prompt's instructions satisfied). Every offline arm then
trains a fresh copy of the starting model on its own view of those same responses, with the same
optimizer, learning rate, batch size (prompts per step) and epochs:

* ``dpo_best_worst``: the best and the worst response of each prompt (one pair, plain DPO);
* ``dpo_random_pair``: two responses drawn at random among those with different scores, labelled by score;
* ``groupdpo_k4``: the first 4 responses, top 2 positive and bottom 2 negative (``all_pairs``);
* ``groupdpo_k8``: all 8 responses, top 4 against bottom 4 (``all_pairs``);
* ``groupdpo_k8_above_mean``: all 8 responses, those scoring strictly above the group's mean against
  the rest (``above_mean``), another way to label a group of few distinct scores;

each with ``nll_weight`` 0 and ``--nll_weight``. Online arms (``--modes online``) sample from the policy
as it trains, on the same prompts: ``dpo_best_worst`` keeps the best and worst of 8 samples,
``dpo_random_pair`` samples 2, ``groupdpo_k4`` 4 and ``groupdpo_k8`` 8.

Every arm is evaluated greedily on the same held-out IFEval-style prompts and IFBench test prompts
(never trained on); the starting model is evaluated once. Each arm is then compared with the best
pairwise arm on the same prompts: the paired difference and its 95% bootstrap interval over prompts
(``grouppo eval compare``), and the smallest difference the run could detect. ``--seeds`` trains every
arm once per seed (``--seed_arms``: only these after the first seed; the sampled groups stay those of
``--seed``), and a table gives each arm's mean and range over its seeds. Writes ``OUT/results.json``,
``OUT/results.md`` (the tables) and ``OUT/log_ratios.png`` (per step, how far the positives' and
negatives' log-probs moved from the reference, per arm), and each arm's metrics and generations under
``OUT/arms/``. A finished arm is read back, not rerun. The run in docs/experiments.md (128 training
prompts; the main job's 128 IFEval-style and 64 IFBench evaluation prompts and its other defaults;
bfloat16 autocast training on this CPU):

    .venv/bin/python experiments/if_arms.py --out runs/if_arms --train_prompts 128 --k 8 --nll_weights 0.2 \\
        --seeds 0 1 2 --modes offline \\
        --arms dpo_best_worst dpo_random_pair groupdpo_k4 groupdpo_k8 groupdpo_k8_above_mean

The online run in docs/experiments.md (same prompts and evaluation; 55 min for the four arms here):

    .venv/bin/python experiments/if_arms.py --out runs/if_arms_online_fixed --train_prompts 128 \\
        --nll_weights 0.2 --seeds 0 --modes online \\
        --arms dpo_best_worst groupdpo_k8 dpo_random_pair groupdpo_k4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from grouppo.apps.quickstart import (
    METRICS,
    QuickstartConfig,
    evaluate_benchmarks,
    sample_groups,
    train_config,
)
from grouppo.embedded.instructions import make_if_prompts
from grouppo.load import load_records, write_jsonl
from grouppo.models import load_model, load_tokenizer, resolve_model
from grouppo.online.rewards import load_rewards

ARMS = ("dpo_best_worst", "dpo_random_pair", "groupdpo_k4", "groupdpo_k8", "groupdpo_k8_above_mean")
# The rule that turns a group arm's scores into labels (GroupDPO's default, top half against bottom
# half with the cut moved off tied scores, or only responses strictly above the group's mean score).
GROUP_RULES = {
    "groupdpo_k4": "top_bottom",
    "groupdpo_k8": "top_bottom",
    "groupdpo_k8_above_mean": "above_mean",
}
# Online: responses sampled per prompt and the rule that labels them.
ONLINE = {
    "dpo_best_worst": (8, "best_vs_worst"),
    "dpo_random_pair": (2, "top_bottom"),
    "groupdpo_k4": (4, "top_bottom"),
    "groupdpo_k8": (8, "top_bottom"),
    "groupdpo_k8_above_mean": (8, "above_mean"),
}


def arm_records(groups: list[dict[str, Any]], arm: str, seed: int = 0) -> list[dict[str, Any]]:
    """The view of the K-response ``groups`` (``responses``, ``scores``) that offline arm ``arm`` trains on.

    Pair arms get explicit ``labels`` ([1, 0]); group arms keep ``scores`` for the ``top_bottom`` rule.
    Prompts whose view holds no preference (all its scores equal) are left out.
    """
    rng = random.Random(f"if-arms-{seed}")
    out = []
    for group in groups:
        responses, scores = group["responses"], group["scores"]
        base = {key: value for key, value in group.items() if key not in ("responses", "scores", "labels")}
        if arm == "dpo_best_worst":
            best, worst = scores.index(max(scores)), scores.index(min(scores))
            picked, labels = [best, worst], [1, 0]
        elif arm == "dpo_random_pair":
            first = rng.randrange(len(scores))
            others = [i for i in range(len(scores)) if scores[i] != scores[first]]
            if not others:
                continue
            second = rng.choice(others)
            picked = sorted((first, second), key=lambda i: -scores[i])
            labels = [1, 0]
        elif arm in GROUP_RULES:
            # The first k (sampling order is random); fewer where empty completions were dropped.
            k = int(arm.split("_")[1][1:])
            picked, labels = list(range(min(k, len(responses)))), None
        else:
            raise ValueError(f"unknown arm {arm!r}; expected one of {ARMS}")
        values = [scores[i] for i in picked]
        if max(values) == min(values):
            continue
        record = {**base, "responses": [responses[i] for i in picked], "scores": values}
        if labels is not None:
            record["labels"] = labels
        out.append(record)
    return out


def shared_groups(cfg: QuickstartConfig, k: int, out: Path) -> list[dict[str, Any]]:
    """K scored responses per training prompt from the starting model (read back from ``out`` if there)."""
    path = out / f"groups_k{k}.jsonl"
    if path.exists():
        return load_records(path)
    name = resolve_model(cfg.model)
    model, tokenizer = load_model(name, dtype=torch.float32), load_tokenizer(name)
    prompts = make_if_prompts(cfg.train_prompts, cfg.seed, split="train")
    # Prompts whose K responses all scored the same are dropped here: no arm could learn from them.
    groups, stats = sample_groups(model, tokenizer, cfg, prompts, k)
    print(f"[sample] {stats.summary()}", flush=True)
    write_jsonl(groups, path)
    return groups


def run_arm(cfg: QuickstartConfig, arm: str, mode: str, groups: list[dict[str, Any]], out: Path,
            prompt_seed: int | None = None) -> dict:  # fmt: skip
    """Train a fresh starting model as ``arm`` (training seed ``cfg.seed``; online, on the training prompts
    of ``prompt_seed``, by default ``cfg.seed``) and evaluate it; returns the arm's result row."""
    from grouppo.groupdpo import GroupDPOTrainer
    from grouppo.online.trainer import OnlineGroupDPOTrainer

    done = out / "metrics.json"
    if done.exists():
        return json.loads(done.read_text())
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    name = resolve_model(cfg.model)
    model, tokenizer = load_model(name, dtype=torch.float32), load_tokenizer(name)
    if mode == "online":
        k, rule = ONLINE[arm]
        cfg = dataclasses.replace(cfg, num_generations=k, positive_rule=rule)
        args = train_config(cfg, out, online=True)
        seed = cfg.seed if prompt_seed is None else prompt_seed
        prompts = make_if_prompts(cfg.train_prompts, seed, split="train")
        trainer = OnlineGroupDPOTrainer(
            model, reward_funcs=load_rewards([cfg.reward]), args=args, train_dataset=prompts,
            processing_class=tokenizer,
        )  # fmt: skip
        data = {"prompts": len(prompts)}
    else:
        records = arm_records(groups, arm, cfg.seed)
        cfg = dataclasses.replace(cfg, positive_rule=GROUP_RULES.get(arm, cfg.positive_rule))
        args = train_config(cfg, out, online=False)
        trainer = GroupDPOTrainer(model, args=args, train_dataset=records, processing_class=tokenizer)
        data = {"prompts": len(records), "responses": sum(len(r["responses"]) for r in records)}
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    after = evaluate_benchmarks(model, tokenizer, cfg, "after", out)
    row = {
        "arm": arm,
        "mode": mode,
        "nll_weight": cfg.nll_weight,
        "seed": cfg.seed,
        "positive_rule": cfg.positive_rule if mode == "online" else GROUP_RULES.get(arm, "labels given"),
        **data,
        "steps": trainer.state.global_step,
        "after": after,
        "history": trainer.state.log_history,
        "seconds": round(time.perf_counter() - start, 1),
    }
    done.write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    return row


def log_ratios(row: dict[str, Any], side: str, beta: float) -> list[tuple[int, float]]:
    """(step, mean of logp - ref_logp) of the ``side`` ("chosen": positives, "rejected": negatives) of
    each step's batch: the logged implicit reward over beta. Within a step both terms score the same
    responses, so unlike ``logps/chosen`` it does not jump with the batch's response lengths; with one
    epoch every batch is new, so it shows where the policy moves unseen positives and negatives."""
    key = f"rewards/{side}"
    return [(h["step"], h[key] / beta) for h in row["history"] if key in h]


def _second_half_mean(points: list[tuple[int, float]]) -> float:
    values = [v for _, v in points[len(points) // 2 :]]
    return sum(values) / len(values) if values else float("nan")


def table(before: dict[str, dict], rows: list[dict[str, Any]], beta: float) -> str:
    """Markdown: prompt- and instruction-level strict accuracy of every arm, the starting model first, and
    how far training moved the positives' and negatives' log-probs (mean over the second half of steps)."""
    benchmarks = list(before)
    head = ["arm", "mode", "NLL", "seed", "prompts", "steps"]
    head += [f"{b} {m.replace('_level_', ' ')}" for b in benchmarks for m in METRICS if "strict" in m]
    head += ["Δ logp positives", "Δ logp negatives"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 6 + "---:|" * (len(head) - 6)]

    def accuracy(result: dict[str, dict]) -> list[str]:
        return [f"{result[b][m]:.3f}" for b in benchmarks for m in METRICS if "strict" in m]

    lines.append("| starting model | | | | | | " + " | ".join(accuracy(before)) + " | | |")
    for row in rows:
        cells = [row["arm"], row["mode"], f"{row['nll_weight']:g}", str(row.get("seed", 0)),
                 str(row["prompts"]), str(row["steps"])]  # fmt: skip
        moved = [f"{_second_half_mean(log_ratios(row, side, beta)):+.2f}" for side in ("chosen", "rejected")]
        lines.append("| " + " | ".join(cells + accuracy(row["after"]) + moved) + " |")
    return "\n".join(lines)


EQUAL_REWARD_KEYS = ("online/equal_reward_fraction", "online/equal_reward_groups")


def sampling_table(rows: list[dict[str, Any]]) -> str:
    """Markdown for the online arms, from their logged history: the share of sampled groups skipped
    because all rewards were equal, the mean reward of the policy's samples over the first and the last
    quarter of the steps, and the arm's wall time (training and evaluation)."""
    lines = [
        "| arm | NLL | groups skipped (all rewards equal) | sampled reward, first quarter of steps "
        "| last quarter | seconds |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        # Runs logged before the metric was renamed call it online/equal_reward_groups.
        key = next(k for k in EQUAL_REWARD_KEYS if any(k in h for h in row["history"]))
        steps = [h for h in row["history"] if key in h]
        quarter = max(1, len(steps) // 4)
        skipped = sum(h[key] for h in steps) / len(steps)
        first, last = (
            sum(h["reward/mean"] for h in part) / quarter for part in (steps[:quarter], steps[-quarter:])
        )
        cells = [row["arm"], f"{row['nll_weight']:g}", f"{skipped:.0%}", f"{first:.3f}", f"{last:.3f}"]
        lines.append("| " + " | ".join(cells + [f"{row['seconds']:.0f}"]) + " |")
    return "\n".join(lines)


COMPARED = ("prompt_level_strict", "instruction_level_strict")


def _tag(row: dict[str, Any]) -> str:
    return f"{row['mode']}_{row['arm']}_nll{row['nll_weight']:g}_seed{row.get('seed', 0)}"


def comparisons(out: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each arm's (and the starting model's) difference from the best pairwise arm, with its paired 95%
    bootstrap interval over prompts, from the saved generations: per benchmark and metric of
    ``COMPARED``. The best pairwise arm is the pairwise (``dpo_*``) arm of the first seed with the highest
    IFEval prompt-level strict accuracy; naming it after seeing the evaluation favours it, so a group arm
    that beats it beats every pairwise arm of that seed."""
    from grouppo.evaluation import compare_generations

    first = rows[0].get("seed", 0)
    pairwise = [r for r in rows if r["arm"].startswith("dpo_") and r.get("seed", 0) == first]
    if not pairwise:
        return {}
    best = max(pairwise, key=lambda r: r["after"]["ifeval"]["prompt_level_strict"])
    benchmarks = list(best["after"])
    saved = {_tag(r): out / "arms" / _tag(r) / "eval" for r in rows}
    saved["starting model"] = out / "eval"

    def generations(name: str, benchmark: str) -> list[dict[str, Any]]:
        when = "before" if name == "starting model" else "after"
        return load_records(saved[name] / f"{when}_{benchmark}.jsonl")

    result: dict[str, Any] = {"reference": _tag(best), "arms": {}}
    for name in ["starting model", *(_tag(r) for r in rows)]:
        if name == _tag(best):
            continue
        result["arms"][name] = {}
        for benchmark in benchmarks:
            compared = compare_generations(generations(_tag(best), benchmark), generations(name, benchmark))
            result["arms"][name][benchmark] = {m: v for m, v in compared.items() if m in COMPARED}
    return result


def comparison_table(comparison: dict[str, Any]) -> str:
    """Markdown: each arm minus the best pairwise arm, per benchmark and metric, with the paired 95%
    interval; "+"/"-" where the interval excludes 0. Then the smallest difference the run could detect:
    per metric, the median half-width of the intervals (a difference that large just excludes 0) and
    2.8 standard errors (the difference detected 80% of the time at the 5% level)."""
    arms = comparison["arms"]
    first = next(iter(arms.values()))
    columns = [(b, m) for b in first for m in first[b]]
    head = [f"arm (minus {comparison['reference']})"]
    head += [f"{b} {m.replace('_level_', ' ')}" for b, m in columns]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(columns)]
    widths: dict[tuple[str, str], list[float]] = {c: [] for c in columns}
    for name, results in arms.items():
        cells = [name]
        for b, m in columns:
            r = results[b][m]
            low, high = r["interval"]
            widths[(b, m)].append((high - low) / 2)
            mark = "" if r["includes_zero"] else (" (+)" if r["difference"] > 0 else " (-)")
            cells.append(f"{r['difference']:+.3f} [{low:+.3f}, {high:+.3f}]{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    prompts = {b: first[b][columns[0][1]]["prompts"] for b in first}
    detect = []
    for b, m in columns:
        half = sorted(widths[(b, m)])[len(widths[(b, m)]) // 2]
        detect.append(f"{b} {m.replace('_level_', ' ')} ±{half:.3f} ({2.8 * half / 1.96:.3f} at 80% power)")
    lines += ["", "Prompts compared: " + ", ".join(f"{b} {n}" for b, n in prompts.items())
              + ". Smallest detectable difference (median half-width of the paired intervals): "
              + "; ".join(detect) + "."]  # fmt: skip
    return "\n".join(lines)


def seed_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per arm run with several seeds, each compared metric's mean over seeds and its range."""
    by_arm: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for row in rows:
        by_arm.setdefault((row["arm"], row["mode"], row["nll_weight"]), []).append(row)
    runs = {key: group for key, group in by_arm.items() if len(group) > 1}
    if not runs:
        return ""
    benchmarks = list(rows[0]["after"])
    head = ["arm", "mode", "NLL", "seeds"]
    head += [f"{b} {m.replace('_level_', ' ')}" for b in benchmarks for m in COMPARED]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|---|" + "---:|" * (len(head) - 4)]
    for (arm, mode, nll), group in runs.items():
        cells = [arm, mode, f"{nll:g}", ",".join(str(r.get("seed", 0)) for r in group)]
        for b in benchmarks:
            for m in COMPARED:
                values = [r["after"][b][m] for r in group]
                cells.append(f"{sum(values) / len(values):.3f} ({min(values):.3f} to {max(values):.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(before: dict[str, dict], rows: list[dict[str, Any]], beta: float,
             comparison: dict[str, Any] | None = None) -> str:  # fmt: skip
    """results.md: the accuracy table, the differences from the best pairwise arm with their intervals,
    the spread over seeds, then the sampling table for online arms (if any)."""
    online = [row for row in rows if row["mode"] == "online"]
    parts = [table(before, rows, beta)]
    if comparison:
        parts.append(comparison_table(comparison))
    spread = seed_table(rows)
    if spread:
        parts.append(spread)
    if online:
        parts.append(sampling_table(online))
    return "\n\n".join(parts)


def plot_log_ratios(rows: list[dict[str, Any]], beta: float, path: Path) -> None:
    """Per step, logp - ref_logp of the batch's positives (left) and negatives (right), one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, side, name in zip(axes, ("chosen", "rejected"), ("positives", "negatives"), strict=True):
        for row in rows:
            points = log_ratios(row, side, beta)
            if points:
                steps, values = zip(*points, strict=True)
                style = "-" if row["nll_weight"] else "--"
                label = f"{row['arm']} {row['mode']} nll={row['nll_weight']:g}"
                ax.plot(steps, values, style, label=label)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xlabel("step")
        ax.set_title(f"{name}: logp - ref logp (summed over tokens)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(QuickstartConfig):
        if f.name in ("mode", "num_generations", "loss_type", "positive_rule"):
            continue  # set per arm
        kind = {"int": int, "float": float}.get(str(f.type), str)
        default = "runs/if_arms" if f.name == "out" else f.default
        parser.add_argument(f"--{f.name}", type=kind, default=default, help=f"default: {default}")
    parser.add_argument("--k", type=int, default=8, help="Responses sampled per prompt (offline).")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--modes", nargs="+", default=["offline"], choices=["offline", "online"])
    parser.add_argument("--nll_weights", nargs="+", type=float, default=None,
                        help="default: 0 and --nll_weight")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="training seeds per arm (default: --seed); the sampled groups and the "
                        "prompts always use --seed")  # fmt: skip
    parser.add_argument("--seed_arms", nargs="+", default=None, choices=ARMS,
                        help="arms trained under the seeds after the first (default: every arm)")  # fmt: skip
    args = vars(parser.parse_args(argv))
    k, arms, modes, seeds = args.pop("k"), args.pop("arms"), args.pop("modes"), args.pop("seeds")
    seed_arms = args.pop("seed_arms") or arms
    nll_weights = args.pop("nll_weights") or [0.0, args["nll_weight"]]
    cfg = QuickstartConfig(**args, loss_type="all_pairs", positive_rule="top_bottom")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    before_path = out / "before.json"
    if before_path.exists():
        before = json.loads(before_path.read_text())
    else:
        name = resolve_model(cfg.model)
        model, tokenizer = load_model(name, dtype=torch.float32), load_tokenizer(name)
        before = evaluate_benchmarks(model, tokenizer, cfg, "before", out)
        before_path.write_text(json.dumps(before, indent=2) + "\n", encoding="utf-8")
    groups = shared_groups(cfg, k, out) if "offline" in modes else []
    rows = []
    seeds = seeds or [cfg.seed]
    for seed in seeds:
        for mode in modes:
            for arm in arms if seed == seeds[0] else [a for a in arms if a in seed_arms]:
                for weight in nll_weights:
                    arm_cfg = dataclasses.replace(cfg, nll_weight=weight)
                    tag = _tag({"mode": mode, "arm": arm, "nll_weight": weight, "seed": seed})
                    # The prompts and the sampled groups stay those of --seed; training takes ``seed``.
                    arm_cfg = dataclasses.replace(arm_cfg, seed=seed)
                    rows.append(run_arm(arm_cfg, arm, mode, groups, out / "arms" / tag, prompt_seed=cfg.seed))
                    print(table(before, rows[-1:], cfg.beta).splitlines()[-1], flush=True)
    comparison = comparisons(out, rows)
    text = markdown(before, rows, cfg.beta, comparison)
    (out / "results.md").write_text(text + "\n", encoding="utf-8")
    results = {"config": dataclasses.asdict(cfg), "k": k, "before": before, "arms": rows,
               "comparison": comparison}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot_log_ratios(rows, cfg.beta, out / "log_ratios.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
