"""Groups against pairs on instruction following, as pre-registered in docs/preregistration.md.

One design serves the three claims of the GroupDPO paper that this CPU can test:

* **groups vs pairs** (primary): best-vs-worst DPO against K = 8 GroupDPO on the same sampled pool,
  the same prompts and the same number of steps;
* **NLL on positives**: K = 8 GroupDPO with NLL weight 0, 0.2 (the primary arm) and 1.0, with the
  log-prob of held-out positives and negatives before and after training;
* **group size**: K = 2, 4, 8, 16 on the same prompts.

Per seed (the seed draws the sampled pool and the training order), 16 responses are sampled from the
starting model (bfloat16 where native, temperature 1, up to 128 new tokens) for each of 192 training
and 48 validation prompts (``make-if-prompts`` split ``train``, seed 0: the validation prompts are the
next 48 of the same draw) and scored with the ``ifeval`` reward (the strict fraction of a prompt's
instructions followed). Non-empty responses are kept in sampling order, except that the first response
whose score differs from the first one's is moved to second place: then the first K responses of every
prompt whose responses are not all tied hold a preference for every K >= 2, the views are nested
(K = 2 within 4 within 8 within 16) and every arm trains on the same prompts, in the same order, for
the same number of steps. ``dpo_best_worst`` takes the best and the worst of the first 8 (the first of
each on ties); the ``groupdpo_k*`` arms take the first K, labelled by ``top_bottom``.

Every model is evaluated greedily (up to 192 new tokens) on 500 held-out IFEval-style prompts (split
``eval``: requests never used in training) and all 294 IFBench test prompts, which no arm trains or
tunes on. Each stage writes its files under ``--out`` and is read back, not rerun, when they exist;
``--export DIR`` then gathers the raw per-prompt records into DIR (``generations.jsonl.gz``,
``pool.jsonl.gz``, ``heldout_logps.jsonl.gz``, ``training.json``, ``environment.json``) and ``report``
rebuilds every table of DIR/results.md from those files alone (``experiments/recompute.py``).

A run directory stays on the CPU it started on (bfloat16 results move with the kernels), ``--pool_from``
takes each seed's pool from an export instead of sampling it, and ``--restore DIR`` rebuilds a lost run
directory's finished stages from its export. The runs in docs/results.md, from the branch
``evidence-runs`` (the pre-registration commit and the changes of the plan's amendments 1 and 8):

    .venv/bin/python experiments/if_groups.py --out runs/if_groups --seeds 0 1 \\
        --arms dpo_best_worst groupdpo_k8
    .venv/bin/python experiments/if_groups.py --out runs/if_groups --export experiments/results/if_groups
    # section 2, on one CPU, on section 1's pools (amendment 8), one arm for both seeds at a time:
    for arm in groupdpo_k8 groupdpo_k8_nll0 groupdpo_k8_nll1 groupdpo_k2 groupdpo_k4 groupdpo_k16; do
        .venv/bin/python experiments/if_groups.py --out runs/if_groups_section2 --seeds 0 1 --arms $arm \\
            --pool_from experiments/results/if_groups
    done
    .venv/bin/python experiments/if_groups.py --out runs/if_groups_section2 \\
        --export experiments/results/if_groups_section2
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLAN = "docs/preregistration.md"


@dataclass(frozen=True)
class Arm:
    """What an arm trains on: the first ``k`` ordered responses, as a best-vs-worst pair or a group."""

    k: int
    view: str  # "best_worst" or "group"
    nll_weight: float


ARMS = {
    "dpo_best_worst": Arm(8, "best_worst", 0.2),
    "groupdpo_k8": Arm(8, "group", 0.2),
    "groupdpo_k8_nll0": Arm(8, "group", 0.0),
    "groupdpo_k8_nll1": Arm(8, "group", 1.0),
    "groupdpo_k2": Arm(2, "group", 0.2),
    "groupdpo_k4": Arm(4, "group", 0.2),
    "groupdpo_k16": Arm(16, "group", 0.2),
}
PRIMARY = ("dpo_best_worst", "groupdpo_k8")
NLL_ARMS = ("groupdpo_k8_nll0", "groupdpo_k8", "groupdpo_k8_nll1")
K_ARMS = ("groupdpo_k2", "groupdpo_k4", "groupdpo_k8", "groupdpo_k16")
K_PLANNED = [("groupdpo_k2", "groupdpo_k8"), ("groupdpo_k8", "groupdpo_k16")]  # the plan's expectation (A, B)
NLL_PAIRS = [(NLL_ARMS[0], NLL_ARMS[1]), (NLL_ARMS[0], NLL_ARMS[2]), (NLL_ARMS[1], NLL_ARMS[2])]  # (A, B)
START = "starting model"
BENCHMARKS = ("ifeval", "ifbench")
METRICS = ("instruction_level_strict", "prompt_level_strict", "instruction_level_loose", "prompt_level_loose")
PRIMARY_METRIC = ("ifeval", "instruction_level_strict")
MDE = 0.045  # the pre-registered minimum detectable effect: the margin of the decision rule


@dataclass(frozen=True)
class Design:
    """The pre-registered sizes and settings; the flags exist to test the script on a tiny model."""

    model: str | None = None
    train_prompts: int = 192
    validation_prompts: int = 48
    pool_size: int = 16
    eval_prompts: int = 500
    ifbench_prompts: int = 294
    max_new_tokens: int = 128
    eval_max_new_tokens: int = 192
    generation_batch_size: int = 64
    learning_rate: float = 2e-5
    batch_size: int = 2
    beta: float = 0.1
    max_length: int = 512
    reward: str = "ifeval"


def quickstart_config(design: Design, out: Path, seed: int, arm: Arm | None = None) -> Any:
    from grouppo.apps.quickstart import QuickstartConfig

    return QuickstartConfig(
        output_dir=str(out),
        model_name_or_path=design.model,
        seed=seed,
        train_prompts=design.train_prompts,
        eval_prompts=design.eval_prompts,
        ifbench_prompts=design.ifbench_prompts,
        num_generations=design.pool_size,
        max_completion_length=design.max_new_tokens,
        eval_max_new_tokens=design.eval_max_new_tokens,
        generation_batch_size=design.generation_batch_size,
        reward_funcs=design.reward,
        loss_type="all_pairs",
        positive_rule="top_bottom",
        beta=design.beta,
        nll_weight=arm.nll_weight if arm else 0.2,
        learning_rate=design.learning_rate,
        num_train_epochs=1.0,
        per_device_train_batch_size=design.batch_size,
        response_chunk_size=2,
        max_length=design.max_length,
    )


# ------------------------------------------------------------------------------------------ the views


def ordered(entry: dict[str, Any]) -> list[int] | None:
    """Indices of the pool entry's non-empty responses in sampling order, the first one scoring unlike the
    first moved to second place; None when fewer than two are left or all score the same."""
    kept = [i for i, text in enumerate(entry["responses"]) if text.strip()]
    scores = entry["scores"]
    differ = next((i for i in kept if scores[i] != scores[kept[0]]), None) if kept else None
    if differ is None:
        return None
    return [kept[0], differ, *(i for i in kept[1:] if i != differ)]


def arm_records(pool: Sequence[dict[str, Any]], arm: Arm, split: str = "train") -> list[dict[str, Any]]:
    """The group records arm ``arm`` trains on (``split`` "validation": the held-out groups it is
    scored on)."""
    records = []
    for entry in pool:
        order = ordered(entry) if entry["split"] == split else None
        if order is None:
            continue
        picked = order[: arm.k]
        scores = [entry["scores"][i] for i in picked]
        record = {"key": entry["key"], "prompt": entry["prompt"]}
        if arm.view == "best_worst":
            best = picked[scores.index(max(scores))]
            worst = picked[scores.index(min(scores))]
            picked, scores = [best, worst], [entry["scores"][best], entry["scores"][worst]]
            record["labels"] = [1, 0]
        record["responses"] = [entry["responses"][i] for i in picked]
        record["scores"] = scores
        records.append(record)
    return records


# ------------------------------------------------------------------------------------------ the stages


def write_gz(rows: Iterable[dict[str, Any]], path: Path) -> None:
    """One JSON line per row, gzipped without a time or name in the header, so that the same records give
    the same bytes (a re-export of unchanged records changes no committed file), written atomically."""
    import io

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as packed:
        with io.TextIOWrapper(packed, encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_json(value: Any, path: Path) -> None:
    """``value`` as JSON at ``path``, written whole or not at all (a kill mid-write leaves no stage)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_gz(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _models(design: Design) -> tuple[Any, Any]:
    import torch

    from grouppo.models import load_model, load_tokenizer, resolve_model

    name = resolve_model(design.model)
    return load_model(name, dtype=torch.float32), load_tokenizer(name)


def evaluate(model: Any, tokenizer: Any, design: Design, out: Path) -> None:
    """Greedy answers to the evaluation prompts, checked: ``out/eval_{benchmark}.jsonl.gz`` (a benchmark
    whose file exists is skipped)."""
    from grouppo.evaluation import benchmark_prompts, evaluate_instruction_following
    from grouppo.generation import SamplingConfig, TransformersGenerator

    sampling = SamplingConfig(
        max_new_tokens=design.eval_max_new_tokens, temperature=0.0, batch_size=design.generation_batch_size
    )
    generator = TransformersGenerator(model, tokenizer, sampling)
    for benchmark, n in (("ifeval", design.eval_prompts), ("ifbench", design.ifbench_prompts)):
        if (out / f"eval_{benchmark}.jsonl.gz").exists():
            continue  # written by an earlier session
        start = time.perf_counter()
        records = benchmark_prompts(benchmark, n=n, limit=n)
        metrics, rows = evaluate_instruction_following(generator, tokenizer, records, benchmark)
        write_gz(rows, out / f"eval_{benchmark}.jsonl.gz")
        print(
            f"  {benchmark}: {len(rows)} prompts, "
            f"instruction strict {metrics['instruction_level_strict']:.3f}"
            f" ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )


def sample_pool(design: Design, seed: int, out: Path) -> list[dict[str, Any]]:
    """``pool_size`` scored responses per training and validation prompt (``out/pool.jsonl.gz``)."""
    from grouppo.embedded.instructions import make_if_prompts
    from grouppo.generation import SamplingConfig, TransformersGenerator
    from grouppo.online.rewards import load_rewards
    from grouppo.online.rollout import score
    from grouppo.tokenize import chat_prompt

    path = out / "pool.jsonl.gz"
    if path.exists():
        return read_gz(path)
    start = time.perf_counter()
    model, tokenizer = _models(design)
    prompts = make_if_prompts(design.train_prompts + design.validation_prompts, 0, split="train")
    sampling = SamplingConfig(
        max_new_tokens=design.max_new_tokens,
        temperature=1.0,
        batch_size=design.generation_batch_size,
        seed=seed,
    )
    generator, reward = TransformersGenerator(model, tokenizer, sampling), load_rewards([design.reward])
    per_call = max(1, design.generation_batch_size // design.pool_size)
    pool = []
    for first in range(0, len(prompts), per_call):
        part = prompts[first : first + per_call]
        completions = generator.generate(
            [chat_prompt(r["prompt"], tokenizer) for r in part], design.pool_size
        )
        scores = score(reward, part, completions)
        for index, (record, texts, values) in enumerate(zip(part, completions, scores, strict=True)):
            split = "train" if first + index < design.train_prompts else "validation"
            pool.append(
                {
                    "seed": seed,
                    "split": split,
                    "key": record["key"],
                    "prompt": record["prompt"],
                    "instruction_id_list": record["instruction_id_list"],
                    "kwargs": record["kwargs"],
                    "responses": texts,
                    "scores": values,
                }
            )
    write_gz(pool, path)
    print(
        f"[seed {seed}] pool: {len(pool)} prompts x {design.pool_size} ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return pool


def heldout_logps(model: Any, tokenizer: Any, pool: Sequence[dict[str, Any]], max_length: int) -> list[dict]:
    """Per validation response of the K = 8 view (top_bottom labels): its summed log-prob and token count."""
    import torch

    from grouppo.collate import GroupCollator
    from grouppo.data import prepare_groups
    from grouppo.decoupled import group_logps
    from grouppo.logps import eval_mode
    from grouppo.tokenize import chat_prompt, tokenize_group

    groups, _ = prepare_groups(
        arm_records(pool, ARMS["groupdpo_k8"], split="validation"), positive_rule="top_bottom"
    )
    collate = GroupCollator(pad_token_id=tokenizer.pad_token_id)
    rows = []
    with torch.no_grad(), eval_mode(model):
        for group in groups:
            record = {**group, "prompt": chat_prompt(group["prompt"], tokenizer)}
            features = tokenize_group(record, tokenizer, max_length=max_length)
            batch = collate([features])
            logps = group_logps(model, batch, response_chunk_size=4).float()
            lengths = batch["response_mask"].sum(-1)
            for slot, label in enumerate(group["labels"]):
                if label is None:
                    continue
                rows.append(
                    {
                        "key": group["key"],
                        "slot": slot,
                        "label": int(label),
                        "score": group["scores"][slot],
                        "tokens": int(lengths[slot]),
                        "logp": float(logps[slot]),
                    }
                )
    return rows


SAVE_SECONDS = 300.0  # a checkpoint every 5 minutes of training: a restarted machine loses at most that
ELAPSED = "elapsed.json"  # written last into a checkpoint: its mark of completeness


def resumable_checkpoint(folder: str | Path) -> tuple[str | None, float]:
    """The newest checkpoint of ``folder`` whose save completed (grouppo's mark and ``elapsed.json``, both
    written after transformers has written everything else) and the training seconds spent up to it;
    (None, 0.0) when there is none."""
    import shutil

    from grouppo.runs import is_complete

    found = []
    for path in Path(folder).glob("checkpoint-*") if Path(folder).is_dir() else []:
        step = path.name.rsplit("-", 1)[-1]
        if step.isdigit():
            found.append((int(step), path, is_complete(path) and (path / ELAPSED).exists()))
    complete = [(step, path) for step, path, done in found if done]
    newest = max(complete)[0] if complete else -1
    for step, path, _ in found:  # cut short after the newest complete one: the resumed run rewrites them,
        if step > newest:  # and they must not count towards save_total_limit meanwhile
            shutil.rmtree(path, ignore_errors=True)
    if not complete:
        return None, 0.0
    path = max(complete)[1]
    return str(path), float(json.loads((path / ELAPSED).read_text())["train_seconds"])


def checkpointing(elapsed: float, seconds: float | None = None) -> Any:
    """A callback that marks each checkpoint complete with the training seconds spent up to it
    (``elapsed``: those of earlier sessions of the run) and, with ``seconds``, asks for a checkpoint after
    every step that ends that long after the last one."""
    from transformers import TrainerCallback

    class Checkpointing(TrainerCallback):
        def __init__(self) -> None:
            self.started = self.last = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if seconds is not None and time.perf_counter() - self.last >= seconds:
                control.should_save = True

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.last = time.perf_counter()
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            spent = {"train_seconds": elapsed + self.last - self.started}
            (folder / ELAPSED).write_text(json.dumps(spent) + "\n", encoding="utf-8")

    return Checkpointing()


def train_arm(
    design: Design,
    name: str,
    seed: int,
    pool: list[dict[str, Any]],
    out: Path,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train a fresh starting model as arm ``name`` on seed ``seed``'s pool, from the newest complete
    checkpoint of ``out/checkpoints`` when an earlier session left one (resuming is exact:
    ``tests/apps/test_experiments.py``); saves the model to ``out/model`` and what the training was to
    ``out/trained.json``, which it returns."""
    import torch

    from grouppo.apps.quickstart import train_config
    from grouppo.groupdpo import GroupDPOTrainer
    from grouppo.tokenize import chat_prompt

    arm = ARMS[name]
    torch.manual_seed(seed)
    model, tokenizer = _models(design)
    # The prompts as the responses were sampled from them: through the chat template.
    records = [{**r, "prompt": chat_prompt(r["prompt"], tokenizer)} for r in arm_records(pool, arm)]
    cfg = quickstart_config(design, out, seed, arm)
    args = train_config(cfg, out, online=False)
    args.disable_tqdm = True
    args.save_total_limit = 2  # the newer can be cut short by a kill, the older then resumed from
    checkpoint, elapsed = resumable_checkpoint(args.output_dir)
    start = time.perf_counter()
    trainer = GroupDPOTrainer(
        model,
        args=args,
        train_dataset=records,
        processing_class=tokenizer,
        callbacks=[checkpointing(elapsed, SAVE_SECONDS), *callbacks],
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(out / "model"))
    tokenizer.save_pretrained(str(out / "model"))
    info = {
        "arm": name,
        "seed": seed,
        **dataclasses.asdict(arm),
        "prompts": len(records),
        "responses": sum(len(r["responses"]) for r in records),
        "steps": trainer.state.global_step,
        "resumed_from": checkpoint and Path(checkpoint).name,
        "train_seconds": round(elapsed + time.perf_counter() - start, 1),
        "log_history": trainer.state.log_history,
    }
    write_json(info, out / "trained.json")
    return info


def run_arm(design: Design, name: str, seed: int, pool: list[dict[str, Any]], out: Path) -> None:
    """Arm ``name`` of seed ``seed``: trained (``train_arm``, unless ``out/trained.json`` says an earlier
    session did), evaluated and its held-out groups scored, each part skipped when its file exists;
    writes ``out/training.json`` last and then removes the model and checkpoints."""
    import shutil

    from grouppo.models import load_model, load_tokenizer

    if (out / "training.json").exists():
        return
    if (out / "trained.json").exists():
        info = json.loads((out / "trained.json").read_text())
    else:
        info = train_arm(design, name, seed, pool, out)
    start = time.perf_counter()  # the evaluation (of this session: an earlier one's is not counted)
    model, tokenizer = load_model(str(out / "model")), load_tokenizer(str(out / "model"))
    evaluate(model, tokenizer, design, out)
    if not (out / "heldout.jsonl.gz").exists():
        write_gz(heldout_logps(model, tokenizer, pool, design.max_length), out / "heldout.jsonl.gz")
    info = {**info, "seconds": round(info["train_seconds"] + time.perf_counter() - start, 1)}
    write_json(info, out / "training.json")
    for folder in ("model", "checkpoints"):
        shutil.rmtree(out / folder, ignore_errors=True)
    print(
        f"[seed {seed}] {name}: {info['prompts']} prompts, {info['steps']} steps, {info['seconds']:.0f} s",
        flush=True,
    )


def same_kernels(first: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether two recorded environments run the same matrix kernels: the same CPU model, kernel flags
    and thread count. bfloat16 sampling, training and greedy answers differ between CPUs that do not
    (docs/experiments.md, "What reproduces where"), so one run directory stays on one of them."""
    keys = ("model", "kernel_flags")
    return all(first["cpu"].get(k) == now["cpu"].get(k) for k in keys) and (
        first.get("torch_threads") == now.get("torch_threads")
    )


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def pools_from(results: Path, seeds: Sequence[int], out: Path) -> None:
    """Write each seed's pool stage (``out/seed{s}/pool.jsonl.gz``) from the exported ``pool.jsonl.gz`` of
    ``results`` instead of sampling it again: a run on another CPU then trains on the very responses
    the exported run trained on (sampling is bfloat16 and would draw others there)."""
    rows = read_gz(results / "pool.jsonl.gz")
    for seed in seeds:
        path = out / f"seed{seed}" / "pool.jsonl.gz"
        if path.exists():
            continue
        mine = [r for r in rows if r["seed"] == seed]
        if not mine:
            raise SystemExit(f"{results / 'pool.jsonl.gz'} holds no pool of seed {seed}")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_gz(mine, path)


def restore(results: Path, out: Path) -> None:
    """Rebuild the finished stages of a run directory from its export (the inverse of ``export``): a
    machine that lost ``out`` then reruns only what had not finished. Refuses to write over ``out``."""
    if (out / "environment.json").exists():
        raise SystemExit(f"{out} already holds a run; restore into an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    strip = ("model", "seed", "benchmark")
    stages: dict[Path, list[dict[str, Any]]] = {}
    for row in read_gz(results / "pool.jsonl.gz"):
        stages.setdefault(out / f"seed{row['seed']}" / "pool.jsonl.gz", []).append(row)
    for row in read_gz(results / "generations.jsonl.gz"):
        folder = out / "start" if row["model"] == START else out / f"seed{row['seed']}" / row["model"]
        stages.setdefault(folder / f"eval_{row['benchmark']}.jsonl.gz", []).append(
            {k: v for k, v in row.items() if k not in strip}
        )
    for row in read_gz(results / "heldout_logps.jsonl.gz"):
        name = "heldout_start.jsonl.gz" if row["model"] == START else f"{row['model']}/heldout.jsonl.gz"
        path = out / f"seed{row['seed']}" / name
        stages.setdefault(path, []).append({k: v for k, v in row.items() if k not in strip})
    for path, rows in stages.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_gz(rows, path)
    for info in json.loads((results / "training.json").read_text()):
        write_json(info, out / f"seed{info['seed']}" / info["arm"] / "training.json")
    (out / "environment.json").write_text((results / "environment.json").read_text(), encoding="utf-8")


def run(
    design: Design, out: Path, seeds: Sequence[int], arms: Sequence[str], pool_from: Path | None = None
) -> None:
    """Every stage not yet on disk: the environment, the starting model's evaluation, each seed's pool
    (sampled, or taken from the export ``pool_from``) and the held-out scores under the starting model,
    then each arm of each seed. Refuses to go on in a directory started on a CPU with other kernels."""
    from grouppo.environment import describe_environment, hardware_line

    out.mkdir(parents=True, exist_ok=True)
    env_path = out / "environment.json"
    envs = json.loads(env_path.read_text()) if env_path.exists() else []
    now = describe_environment()
    if envs and not same_kernels(envs[0], now):
        raise SystemExit(
            f"{out} was started on {hardware_line(envs[0])}; this machine is {hardware_line(now)}. Its "
            "bfloat16 results would not be comparable: continue it on such a machine, or use a new --out."
        )
    envs.append(
        {
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "design": dataclasses.asdict(design),
            "seeds": list(seeds),
            "arms": list(arms),
            **(
                {"pool_from": {"path": str(pool_from), "sha256": _sha256(pool_from / "pool.jsonl.gz")}}
                if pool_from
                else {}
            ),
            **now,
        }
    )
    env_path.write_text(json.dumps(envs, indent=1) + "\n", encoding="utf-8")
    if pool_from:
        pools_from(pool_from, seeds, out)
    start_dir = out / "start"
    if not (start_dir / "eval_ifbench.jsonl.gz").exists():
        print("[start] evaluating the starting model", flush=True)
        model, tokenizer = _models(design)
        evaluate(model, tokenizer, design, start_dir)
    for seed in seeds:
        seed_dir = out / f"seed{seed}"
        pool = sample_pool(design, seed, seed_dir)
        if not (seed_dir / "heldout_start.jsonl.gz").exists():
            model, tokenizer = _models(design)
            write_gz(
                heldout_logps(model, tokenizer, pool, design.max_length), seed_dir / "heldout_start.jsonl.gz"
            )
        for name in arms:
            run_arm(design, name, seed, pool, seed_dir / name)


# ------------------------------------------------------------------------------------------ export


def export(out: Path, results: Path) -> None:
    """Gather the raw per-prompt records of every finished model under ``out`` into ``results``."""
    results.mkdir(parents=True, exist_ok=True)
    generations, pools, heldout, training = [], [], [], []

    def add_eval(model_dir: Path, name: str, seed: int | None) -> None:
        for benchmark in BENCHMARKS:
            for row in read_gz(model_dir / f"eval_{benchmark}.jsonl.gz"):
                generations.append({"model": name, "seed": seed, "benchmark": benchmark, **row})

    add_eval(out / "start", START, None)
    for seed_dir in sorted(out.glob("seed*")):
        seed = int(seed_dir.name[4:])
        pools.extend(read_gz(seed_dir / "pool.jsonl.gz"))
        heldout += [{"model": START, "seed": seed, **r} for r in read_gz(seed_dir / "heldout_start.jsonl.gz")]
        for name in ARMS:
            arm_dir = seed_dir / name
            if not (arm_dir / "training.json").exists():
                continue
            add_eval(arm_dir, name, seed)
            heldout += [{"model": name, "seed": seed, **r} for r in read_gz(arm_dir / "heldout.jsonl.gz")]
            training.append(json.loads((arm_dir / "training.json").read_text()))
    write_gz(generations, results / "generations.jsonl.gz")
    write_gz(pools, results / "pool.jsonl.gz")
    write_gz(heldout, results / "heldout_logps.jsonl.gz")
    (results / "training.json").write_text(json.dumps(training, indent=1) + "\n", encoding="utf-8")
    (results / "environment.json").write_text((out / "environment.json").read_text(), encoding="utf-8")
    from recompute import write_table  # the table as recompute.py rebuilds it

    write_table(results, report)


# ------------------------------------------------------------------------------------------ the report


def _units(rows: Sequence[dict[str, Any]], metric: str) -> tuple[list[int], list[int]]:
    """Per prompt with a scored instruction, (numerator, denominator) of ``metric`` from its per-instruction
    results (``if_units``); ``rows`` come from ``aligned``, so the prompts kept are the same for every
    model."""
    from grouppo.embedded.instructions import if_units

    return if_units(rows)[metric]


def aligned(
    by_model: dict[tuple[str, int | None, str], list[dict[str, Any]]],
) -> dict[tuple[str, int | None, str], list[dict[str, Any]]]:
    """Every model's rows of a benchmark in one prompt order, each prompt once, checked to be the same
    prompts as every other model's (ValueError naming what differs), with an instruction that any model
    left unscored left unscored in all (``scored_alike``): every comparison is on the same prompts and
    the same instructions, matched by key, never by position."""
    from grouppo.embedded.instructions import scored_alike
    from grouppo.evaluation import match_prompts

    out = {}
    for benchmark in BENCHMARKS:
        models = [m for m in by_model if m[2] == benchmark]
        if not models:
            continue
        keyed = match_prompts({m: by_model[m] for m in models})
        keys = sorted(keyed[models[0]], key=str)
        masked = scored_alike(*([keyed[m][k] for k in keys] for m in models))
        out.update(zip(models, masked, strict=True))
    return out


def _differing(mine: dict[str, Any], ref: dict[str, Any]) -> tuple[int, int]:
    """(answers that differ in any character, prompts whose prompt-level strict outcome differs)."""
    answers = sum(mine[k]["response"] != ref[k]["response"] for k in ref)
    outcomes = sum(
        _units([mine[k]], "prompt_level_strict") != _units([ref[k]], "prompt_level_strict") for k in ref
    )
    return answers, outcomes


def _fmt(result: dict[str, Any], sign: str = "+", digits: int = 3) -> str:
    low, high = result["interval"]
    f = f"{sign}.{digits}f"
    return f"{result['difference']:{f}} [{low:{f}}, {high:{f}}]"


def verdict(result: dict[str, Any], mde: float = MDE) -> str:
    """The pre-registered reading of a difference's interval (docs/preregistration.md, section 1)."""
    low, high = result["interval"]
    if low > 0:
        return "B better"
    if high < 0:
        return "A better"
    if -mde < low and high < mde:
        return f"equivalent within ±{mde:g}"
    return "inconclusive at this scale"


def report(results: Path, mde: float = MDE, across: Path | None = None) -> str:
    """results.md, rebuilt from the records in ``results`` alone (no model): accuracies per model, the
    primary comparison and its verdict, the NLL and group-size comparisons, and the held-out log-probs;
    with ``across`` (the export of the same design run on another CPU), how far the models that both
    ran move between the two CPUs (``across_cpus``)."""
    from grouppo.environment import hardware_line
    from grouppo.intervals import seeds_and_prompts_difference

    generations = read_gz(results / "generations.jsonl.gz")
    heldout = read_gz(results / "heldout_logps.jsonl.gz")
    training = json.loads((results / "training.json").read_text())
    envs = json.loads((results / "environment.json").read_text())
    by_model: dict[tuple[str, int | None, str], list[dict[str, Any]]] = {}
    for row in generations:
        by_model.setdefault((row["model"], row["seed"], row["benchmark"]), []).append(row)
    by_model = aligned(by_model)
    seeds = sorted({row["seed"] for row in generations if row["seed"] is not None})
    arms = [a for a in ARMS if all((a, s, "ifeval") in by_model for s in seeds)]

    def runs(model: str, benchmark: str, metric: str) -> list[tuple[list[float], list[float]]]:
        if model == START:
            return [_units(by_model[(START, None, benchmark)], metric)] * len(seeds)
        return [_units(by_model[(model, s, benchmark)], metric) for s in seeds]

    def difference(a: str, b: str, benchmark: str, metric: str, **options: Any) -> dict[str, Any]:
        return seeds_and_prompts_difference(runs(b, benchmark, metric), runs(a, benchmark, metric), **options)

    def scored(benchmark: str) -> str:
        """How many prompts and instructions the benchmark's figures count (a checker that cannot run
        offline leaves its instruction out for every model, and a prompt with no other out of both)."""
        rows = by_model[(START, None, benchmark)]
        checks = [c for r in rows for c in r["strict"]]
        prompts = sum(any(c is not None for c in r["strict"]) for r in rows)
        instructions = sum(c is not None for c in checks)
        return (
            f"{benchmark} {len(rows)}"
            + (f" ({prompts} with a scored instruction; {instructions} of {len(checks)} instructions scored)"
               if instructions < len(checks) else "")
        )  # fmt: skip

    lines = [
        "# Groups against pairs: results",
        "",
        f"Plan: {PLAN}. Recompute: `python experiments/recompute.py` (no model needed).",
        "",
        "Hardware: " + "; ".join(sorted({hardware_line(e) for e in envs})) + ".",
        "",
        f"Seeds: {', '.join(map(str, seeds))}. Prompts: "
        + ", ".join(scored(b) for b in BENCHMARKS)
        + ". Intervals: 95%, "
        "two-stage bootstrap over seeds and prompts (`grouppo.intervals.seeds_and_prompts_difference`).",
        "",
    ]

    # Accuracy per model: mean over seeds with its interval.
    cols = [(b, m) for b in BENCHMARKS for m in METRICS[:2]]
    lines += [
        "## Accuracy (mean over seeds)",
        "",
        "| model | prompts trained | steps | "
        + " | ".join(f"{b} {m.replace('_level_', ' ')}" for b, m in cols)
        + " |",
        "|---|---:|---:|" + "---:|" * len(cols),
    ]
    for model in [START, *arms]:
        info = [t for t in training if t["arm"] == model]
        prompts = "/".join(str(t["prompts"]) for t in info) or ""
        steps = "/".join(str(t["steps"]) for t in info) or ""
        cells = [_fmt(seeds_and_prompts_difference(runs(model, b, m)), "") for b, m in cols]
        lines.append(f"| {model} | {prompts} | {steps} | " + " | ".join(cells) + " |")

    def comparison(
        title: str,
        pairs: Sequence[tuple[str, str]],
        note: str = "",
        planned: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        """A table of ``B - A`` on every metric; a pair outside ``planned`` (when given) is read as
        exploratory: the plan's expectation does not rest on it."""
        present = [(a, b) for a, b in pairs if a in arms + [START] and b in arms]
        if not present:
            return
        lines.extend(
            [
                "",
                f"## {title}",
                "",
                *([note, ""] if note else []),
                "| B - A | "
                + " | ".join(f"{b} {m.replace('_level_', ' ')}" for b, m in cols)
                + " | per seed (primary metric) | reading (primary metric) |",
                "|---|" + "---:|" * len(cols) + "---|---|",
            ]
        )
        assert cols[0] == PRIMARY_METRIC
        for a, b in present:
            results_ = [difference(a, b, bench, m) for bench, m in cols]
            marks = ["" if r["includes_zero"] else " *" for r in results_]
            per_seed = ", ".join(f"{v:+.3f}" for v in results_[0]["per_seed"])
            reading = verdict(results_[0], mde) if a != START else ""
            if reading and planned is not None and (a, b) not in planned:
                reading = f"exploratory: {reading}"
            lines.append(
                f"| {b} - {a} | "
                + " | ".join(_fmt(r) + m for r, m in zip(results_, marks, strict=True))
                + f" | {per_seed} | {reading} |"
            )

    if all(a in arms for a in PRIMARY):
        primary = difference(*PRIMARY, *PRIMARY_METRIC)
        lines += [
            "",
            "## Primary comparison",
            "",
            f"B = {PRIMARY[1]}, A = {PRIMARY[0]}, metric {PRIMARY_METRIC[0]} "
            f"{PRIMARY_METRIC[1]}: {_fmt(primary, digits=4)}; per seed "
            + ", ".join(f"{v:+.4f}" for v in primary["per_seed"])
            + f". Pre-registered verdict: **{verdict(primary, mde)}** (minimum detectable effect {mde:g}).",
            "",
            spread_line(
                primary["per_seed"], runs(PRIMARY[1], *PRIMARY_METRIC), runs(PRIMARY[0], *PRIMARY_METRIC)
            ),
        ]
    comparison(
        "Groups against pairs, every metric",
        [(START, a) for a in PRIMARY] + [PRIMARY],
        "`*`: the interval excludes 0. Reading: the pre-registered rule of section 1 on the primary metric "
        f"(margin ±{mde:g}); for the NLL and group-size comparisons, secondary claims.",
    )
    comparison("NLL on positives (K = 8)", NLL_PAIRS)
    comparison(
        "Group size (same prompts and steps)",
        [("groupdpo_k2", b) for b in K_ARMS[1:]] + [("groupdpo_k8", "groupdpo_k16")],
        planned=K_PLANNED,
    )
    if all(a in arms and b in arms for a, b in K_PLANNED):  # exploratory: the plan fixed no correction
        level = 1 - 0.05 / len(K_PLANNED)
        lines += [
            "",
            f"Exploratory, with a Bonferroni correction for the expectation's {len(K_PLANNED)} comparisons "
            f"({level:.1%} intervals, primary metric):",
            "",
        ]
        for a, b in K_PLANNED:
            r = difference(a, b, *PRIMARY_METRIC, level=level)
            lines.append(f"- {b} - {a}: {_fmt(r)}, {verdict(r, mde)}")
    between = [(a, b) for a, b in [PRIMARY, *NLL_PAIRS] if a in arms and b in arms]
    lines += heldout_table(heldout, seeds, [START, *arms], between)
    if across is not None:
        lines += across_cpus(results, across)
    lines += [
        "",
        "## Training",
        "",
        "Steps skipped for a non-finite loss and the gradient norm over the logged steps (before clipping):",
        "",
        "| arm | seed | prompts | responses | steps | skipped | grad norm median | max "
        "| training s | total s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in sorted(training, key=lambda t: (list(ARMS).index(t["arm"]), t["seed"])):
        logged = [h for h in t["log_history"] if "grad_norm" in h]
        norms = [h["grad_norm"] for h in logged]
        skipped = max((h.get("nonfinite_skipped_steps", 0) for h in logged), default=0)
        lines.append(
            f"| {t['arm']} | {t['seed']} | {t['prompts']} | {t['responses']} | {t['steps']} | {skipped} | "
            f"{statistics.median(norms):.1f} | {max(norms):.1f} | "
            f"{t['train_seconds']:.0f} | {t['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def spread_line(
    per_seed: Sequence[float],
    b: Sequence[tuple[list, list]],
    a: Sequence[tuple[list, list]],
    resamples: int = 2000,
) -> str:
    """Beside the decision, not part of it: the parts of the primary interval's width that the plan's
    minimum detectable effect assumed (each seed's standard error over prompts, from ``b`` and ``a``'s
    units; the standard deviation of the seeds' differences ``per_seed``), and a t-interval on those
    differences alone."""
    import numpy as np
    from scipy import stats

    from grouppo.intervals import ratio_of_sums

    errors = []
    rng = np.random.default_rng(0)
    for (b_num, b_den), (a_num, a_den) in zip(b, a, strict=True):
        b_num, b_den, a_num, a_den = (np.asarray(x, dtype=float) for x in (b_num, b_den, a_num, a_den))
        idx = rng.integers(0, b_num.size, size=(resamples, b_num.size))
        draws = ratio_of_sums(b_num[idx], b_den[idx]) - ratio_of_sums(a_num[idx], a_den[idx])
        errors.append(float(draws.std()))
    n = len(per_seed)
    line = "Beside the decision: each seed's standard error over prompts "
    line += ", ".join(f"{e:.4f}" for e in errors)
    if n > 1:
        mean, sd = float(np.mean(per_seed)), float(np.std(per_seed, ddof=1))
        half = float(stats.t.ppf(0.975, n - 1)) * sd / n**0.5
        line += (
            f"; standard deviation of the {n} seeds' differences {sd:.4f}; t-interval on those differences "
            f"alone ({n - 1} degree{'s' if n > 2 else ''} of freedom) "
            f"[{mean - half:+.4f}, {mean + half:+.4f}]"
        )
    return line + "."


def across_cpus(results: Path, other: Path) -> list[str]:
    """Each model that both exports evaluated (the same model and seed, trained on the same pool), compared
    between the two runs' CPUs: the answers that differ in any character, the prompts whose prompt-level
    strict outcome differs, and the instruction-level strict accuracy on each with its paired interval
    over prompts (``compare_generations``). Exploratory: how far bfloat16 training and answers move with
    the kernels, beside the experiment, never inside a comparison of arms."""
    from grouppo.environment import hardware_line
    from grouppo.evaluation import compare_generations

    def load(folder: Path) -> tuple[dict[tuple[str, int | None, str], list[dict[str, Any]]], str]:
        rows: dict[tuple[str, int | None, str], list[dict[str, Any]]] = {}
        for row in read_gz(folder / "generations.jsonl.gz"):
            rows.setdefault((row["model"], row["seed"], row["benchmark"]), []).append(row)
        return rows, hardware_line(json.loads((folder / "environment.json").read_text())[0])

    if read_gz(results / "pool.jsonl.gz") != read_gz(other / "pool.jsonl.gz"):
        raise ValueError(f"{results.name} and {other.name} trained on different pools")
    (mine, here), (theirs, there) = load(results), load(other)
    lines = [
        "",
        "## The same models on two CPUs (exploratory)",
        "",
        f"A: `{other.name}`, on {there}. B: this run, on {here}. Same design, seeds and pools (the "
        "same responses, checked); bfloat16 "
        "sampling, training and greedy answers (docs/preregistration.md, amendment 8). Differing: answers "
        "that differ in any character / prompts whose prompt-level strict outcome differs. `*`: the "
        "interval excludes 0.",
        "",
        "| model | seed | benchmark | differing | instruction strict A | B | B - A |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    order = {b: i for i, b in enumerate(BENCHMARKS)}
    for key in sorted(set(mine) & set(theirs), key=lambda k: (k[0] != START, k[0], k[1] or 0, order[k[2]])):
        model, seed, benchmark = key
        a = {r["key"]: r for r in theirs[key]}
        b = {r["key"]: r for r in mine[key]}
        if set(a) != set(b):
            raise ValueError(f"{key}: the two runs answered different prompts")
        answers, outcomes = _differing(b, a)
        result = compare_generations(theirs[key], mine[key])["instruction_level_strict"]
        mark = "" if result["includes_zero"] else " *"
        seed_ = "" if seed is None else seed
        lines.append(
            f"| {model} | {seed_} | {benchmark} | {answers} / {outcomes} of {len(a)} | "
            f"{result['a']:.3f} | {result['b']:.3f} | {_fmt(result)}{mark} |"
        )

    def per_token(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, int, str, int], float]:
        return {(r["model"], r["seed"], r["key"], r["slot"]): r["logp"] / max(1, r["tokens"]) for r in rows}

    b_rows = read_gz(results / "heldout_logps.jsonl.gz")
    a_lp, b_lp = per_token(read_gz(other / "heldout_logps.jsonl.gz")), per_token(b_rows)
    labels = {(r["model"], r["seed"], r["key"], r["slot"]): r["label"] for r in b_rows}
    lines += [
        "",
        "Held-out log-probs of the same responses (the validation groups' K = 8 view, float32): mean "
        "per-token log-prob on each CPU and the largest difference of one response's.",
        "",
        "| model | seed | positives A | B | negatives A | B | largest difference |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, seed in sorted({k[:2] for k in b_lp if k in a_lp}, key=lambda k: (k[0] != START, k)):
        keys = [k for k in b_lp if k[:2] == (model, seed)]
        if any(k not in a_lp for k in keys):
            raise ValueError(f"{model}, seed {seed}: the two runs scored different held-out responses")
        cells = []
        for label in (1, 0):
            chosen = [k for k in keys if labels[k] == label]
            cells += [f"{sum(lp[k] for k in chosen) / len(chosen):.4f}" for lp in (a_lp, b_lp)]
        largest = max(abs(a_lp[k] - b_lp[k]) for k in keys)
        lines.append(f"| {model} | {seed} | " + " | ".join(cells) + f" | {largest:.2g} |")
    return lines


def heldout_table(
    rows: Sequence[dict[str, Any]],
    seeds: Sequence[int],
    models: Sequence[str],
    pairs: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """Mean per-token log-prob of the held-out positives and negatives per model, and its change from the
    starting model with a two-stage interval over seeds and validation groups; then ``B - A`` for each
    pair of models (A, B) in ``pairs``, paired on the same responses within each seed."""
    from grouppo.intervals import seeds_and_prompts_difference

    index: dict[tuple[str, int, int], dict[tuple[str, int], dict[str, Any]]] = {}
    for r in rows:
        index.setdefault((r["model"], r["seed"], r["label"]), {})[(r["key"], r["slot"])] = r
    if not all((m, s, 1) in index for m in models for s in seeds):
        return []
    for (model, seed, label), responses in index.items():
        if responses.keys() != index.get((START, seed, label), {}).keys():
            raise ValueError(f"{model}, seed {seed}: held-out responses differ from the starting model's")

    def units(model: str, seed: int, label: int) -> tuple[list[float], list[float]]:
        """Per validation group: the summed per-token log-probs of its responses with ``label``, and
        their count."""
        groups: dict[str, list[float]] = {}
        for (key, _), r in sorted(index[(model, seed, label)].items()):
            groups.setdefault(key, []).append(r["logp"] / max(1, r["tokens"]))
        return [sum(v) for v in groups.values()], [float(len(v)) for v in groups.values()]

    def units_keys(seed: int) -> list[str]:
        return [key for key, _ in index[(START, seed, 1)]]

    out = [
        "",
        "## Held-out log-probs (validation prompts, K = 8 view)",
        "",
        "Mean per-token log-prob of the positives and negatives of the validation prompts' groups ("
        + ", ".join(f"{len(units(START, s, 1)[0])} at seed {s}" for s in seeds)
        + f"; {len(set.intersection(*(set(units_keys(s)) for s in seeds)))} prompts in all seeds"
        + ": a seed's own pool decides which prompts have untied responses), and the change from the "
        "starting model (interval over seeds and each seed's groups).",
        "",
        "| model | positives | change | negatives | change |",
        "|---|---:|---:|---:|---:|",
    ]
    for model in models:
        cells = []
        for label in (1, 0):
            b = [units(model, s, label) for s in seeds]
            a = [units(START, s, label) for s in seeds]
            level = seeds_and_prompts_difference(b, shared_prompts=False)
            cells.append(f"{level['difference']:.3f}")
            change = seeds_and_prompts_difference(b, a, shared_prompts=False)
            cells.append("" if model == START else _fmt(change))
        out.append(f"| {model} | " + " | ".join(cells) + " |")
    if pairs:
        out += [
            "",
            "Between arms, on the same responses (`*`: the interval excludes 0):",
            "",
            "| B - A | positives | per seed | negatives | per seed |",
            "|---|---:|---|---:|---|",
        ]
    for a, b in pairs:
        cells = []
        for label in (1, 0):
            diff = seeds_and_prompts_difference(
                [units(b, s, label) for s in seeds], [units(a, s, label) for s in seeds], shared_prompts=False
            )
            cells.append(_fmt(diff) + ("" if diff["includes_zero"] else " *"))
            cells.append(", ".join(f"{v:+.3f}" for v in diff["per_seed"]))
        out.append(f"| {b} - {a} | " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/if_groups", help="run directory (stages read back from it)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=list(PRIMARY), choices=list(ARMS))
    parser.add_argument("--export", metavar="DIR", help="gather the records of --out into DIR and report")
    parser.add_argument("--pool_from", metavar="DIR", help="take each seed's pool from this export")
    parser.add_argument("--restore", metavar="DIR", help="rebuild --out's finished stages from this export")
    for f in dataclasses.fields(Design):
        kind = {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f"default: {f.default}")
    args = vars(parser.parse_args(argv))
    out, seeds, arms, target = Path(args.pop("out")), args.pop("seeds"), args.pop("arms"), args.pop("export")
    pool_from, source = args.pop("pool_from"), args.pop("restore")
    if target:
        export(out, Path(target))
        print((Path(target) / "results.md").read_text())
        return 0
    if source:
        restore(Path(source), out)
        return 0
    run(Design(**args), out, seeds, arms, Path(pool_from) if pool_from else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
