"""GDPO in the paper's regime: trained until it fits, measured after every epoch against three baselines.

From the embedded SmolLM2-135M-Instruct and the embedded opinion data (``grouppo data make-opinions``,
seed 0: 24 training and 8 test questions, each asked of 4 populations whose belief distributions
differ), as pre-registered in docs/preregistration.md:

* ``sft``: TRL's ``SFTTrainer`` on ``sft_train`` (every belief equally often: the format, not the
  distribution), 1 epoch, lr 5e-5, 8 records a step; the start of every arm below and its reference;
* ``gdpo``: ``GDPOTrainer`` on ``train`` (the ``grouppo gdpo`` defaults: beta 0.1, weights 1/1/1,
  renormalized calibration), 4 question x population groups a step, lr 5e-5 constant;
* ``dpo``: DPO (``GroupDPOTrainer``, K = 2 ``all_pairs``) on ``dpo_train`` (the more widely held belief's
  answer preferred), 4 pairs a step, lr 5e-6 constant (at 5e-5 DPO loses the response format);
* ``gdpo_calibration``: GDPO with only its calibration term (weights 1/0/0): whether the calibration
  alone moves the belief distribution where full GDPO does (run when GDPO does not fit);
* ``gdpo_lr2e-4``: full GDPO at lr 2e-4, 4 times the plan's (exploratory: whether it fits further when
  it trains faster).

Each arm trains for up to ``--max_epochs`` (20) epochs and stops early when its mean JS distance on the
training questions has not fallen 0.005 below its best for 3 epochs in a row (a constant learning rate,
so a shorter run is the first epochs of a longer one). After every epoch (and for ``sft`` and the
untrained model once) the model's belief probabilities on every training and test question are written,
one record per (model, epoch, question, population). After the last epoch, beliefs are sampled (32 per
question) and 2 answers generated after the sampled prefixes: the belief-consistency check.

``--export DIR`` gathers the records (``beliefs.jsonl.gz``, ``samples.jsonl.gz``, ``training.json``,
``environment.json``) and ``report`` rebuilds DIR/results.md from them alone
(``experiments/recompute.py``): the learning curves, and the final models against the uniform
distribution, the pooled distribution (the population-blind mean of the four populations' targets on the
question) and the population prior (the population's mean distribution over the training questions with
as many options; it knows nothing of the question), with JS distance and two collapse measures that are
not capped (entropy relative to the target's, and the mass on the pooled favourite). ``--compare A B``
prints how far two exported runs' belief records agree, (model, epoch) by (model, epoch): the same arms
trained on two machines, say. The run in docs/results.md:

    .venv/bin/python experiments/gdpo_curve.py --out runs/gdpo_curve --arms gdpo dpo
    .venv/bin/python experiments/gdpo_curve.py --out runs/gdpo_curve --export experiments/results/gdpo_curve
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from if_groups import (  # noqa: E402
    checkpointing,
    read_gz,
    resumable_checkpoint,
    same_kernels,
    write_gz,
    write_json,
)

PLAN = "docs/preregistration.md"
SPLITS = ("train", "test")
SEED = 0
PATIENCE, MIN_IMPROVEMENT = 3, 0.005  # the plan's stopping rule
PREFIX_TOKENS = "belief_prefix_tokens.json"  # a results file: see ``prefix_tokens``


@dataclass(frozen=True)
class Arm:
    trainer: str  # "gdpo" or "dpo"
    learning_rate: float
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # calibration, preference, belief NLL (GDPO)
    about: str = ""  # what a follow-up arm varies, for the report


ARMS = {
    "gdpo": Arm("gdpo", 5e-5),
    "dpo": Arm("dpo", 5e-6),
    "gdpo_calibration": Arm("gdpo", 5e-5, (1.0, 0.0, 0.0), "the calibration term alone"),
    "gdpo_lr2e-4": Arm("gdpo", 2e-4, about="full GDPO at 4 times the learning rate"),
}


def _common(out: Path, seed: int) -> dict[str, Any]:
    return {
        "output_dir": str(out / "checkpoints"),
        "lr_scheduler_type": "constant",
        "logging_steps": 6,
        "save_strategy": "no",
        "report_to": [],
        "seed": seed,
        "disable_tqdm": True,
    }


def questions(data: Path) -> dict[str, list[dict[str, Any]]]:
    """One belief record per (question, population) of each split."""
    from grouppo.gdpo.beliefs import unique_questions
    from grouppo.load import load_records

    return {split: unique_questions(load_records(str(data / f"{split}.jsonl"))) for split in SPLITS}


def belief_rows(
    model: Any, tokenizer: Any, qs: dict[str, list[dict]], name: str, epoch: int, seed: int
) -> list:
    """The model's renormalized belief distribution on every question of every split, one record each."""
    from grouppo.gdpo.beliefs import belief_probabilities

    rows = []
    for split, records in qs.items():
        probabilities = belief_probabilities(model, tokenizer, records)
        for q, probs in zip(records, probabilities, strict=True):
            rows.append(
                {
                    "model": name,
                    "seed": seed,
                    "epoch": epoch,
                    "split": split,
                    "question_id": q["question_id"],
                    "population": q["population"],
                    "beliefs": q["beliefs"],
                    "target": q["distribution"],
                    "probabilities": probs,
                }
            )
    return rows


def mean_js(rows: Sequence[dict[str, Any]], split: str) -> float:
    from scipy.spatial.distance import jensenshannon

    values = [float(jensenshannon(r["target"], r["probabilities"])) for r in rows if r["split"] == split]
    return sum(values) / len(values)


def train_sft(data: Path, out: Path, model_name: str | None, seed: int) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from grouppo.load import load_records
    from grouppo.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_name)
    config = SFTConfig(
        **_common(out, seed),
        learning_rate=5e-5,
        num_train_epochs=1.0,
        per_device_train_batch_size=8,
        max_length=256,
        completion_only_loss=True,
        bf16=False,
    )
    trainer = SFTTrainer(
        load_model(model_name),
        args=config,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(load_records(str(data / "sft_train.jsonl"))),
    )
    trainer.train()
    trainer.save_model(str(out / "model"))
    tokenizer.save_pretrained(str(out / "model"))


def see_epoch(history: dict[str, Any], epoch: int, js: float, args: argparse.Namespace) -> bool:
    """Update the stopping rule's ``history`` with an epoch's training JS; True when training stops."""
    history["epochs"] = epoch
    if js < history["best"] - args.min_improvement:
        history["best"], history["since_best"] = js, 0
        return False
    history["since_best"] += 1
    if history["since_best"] < args.patience:
        return False
    history["stopped"] = f"training JS not {args.min_improvement} below its best for {args.patience} epochs"
    return True


def rule_stop(curve: Sequence[float]) -> int | None:
    """The epoch at which the plan's stopping rule ends an arm whose training JS after epochs 1, 2, ... is
    ``curve`` (None if it runs through them all): how the report tells an arm trained past the rule."""
    history = {"best": math.inf, "since_best": 0}
    rule = argparse.Namespace(patience=PATIENCE, min_improvement=MIN_IMPROVEMENT)
    for epoch, js in enumerate(curve, start=1):
        if see_epoch(history, epoch, js, rule):
            return epoch
    return None


def train_arm(
    name: str,
    data: Path,
    start: Path,
    out: Path,
    qs: dict,
    args: argparse.Namespace,
    callbacks: Sequence[Any] = (),
) -> None:
    """Train arm ``name`` from the SFT model epoch by epoch, writing the belief records after each.

    A checkpoint is kept after every epoch (and where a signal stops the run); a run cut short (a
    restarted machine) resumes from the newest complete one, with the records and the stopping rule's
    state of the epochs up to it (resuming is exact: ``tests/apps/test_experiments.py``); the checkpoints
    are removed once ``out/training.json`` is written."""
    import shutil

    from transformers import TrainerCallback

    from grouppo.gdpo.trainer import GDPOConfig, GDPOTrainer
    from grouppo.groupdpo import GroupDPOConfig, GroupDPOTrainer
    from grouppo.load import load_records
    from grouppo.models import load_model, load_tokenizer

    arm = ARMS[name]
    tokenizer = load_tokenizer(str(start))
    common = {
        **_common(out, args.seed),
        "save_strategy": "epoch",
        "save_total_limit": 2,  # the newer can be cut short by a kill, the older then resumed from
        "learning_rate": arm.learning_rate,
        "num_train_epochs": args.max_epochs,
        "beta": 0.1,
        "precompute_ref_logps": True,
        "max_length": 256,
        "per_device_train_batch_size": 4,
        "response_chunk_size": None,
    }
    if arm.trainer == "dpo":
        config, trainer_class, file = (
            GroupDPOConfig(**common, loss_type="all_pairs"),
            GroupDPOTrainer,
            "dpo_train",
        )
    else:
        c, p, n = arm.weights
        config = GDPOConfig(**common, calibration_weight=c, preference_weight=p, belief_nll_weight=n)
        trainer_class, file = GDPOTrainer, "train"
    history = {"best": math.inf, "since_best": 0, "stopped": "max_epochs", "epochs": 0}
    records: list[dict[str, Any]] = []
    stopped = False
    checkpoint, elapsed = resumable_checkpoint(config.output_dir)
    if checkpoint:  # replay the epochs up to the checkpoint
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        done = math.floor(state["epoch"] + 1e-9)  # a checkpoint saved on a signal can fall mid-epoch
        records = [r for r in read_gz(out / "beliefs.jsonl.gz") if r["epoch"] <= done]
        for epoch in range(1, done + 1):
            js = mean_js([r for r in records if r["epoch"] == epoch], "train")
            stopped = see_epoch(history, epoch, js, args)
        print(f"[{name}] resuming from {checkpoint} (epoch {done})", flush=True)
    start_time = time.perf_counter()

    class EveryEpoch(TrainerCallback):
        def on_epoch_end(
            self, targs: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
        ) -> None:
            if abs(state.epoch - round(state.epoch)) > 1e-6:  # a signal stopped it mid-epoch: no epoch ended
                return
            epoch = round(state.epoch)
            rows = belief_rows(model, tokenizer, qs, name, epoch, args.seed)
            records.extend(rows)
            write_gz(records, out / "beliefs.jsonl.gz")
            js = mean_js(rows, "train")
            print(f"[{name}] epoch {epoch}: JS train {js:.3f}, test {mean_js(rows, 'test'):.3f}", flush=True)
            if see_epoch(history, epoch, js, args):
                control.should_training_stop = True

    if stopped:  # the rule had stopped the run at the checkpoint: its model is the arm's
        model = load_model(checkpoint)
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        steps, log_history = state["global_step"], state["log_history"]
    else:
        trainer = trainer_class(
            load_model(str(start)),
            args=config,
            processing_class=tokenizer,
            callbacks=[EveryEpoch(), checkpointing(elapsed), *callbacks],
            train_dataset=load_records(str(data / f"{file}.jsonl")),
        )
        trainer.train(resume_from_checkpoint=checkpoint)
        model = trainer.accelerator.unwrap_model(trainer.model)
        steps, log_history = trainer.state.global_step, trainer.state.log_history
    trained = elapsed + time.perf_counter() - start_time
    write_gz(sample_rows(model, tokenizer, qs, name, history["epochs"], args), out / "samples.jsonl.gz")
    info = {
        "arm": name,
        "seed": args.seed,
        **asdict(arm),
        **history,
        "steps": steps,
        "resumed_from": checkpoint and Path(checkpoint).name,
        "train_seconds": round(trained, 1),
        "seconds": round(elapsed + time.perf_counter() - start_time, 1),
        "log_history": log_history,
    }
    write_json(info, out / "training.json")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def sample_rows(
    model: Any, tokenizer: Any, qs: dict, name: str, epoch: int, args: argparse.Namespace
) -> list:
    """Beliefs sampled from the model and answers generated after their prefixes, judged for consistency."""
    import torch

    from grouppo.embedded.opinions import label_judge
    from grouppo.gdpo.beliefs import BeliefSampling, generate_with_beliefs
    from grouppo.generation import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0, batch_size=32, seed=args.seed)
    rows = []
    for split, records in qs.items():
        torch.manual_seed(args.seed)
        settings = BeliefSampling(mode="belief", samples=32, answers=2)
        results = generate_with_beliefs(model.eval(), tokenizer, records, settings, sampling)
        for q, result in zip(records, results, strict=True):
            generations = [
                {**g, "consistent": bool(label_judge(g["response"], q["beliefs"], g["belief"]))}
                for g in result["generations"]
            ]
            rows.append(
                {
                    "model": name,
                    "seed": args.seed,
                    "epoch": epoch,
                    "split": split,
                    "question_id": q["question_id"],
                    "population": q["population"],
                    "sampled": result["sampled"],
                    "generations": generations,
                }
            )
    return rows


def run(args: argparse.Namespace) -> None:
    from grouppo.embedded.opinions import write_opinions
    from grouppo.environment import describe_environment, hardware_line
    from grouppo.models import load_model, load_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env_path = out / "environment.json"
    envs = json.loads(env_path.read_text()) if env_path.exists() else []
    now = describe_environment()
    if envs and not same_kernels(envs[0], now):
        raise SystemExit(
            f"{out} was started on {hardware_line(envs[0])}; this machine is {hardware_line(now)}: "
            "continue it on such a machine, or use a new --out."
        )
    envs.append(
        {
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "arms": args.arms,
            "max_epochs": args.max_epochs,
            **now,
        }
    )
    env_path.write_text(json.dumps(envs, indent=1) + "\n", encoding="utf-8")
    data = out / "data"
    write_opinions(data, seed=0)
    qs = questions(data)
    for name, path in (("untrained", args.model), ("sft", None)):
        if (out / name / "beliefs.jsonl.gz").exists():
            continue
        if name == "sft":
            start = time.perf_counter()
            train_sft(data, out / "sft", args.model, args.seed)
            path = str(out / "sft" / "model")
            (out / "sft" / "training.json").write_text(
                json.dumps(
                    {"arm": "sft", "seed": args.seed, "seconds": round(time.perf_counter() - start, 1)}
                )
                + "\n"
            )
        model, tokenizer = load_model(path), load_tokenizer(path)
        write_gz(belief_rows(model, tokenizer, qs, name, 0, args.seed), out / name / "beliefs.jsonl.gz")
        print(
            f"[{name}] JS train {mean_js(read_gz(out / name / 'beliefs.jsonl.gz'), 'train'):.3f}", flush=True
        )
    if not (out / "sft" / "samples.jsonl.gz").exists():
        path = str(out / "sft" / "model")
        write_gz(
            sample_rows(load_model(path), load_tokenizer(path), qs, "sft", 0, args),
            out / "sft" / "samples.jsonl.gz",
        )
    for name in args.arms:
        if not (out / name / "training.json").exists():
            (out / name).mkdir(parents=True, exist_ok=True)
            train_arm(name, data, out / "sft" / "model", out / name, qs, args)


# ------------------------------------------------------------------------------------------ export


def prefix_tokens(out: Path) -> list[dict[str, Any]]:
    """Per (split, question, population), how many tokens GDPO's trainer scores in each belief's prefix row
    (its belief NLL is the per-token mean over that row), tokenized as the arms were: the records the
    report needs for ``objective_optimum``."""
    from grouppo.load import load_records
    from grouppo.models import load_tokenizer
    from grouppo.tokenize import BELIEF_ROW, tokenize_belief_record

    tokenizer = load_tokenizer(str(out / "sft" / "model"))
    rows, seen = [], set()
    for split in SPLITS:
        for r in load_records(str(out / "data" / f"{split}.jsonl")):
            key = (split, r["question_id"], r["population"])
            if key in seen:
                continue
            seen.add(key)
            t = tokenize_belief_record(r, tokenizer)
            tokens = [
                sum(m) for m, role in zip(t["score_mask"], t["role"], strict=True) if role == BELIEF_ROW
            ]
            rows.append({"split": split, "question_id": key[1], "population": key[2], "tokens": tokens})
    return rows


def export(out: Path, results: Path) -> None:
    """Gather every model's records under ``out`` into ``results``, report and plot the curves."""
    results.mkdir(parents=True, exist_ok=True)
    beliefs, samples, training = [], [], []
    for name in ("untrained", "sft", *ARMS):
        if not (out / name / "beliefs.jsonl.gz").exists():
            continue
        beliefs += read_gz(out / name / "beliefs.jsonl.gz")
        if (out / name / "samples.jsonl.gz").exists():
            samples += read_gz(out / name / "samples.jsonl.gz")
        if (out / name / "training.json").exists():
            training.append(json.loads((out / name / "training.json").read_text()))
    write_gz(beliefs, results / "beliefs.jsonl.gz")
    write_gz(samples, results / "samples.jsonl.gz")
    (results / "training.json").write_text(json.dumps(training, indent=1) + "\n", encoding="utf-8")
    (results / "environment.json").write_text((out / "environment.json").read_text(), encoding="utf-8")
    write_json(prefix_tokens(out), results / PREFIX_TOKENS)
    from recompute import write_table  # the table as recompute.py rebuilds it

    write_table(results, report)
    plot_curves(beliefs, results / "curves.png")


# ------------------------------------------------------------------------------------------ the report


def baselines(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, int, str], dict[str, list[float]]]:
    """Per (split, question, population): the uniform, pooled and population-prior distributions.

    pooled: the mean of the four populations' targets on the question (it knows the question, not the
    population). population prior: the mean of the population's targets over the training questions with
    as many options (it knows the population, not the question); where no training question has that
    many, the training distributions are resampled onto the options' relative positions."""
    import numpy as np

    targets = {(r["split"], r["question_id"], r["population"]): r["target"] for r in rows}
    by_question: dict[tuple[str, int], list[list[float]]] = defaultdict(list)
    for (split, q, _), target in targets.items():
        by_question[(split, q)].append(target)
    train = defaultdict(list)
    for (split, _, population), target in targets.items():
        if split == "train":
            train[population].append(target)

    def prior(population: str, k: int) -> list[float]:
        same = [t for t in train[population] if len(t) == k]
        if same:
            return list(np.mean(same, axis=0))
        grid = np.linspace(0, 1, k)
        curves = [np.interp(grid, np.linspace(0, 1, len(t)), t) for t in train[population]]
        mean = np.mean(curves, axis=0)
        return list(mean / mean.sum())

    out = {}
    for (split, q, population), target in targets.items():
        k = len(target)
        out[(split, q, population)] = {
            "uniform": [1.0 / k] * k,
            "pooled": list(np.mean(by_question[(split, q)], axis=0)),
            "population prior": prior(population, k),
        }
    return out


def measures(target: Sequence[float], probs: Sequence[float], pooled: Sequence[float]) -> dict[str, float]:
    """JS distance, the majority bias (capped at 1 / p_top), the entropy of the model's distribution and
    of the target (their ratio over many prompts, the sums' ratio, is the relative entropy: below 1,
    more concentrated than the populations) and the mass on the pooled favourite (the option most held
    over all populations; the target's own mass there is ``target_on_pooled_top``)."""
    from scipy.spatial.distance import jensenshannon

    def entropy(p: Sequence[float]) -> float:
        return -sum(x * math.log(x) for x in p if x > 0)

    top = max(range(len(target)), key=lambda i: target[i])
    favourite = max(range(len(pooled)), key=lambda i: pooled[i])
    return {
        "js": float(jensenshannon(target, probs)),
        "majority_bias": probs[top] / target[top],
        "entropy": entropy(probs),
        "target_entropy": entropy(target),
        "pooled_top_mass": probs[favourite],
        "target_on_pooled_top": target[favourite],
    }


def objective_optimum(
    target: Sequence[float], tokens: Sequence[int], calibration_weight: float = 1.0, nll_weight: float = 1.0
) -> list[float]:
    """The belief distribution at which GDPO's calibration and belief-NLL terms are lowest together, for a
    (question, population) group holding one record per belief, as the embedded data do.

    The calibration term is ``KL(p* || q)``; the belief NLL is minus the per-token mean log-prob of each
    record's belief prefix (``tokens[b]`` tokens), averaged over the group's K records: with all the mass on
    the K prefixes, ``-(1/K) sum_b log q_b / L_b``. It pulls towards every belief alike, so the sum is
    lowest at ``q_b ∝ c p*_b + n / (K L_b)``, not at the target (the preference term scores the answer
    after a shared prefix and does not move ``q``). ``tests/apps/test_experiments.py`` checks this against
    ``grouppo.losses.gdpo_loss`` minimized numerically."""
    k = len(target)
    raw = [calibration_weight * p + nll_weight / (k * n) for p, n in zip(target, tokens, strict=True)]
    return [x / sum(raw) for x in raw]


def _mean_interval(values: Sequence[float]) -> str:
    from grouppo.intervals import ratio_interval

    low, high = ratio_interval(values)
    return f"{sum(values) / len(values):.3f} [{low:.3f}, {high:.3f}]"


def _relative_entropy(mine: Sequence[dict[str, float]]) -> tuple[float, list[float]]:
    """The model's summed entropy over the targets' (a ratio of sums: near one-hot targets cannot dominate
    it, as they would a mean of per-prompt ratios) and its 95% bootstrap interval over prompts."""
    from grouppo.intervals import ratio_interval

    num, den = [m["entropy"] for m in mine], [m["target_entropy"] for m in mine]
    return sum(num) / sum(den), list(ratio_interval(num, den))


def _paired(base: Sequence[float], values: Sequence[float]) -> dict[str, Any]:
    """``values - base`` over the same prompts in the same order, with its paired 95% interval."""
    from grouppo.intervals import paired_difference

    ones = [1.0] * len(values)
    return paired_difference((list(base), ones), (list(values), ones))


def _difference(
    base: Sequence[float], values: Sequence[float], closer: tuple[str, str] = ("closer", "further")
) -> str:
    d = _paired(base, values)
    low, high = d["interval"]
    mark = "" if d["includes_zero"] else f" {closer[0] if d['difference'] < 0 else closer[1]}"
    return f"{d['difference']:+.3f} [{low:+.3f}, {high:+.3f}]{mark}"


def readings_section(
    readings: dict[str, dict[str, Any]], past_rule: dict[str, int] | None = None
) -> list[str]:
    """The pre-registered readings (docs/preregistration.md, section 3) on the training questions, each
    stated with the figures it rests on and whether it holds. ``past_rule`` names the arms trained past
    the plan's stopping rule, with the epoch where it stops them: their readings at their last epoch are
    exploratory, and at the rule's epoch (``readings["<arm> @ <epoch>"]``) they are the plan's own."""
    past_rule = past_rule or {}

    def interval(d: dict[str, Any]) -> str:
        low, high = d["interval"]
        return f"{d['difference']:+.3f} [{low:+.3f}, {high:+.3f}]"

    def below(d: dict[str, Any] | None) -> bool:
        return d is not None and d["interval"][1] < 0

    def above(d: dict[str, Any] | None) -> bool:
        return d is not None and d["interval"][0] > 0

    def gdpo(r: dict[str, Any]) -> tuple[str, bool]:
        learns = below(r["js_vs_prior"])
        weaker = below(r["js_vs_uniform"]) and below(r["js_vs_sft"])
        return (
            f"JS - population prior {interval(r['js_vs_prior'])}: "
            f"**{'holds' if learns else 'does not hold'}**. The weaker reading (below uniform and SFT): "
            f"JS - uniform {interval(r['js_vs_uniform'])}, JS - sft "
            f"{interval(r['js_vs_sft']) if r['js_vs_sft'] else 'n/a'}: "
            f"**{'holds' if weaker else 'does not hold'}**",
            learns,
        )

    def dpo(r: dict[str, Any]) -> tuple[str, bool]:
        value, (low, high) = r["relative_entropy"]
        collapses = high < 1 and above(r["mass_vs_targets"]) and above(r["mass_vs_sft"])
        return (
            f"relative entropy {value:.3f} [{low:.3f}, {high:.3f}], mass - targets' "
            f"{interval(r['mass_vs_targets'])}, mass - sft's "
            f"{interval(r['mass_vs_sft']) if r['mass_vs_sft'] else 'n/a'}: "
            f"**{'holds' if collapses else 'does not hold'}**",
            collapses,
        )

    claims = {
        "gdpo": (gdpo, "**GDPO learns each population's distribution** (JS below the population prior's, "
                 "interval excluding 0)"),
        "dpo": (dpo, "**DPO collapses** (relative entropy below 1, and more mass on the pooled favourite "
                "than the targets and than SFT, each interval excluding the value)"),
    }  # fmt: skip
    out = ["", "## Readings (pre-registered, training questions, final models)", ""]
    for name, (reading, claim) in claims.items():
        if name not in readings:
            continue
        text, holds = reading(readings[name])
        if name in past_rule:
            epoch = past_rule[name]
            at_rule, _ = reading(readings[f"{name} @ {epoch}"])
            out.append(
                f"- {claim}. Exploratory: this arm trained past the plan's stopping rule, which ends it at "
                f"epoch {epoch}. At its last epoch: {text}. At epoch {epoch}, as the plan reads it: "
                f"{at_rule}."
            )
        else:
            out.append(f"- {claim}: {text}.")
        if name == "gdpo" and not holds and name not in past_rule:  # the plan's follow-up
            ran = "gdpo_calibration" in readings
            out.append(
                "- The plan's follow-up when GDPO does not beat the population prior, the calibration term "
                f"alone (`--arms gdpo_calibration`): **{'run, below' if ran else 'not run yet'}**."
            )

    def figures(r: dict[str, Any]) -> str:
        sft = interval(r["js_vs_sft"]) if r["js_vs_sft"] else "n/a"
        gdpo = interval(r["js_vs_gdpo"]) if r.get("js_vs_gdpo") else "n/a"
        epoch = f" (epoch {r['gdpo_epoch']})" if r.get("js_vs_gdpo") and r.get("gdpo_epoch") else ""
        return (
            f"JS - population prior {interval(r['js_vs_prior'])}, JS - uniform "
            f"{interval(r['js_vs_uniform'])}, JS - sft {sft}, JS - full GDPO{epoch} {gdpo}"
        )

    for name, arm in ARMS.items():  # the follow-up arms: the same figures, no claim of their own
        if name in claims or name not in readings:
            continue
        text = f"- `{name}` ({arm.about}): {figures(readings[name])}"
        if name in past_rule:
            epoch = past_rule[name]
            text += f" at its last epoch; at epoch {epoch}, where the plan's rule ends it: "
            text += figures(readings[f"{name} @ {epoch}"])
        out.append(text + ".")
    return out if len(out) > 3 else []


def optimum_section(
    results: Path,
    rows: Sequence[dict[str, Any]],
    measured: Any,
    at: Any,
    last: dict[str, int],
    training: dict,
) -> list[str]:
    """Explanatory, not pre-registered: how far from the targets full GDPO's own objective is lowest on
    these data (``objective_optimum``), against the population prior and full GDPO's final model (the
    calibration term alone is lowest at the target: its JS distance is its distance from its optimum)."""
    path = results / PREFIX_TOKENS
    if not path.exists() or "gdpo" not in training:
        return []
    tokens = {
        (r["split"], r["question_id"], r["population"]): r["tokens"] for r in json.loads(path.read_text())
    }
    c, _, n = training["gdpo"]["weights"]
    scaled = ("p*_b" if c == 1 else f"{c:g} p*_b") + " + " + ("1" if n == 1 else f"{n:g}") + " / (K L_b)"
    reference = next(iter(dict.fromkeys(r["model"] for r in rows)))
    out = [
        "",
        "## Where full GDPO's objective is lowest (explanatory, not pre-registered)",
        "",
        "Each (question, population) here holds one training record per belief, so GDPO's belief NLL (the "
        "per-token mean log-prob of each record's belief prefix) pulls towards every belief alike. With "
        f"the calibration term (weights {c:g} and {n:g}) the objective is lowest at q_b ∝ {scaled}, "
        f"L_b the prefix's tokens ({PREFIX_TOKENS}), not at the target (on the test "
        "questions: where it would be lowest had they been trained on); the calibration "
        "term alone is lowest at the target. The preference term scores the answer after a shared prefix "
        "and does not move the belief distribution.",
        "",
        f"| split | JS of the optimum | optimum - population prior | gdpo ({last['gdpo']}) - optimum |",
        "|---|---:|---:|---:|",
    ]
    for split in SPLITS:
        ref = at(reference, 0, split)
        optimum = [
            {
                **r,
                "probabilities": objective_optimum(
                    r["target"], tokens[(split, r["question_id"], r["population"])], c, n
                ),
            }
            for r in ref
        ]
        js = [m["js"] for m in measured(optimum)]
        prior = [m["js"] for m in measured(ref, "population prior")]
        gdpo = [m["js"] for m in measured(at("gdpo", last["gdpo"], split))]
        cells = [_mean_interval(js), _difference(prior, js), _difference(js, gdpo)]
        out.append(f"| {split} | " + " | ".join(cells) + " |")
    return out


def report(results: Path) -> str:
    """results.md from the records alone: learning curves, final models against the baselines, collapse
    measures per population, belief consistency and the per-term losses."""
    from grouppo.environment import hardware_line

    rows = read_gz(results / "beliefs.jsonl.gz")
    samples = read_gz(results / "samples.jsonl.gz")
    training = {t["arm"]: t for t in json.loads((results / "training.json").read_text())}
    envs = json.loads((results / "environment.json").read_text())
    base = baselines(rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    last = {m: max(r["epoch"] for r in rows if r["model"] == m) for m in models}
    for m in models:  # an arm still training (or cut short) has no training.json: its last epoch is not final
        if m not in ("untrained", "sft") and (m not in training or training[m]["epochs"] != last[m]):
            raise ValueError(f"{m}: records up to epoch {last[m]} but no finished training.json agrees")

    def at(model: str, epoch: int, split: str) -> list[dict[str, Any]]:
        """The model's records of an epoch and split, one per (question, population), in one order: every
        model's must be the same prompts, each once (ValueError otherwise), so that pairing by position
        pairs the same prompts."""
        found = sorted(
            (r for r in rows if r["model"] == model and r["epoch"] == epoch and r["split"] == split),
            key=lambda r: (r["question_id"], r["population"]),
        )
        keys = [(r["question_id"], r["population"]) for r in found]
        expected = sorted({(q, p) for (s_, q, p) in base if s_ == split})
        if keys != expected:
            raise ValueError(f"{model}, epoch {epoch}, {split}: not one record per (question, population)")
        return found

    def measured(model_rows: Sequence[dict[str, Any]], baseline: str | None = None) -> list[dict[str, float]]:
        out = []
        for r in model_rows:
            b = base[(r["split"], r["question_id"], r["population"])]
            out.append(measures(r["target"], b[baseline] if baseline else r["probabilities"], b["pooled"]))
        return out

    lines = [
        "# GDPO until it fits: results",
        "",
        f"Plan: {PLAN}. Recompute: `python experiments/recompute.py`.",
        "",
        "Hardware: " + "; ".join(sorted({hardware_line(e) for e in envs})) + ".",
        "",
        "JS distance: scipy's `jensenshannon` (natural log, 0 to 0.833) between a population's target "
        "and the model's renormalized belief probabilities, per (question, population), averaged. "
        "Intervals: 95% bootstrap over (question, population) prompts, paired where two models are "
        "compared; the four populations of a question count as separate prompts. The population prior "
        "is fitted on the training questions, so on those it includes each question's own target (for "
        "the one 5- and one 6-option question, it is that target): a baseline harder to beat there.",
        "",
    ]

    # Learning curves, and where the plan's stopping rule ends each trained arm.
    targets_mass = [m["target_on_pooled_top"] for m in measured(at(models[0], 0, "train"))]
    lines += [
        "## Learning curves",
        "",
        "Mean JS distance; on the training questions also the relative entropy and the mass on the pooled "
        "favourite (the collapse measures; the targets': 1 and "
        f"{sum(targets_mass) / len(targets_mass):.3f}).",
        "",
        "| model | epoch | train questions | test questions | train: relative entropy "
        "| train: mass on pooled favourite |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    plan_epoch: dict[str, int] = {}  # where the plan reads each model: its rule's epoch, else its last
    for model in models:
        epochs = sorted({r["epoch"] for r in rows if r["model"] == model})
        curve = []
        for epoch in epochs:
            mine = {s: measured(at(model, epoch, s)) for s in SPLITS}
            js = [sum(m["js"] for m in mine[s]) / len(mine[s]) for s in SPLITS]
            mass = sum(m["pooled_top_mass"] for m in mine["train"]) / len(mine["train"])
            entropy = sum(m["entropy"] for m in mine["train"]) / sum(
                m["target_entropy"] for m in mine["train"]
            )
            curve += [js[0]] if epoch >= 1 else []
            lines.append(f"| {model} | {epoch} | {js[0]:.3f} | {js[1]:.3f} | {entropy:.3f} | {mass:.3f} |")
        stop = rule_stop(curve) if model not in ("untrained", "sft") else None
        plan_epoch[model] = last[model] if stop is None else stop
    past_rule = {m: e for m, e in plan_epoch.items() if e < last[m]}  # trained past the rule's stop
    for name in ("uniform", "pooled", "population prior"):
        js = [
            sum(m["js"] for m in measured(at(models[0], 0, s), name)) / len(at(models[0], 0, s))
            for s in SPLITS
        ]
        lines.append(f"| ({name}) | | {js[0]:.3f} | {js[1]:.3f} | | |")
    finals = [(m, e) for m in models for e in sorted({last[m], past_rule.get(m, last[m])})]
    if past_rule:
        lines += [
            "",
            "Trained past the plan's stopping rule (exploratory): "
            + ", ".join(f"{m} (the rule ends it at epoch {e})" for m, e in past_rule.items())
            + "; the tables below give it at that epoch and at its last.",
        ]

    # Final models against the baselines.
    readings: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        lines += [
            "",
            f"## Final models, {split} questions",
            "",
            "| model (epoch) | JS [95% CI] | JS - population prior | JS - pooled | JS - uniform | JS - sft "
            "| relative entropy | mass on pooled favourite | mass - targets' | mass - sft's "
            "| majority bias |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        sft_measures = measured(at("sft", 0, split)) if "sft" in models else None
        sft = [m["js"] for m in sft_measures] if sft_measures else None
        reference = at(models[0], 0, split)
        target_mass = [m["target_on_pooled_top"] for m in measured(reference)]
        baseline_js = {
            name: [m["js"] for m in measured(reference, name)]
            for name in ("population prior", "pooled", "uniform")
        }

        def entropy_cell(mine: Sequence[dict[str, float]]) -> str:
            value, (low, high) = _relative_entropy(mine)
            return f"{value:.3f} [{low:.3f}, {high:.3f}]"

        for model, epoch in finals:
            mine = measured(at(model, epoch, split))
            js, mass = [m["js"] for m in mine], [m["pooled_top_mass"] for m in mine]
            more = ("less", "more")
            cells = [
                _mean_interval(js),
                *(_difference(baseline_js[n], js) for n in baseline_js),
                _difference(sft, js) if sft and model != "sft" else "",
                entropy_cell(mine),
                _mean_interval(mass),
                _difference(target_mass, mass, more),
                _difference([m["pooled_top_mass"] for m in sft_measures], mass, more)
                if sft_measures and model != "sft"
                else "",
                _mean_interval([m["majority_bias"] for m in mine]),
            ]
            key = model if epoch == last[model] else f"{model} @ {epoch}"
            note = ", the plan's stop" if epoch == past_rule.get(model) else ""
            lines.append(f"| {model} ({epoch}{note}) | " + " | ".join(cells) + " |")
            if split == "train":
                # A follow-up arm against full GDPO read the same way: both where the plan reads them,
                # or both at their last epoch (when this one trained past the rule).
                versus = None
                if "gdpo" in plan_epoch and model in ARMS and model != "gdpo":
                    versus = plan_epoch["gdpo"] if epoch == plan_epoch[model] else last["gdpo"]
                readings[key] = {
                    "js_vs_prior": _paired(baseline_js["population prior"], js),
                    "js_vs_gdpo": None
                    if versus is None
                    else _paired([m["js"] for m in measured(at("gdpo", versus, split))], js),
                    "gdpo_epoch": versus,
                    "js_vs_uniform": _paired(baseline_js["uniform"], js),
                    "js_vs_sft": _paired(sft, js) if sft and model != "sft" else None,
                    "relative_entropy": _relative_entropy(mine),
                    "mass_vs_targets": _paired(target_mass, mass),
                    "mass_vs_sft": _paired([m["pooled_top_mass"] for m in sft_measures], mass)
                    if sft_measures and model != "sft"
                    else None,
                }
        for name in baseline_js:
            b = measured(reference, name)
            mass = [m["pooled_top_mass"] for m in b]
            cells = [
                _mean_interval(baseline_js[name]),
                "",
                "",
                "",
                "",
                entropy_cell(b),
                _mean_interval(mass),
                _difference(target_mass, mass, ("less", "more")),
                "",
                _mean_interval([m["majority_bias"] for m in b]),
            ]
            lines.append(f"| ({name}) | " + " | ".join(cells) + " |")
        lines.append(f"| (the targets) | | | | | | 1 | {_mean_interval(target_mass)} | | | 1 |")

    lines += readings_section(readings, past_rule)
    lines += optimum_section(results, rows, measured, at, last, training)

    # Per population, final models.
    populations = sorted({r["population"] for r in rows})
    lines += [
        "",
        "## Per population, training questions (final models)",
        "",
        "JS distance / mass on the pooled favourite (the target's own mass there in the last row).",
        "",
        "| model | " + " | ".join(populations) + " |",
        "|---|" + "---:|" * len(populations),
    ]
    for model in [*models, "population prior", "pooled"]:
        baseline = model if model in ("population prior", "pooled") else None
        mine = measured(
            at(models[0] if baseline else model, 0 if baseline else last[model], "train"), baseline
        )
        pops = [
            r["population"]
            for r in at(models[0] if baseline else model, 0 if baseline else last[model], "train")
        ]
        cells = []
        for p in populations:
            sel = [m for m, q in zip(mine, pops, strict=True) if q == p]
            js, mass = (sum(m[key] for m in sel) / len(sel) for key in ("js", "pooled_top_mass"))
            cells.append(f"{js:.3f} / {mass:.3f}")
        lines.append(f"| {model if not baseline else f'({model})'} | " + " | ".join(cells) + " |")
    target = measured(at(models[0], 0, "train"))
    pops = [r["population"] for r in at(models[0], 0, "train")]
    on_top = [m["target_on_pooled_top"] for m in target]
    cells = []
    for p in populations:
        sel = [v for v, q in zip(on_top, pops, strict=True) if q == p]
        cells.append(f"0 / {sum(sel) / len(sel):.3f}")
    lines.append("| (the targets) | " + " | ".join(cells) + " |")

    # Sampled beliefs and answers.
    if samples:
        lines += [
            "",
            "## Sampled beliefs and answers (final models)",
            "",
            "| model | split | JS of 32 sampled beliefs | belief consistency of the answers |",
            "|---|---|---:|---:|",
        ]
        for model in dict.fromkeys(s["model"] for s in samples):
            for split in SPLITS:
                sel = [s for s in samples if s["model"] == model and s["split"] == split]
                targets = {
                    (r["question_id"], r["population"]): r["target"] for r in at(model, last[model], split)
                }
                js = []
                for s in sel:
                    t = targets[(s["question_id"], s["population"])]
                    hist = [s["sampled"].count(i) / len(s["sampled"]) for i in range(len(t))]
                    js.append(measures(t, hist, t)["js"])
                consistent = [g["consistent"] for s in sel for g in s["generations"]]
                lines.append(
                    f"| {model} | {split} | {_mean_interval(js)} | "
                    f"{sum(consistent) / len(consistent):.3f} ({len(consistent)} answers) |"
                )

    # Training.
    lines += [
        "",
        "## Training",
        "",
        "Loss: the mean of the steps logged in each epoch (one logged step is a few batches, too noisy to "
        "read alone); terms: their means over the last epoch.",
        "",
        "| arm | lr | weights | epochs | steps | stopped | seconds | loss by epoch | last epoch's terms |",
        "|---|---:|---|---:|---:|---|---:|---|---|",
    ]
    for name, t in training.items():
        if name == "sft":
            continue
        by_epoch: dict[int, list[dict[str, Any]]] = {}
        for h in t["log_history"]:
            if "loss" in h:
                by_epoch.setdefault(math.ceil(h["epoch"] - 1e-9), []).append(h)

        def mean(rows: list[dict[str, Any]], key: str) -> float:
            return sum(h[key] for h in rows) / len(rows)

        losses = ", ".join(f"{mean(by_epoch[e], 'loss'):.3f}" for e in sorted(by_epoch))
        last = by_epoch[max(by_epoch)] if by_epoch else []
        terms = ", ".join(
            f"{k} {mean(last, k):.3f}"
            for k in ("loss/calibration", "loss/preference", "loss/belief_nll", "rewards/accuracies")
            if last and all(k in h for h in last)
        )
        weights = "/".join(f"{w:g}" for w in t["weights"])
        lines.append(
            f"| {name} | {t['learning_rate']:g} | {weights if t['trainer'] == 'gdpo' else ''} | "
            f"{t['epochs']} | {t['steps']} | {t['stopped']} | {t['seconds']:.0f} | {losses} | {terms} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Mean JS distance per epoch per model, with the baselines as horizontal lines, per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = baselines(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    models = list(dict.fromkeys(r["model"] for r in rows))
    for ax, split in zip(axes, SPLITS, strict=True):
        for model in models:
            epochs = sorted({r["epoch"] for r in rows if r["model"] == model})
            js = [
                mean_js([r for r in rows if r["model"] == model and r["epoch"] == e], split) for e in epochs
            ]
            ax.plot(epochs, js, marker="o" if len(epochs) > 1 else "s", label=model)
        ref = [r for r in rows if r["model"] == models[0] and r["epoch"] == 0 and r["split"] == split]
        for name, style in (("uniform", ":"), ("pooled", "--"), ("population prior", "-.")):
            value = mean_js(
                [{**r, "probabilities": base[(split, r["question_id"], r["population"])][name]} for r in ref],
                split,
            )
            ax.axhline(value, color="grey", linestyle=style, label=f"({name})")
        ax.set_title(f"{split} questions")
        ax.set_xlabel("epoch")
    axes[0].set_ylabel("mean JS distance")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def across_runs(first: Path, second: Path) -> str:
    """How far two exported runs of the same arms (on two machines, say) agree: per (model, epoch) that both
    recorded, the largest absolute difference between their belief probabilities over every question and
    population, and each run's mean JS distance on the training questions. A markdown table."""
    runs = []
    for folder in (first, second):
        by_key: dict[tuple[str, int], dict[tuple[str, int, str], dict[str, Any]]] = defaultdict(dict)
        for r in read_gz(folder / "beliefs.jsonl.gz"):
            by_key[(r["model"], r["epoch"])][(r["split"], r["question_id"], r["population"])] = r
        runs.append(by_key)
    lines = [
        "| model | epoch | largest probability difference "
        f"| train JS ({first.name}) | train JS ({second.name}) |",
        "|---|---:|---:|---:|---:|",
    ]
    for key in (k for k in runs[0] if k in runs[1]):
        a, b = runs[0][key], runs[1][key]
        if a.keys() != b.keys():
            raise ValueError(f"{key}: the two runs recorded different questions or populations")
        largest = max(
            abs(x - y) for k in a for x, y in zip(a[k]["probabilities"], b[k]["probabilities"], strict=True)
        )
        js = [mean_js(list(run.values()), "train") for run in (a, b)]
        lines.append(f"| {key[0]} | {key[1]} | {largest:.2g} | {js[0]:.3f} | {js[1]:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gdpo_curve")
    p.add_argument("--model", default=None, help="starting model (default: the embedded one)")
    p.add_argument("--seed", type=int, default=SEED, help="training and sampling seed")
    p.add_argument("--arms", nargs="+", default=["gdpo", "dpo"], choices=list(ARMS))
    p.add_argument("--max_epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=PATIENCE)
    p.add_argument("--min_improvement", type=float, default=MIN_IMPROVEMENT)
    p.add_argument("--export", metavar="DIR", help="gather the records of --out into DIR and report")
    p.add_argument(
        "--compare", nargs=2, metavar="DIR", help="print how far two exported runs' belief records agree"
    )
    args = p.parse_args(argv)
    if args.compare:
        print(across_runs(*map(Path, args.compare)), end="")
        return 0
    if args.export:
        export(Path(args.out), Path(args.export))
        print((Path(args.export) / "results.md").read_text())
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
