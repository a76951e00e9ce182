"""GDPO inference and metrics: the model's belief distribution, belief sampling, belief-conditioned
generation, and the paper's JS-distance metrics (``grouppo generate``, ``grouppo eval gdpo``).

Prompts are tokenized as in training (``grouppo.tokenize``): chat messages through the chat template,
plain strings as they are. Inference samples a belief, then answers conditioned on it, in one of two
modes:

* ``belief``: the belief is drawn from the model's renormalized belief distribution (each belief
  prefix's summed log-prob after the prompt, softmax over the K, computed in one scoring pass with the
  prompt shared), its prefix is written, and the model generates the answer after it;
* ``free``: the model generates the whole response; the belief is read back from the prefix it wrote
  (a response whose prefix does not parse into one of the K labels counts as *unparsed*: never as a
  belief, unlike the reference code, which reads it as belief 0).

Metrics per question (one prompt with its population's target distribution p*), then averaged per
population and overall:

* ``js_distance_sampled``: scipy's ``jensenshannon`` (natural log; 0 to 0.833) between p* and the
  histogram of sampled beliefs, unparsed samples in a bin of their own that p* gives no mass;
* ``js_distance_prob``: the same between p* and the model's belief probabilities;
* ``majority_bias`` (sampled) and ``majority_bias_prob``: the model's mass on p*'s top belief over
  p*'s top probability (1 = calibrated on the majority, above 1 = collapsing onto it);
* ``belief_consistency``: the fraction of generated answers that express their sampled belief, by a
  judge ``(answer, beliefs, belief) -> bool`` (default ``grouppo.embedded.opinions.label_judge``);
* ``unparsed_rate`` (free mode).

Reference rows score three fixed "models" the same way: uniform, the majority one-hot, and the target's
probabilities handed out in reversed rank order.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from scipy.spatial.distance import jensenshannon

from grouppo.collate import GroupCollator
from grouppo.decoupled import group_logps
from grouppo.environment import progress_bar
from grouppo.generation import SamplingConfig, TransformersGenerator
from grouppo.logps import eval_mode
from grouppo.tokenize import DEFAULT_BELIEF_TEMPLATE, belief_prefix, belief_prompt_ids, prefix_ids

Judge = Callable[[str, list[str], int], "bool | None"]
MODES = ("belief", "free")


def unique_questions(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per distinct prompt (the first seen), keeping its beliefs, distribution and metadata."""
    seen, out = set(), []
    for record in records:
        key = repr(record["prompt"])
        if key not in seen:
            seen.add(key)
            out.append(record)
    return out


@torch.no_grad()
def belief_probabilities(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[dict[str, Any]],
    template: str = DEFAULT_BELIEF_TEMPLATE,
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[float]]:
    """The model's renormalized belief distribution for each question (``prompt``, ``beliefs``);
    ``progress`` shows a bar of the questions scored (tqdm, on stderr)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = GroupCollator(pad_token_id=pad)
    device = next(model.parameters()).device
    out: list[list[float]] = []
    bar = progress_bar(len(questions), "belief probabilities", "question", progress)
    with bar, eval_mode(model):
        for start in range(0, len(questions), batch_size):
            features = []
            for q in questions[start : start + batch_size]:
                prompt_ids, rows = belief_prompt_ids(tokenizer, q["prompt"], q["beliefs"], template)
                k = len(rows)
                features.append(
                    {"prompt_ids": prompt_ids, "response_ids": rows, "labels": [0] * k, "scores": [0.0] * k}
                )
            batch = {key: value.to(device) for key, value in collate(features).items()}
            logps = group_logps(model, batch).float().cpu()
            sizes = [len(f["response_ids"]) for f in features]
            out.extend(torch.softmax(part, 0).tolist() for part in logps.split(sizes))
            bar.update(len(features))
    return out


def sample_beliefs(probabilities: Sequence[float], n: int, generator: torch.Generator) -> list[int]:
    """``n`` belief indices drawn with replacement from ``probabilities``."""
    return torch.multinomial(
        torch.tensor(probabilities, dtype=torch.float64), n, True, generator=generator
    ).tolist()


def parse_belief(
    text: str, beliefs: list[str], template: str = DEFAULT_BELIEF_TEMPLATE
) -> tuple[int | None, str]:
    """Read the belief prefix a response opens with: (index into ``beliefs`` or None, the answer after
    it). Labels match exactly up to case and surrounding spaces, the longest label first; a template
    whose text after ``{belief}`` is blank ends the label at a space or line break. Anything else is
    unparsed (None)."""
    head, _, tail = template.partition("{belief}")
    opening = re.match(r"\s*" + re.escape(head.strip()) + r"\s*", text)
    if opening is None:
        return None, text.strip()
    rest = text[opening.end() :]
    end = r"\s*" + re.escape(tail.strip()) if tail.strip() else r"(?=\s|$)"
    for index in sorted(range(len(beliefs)), key=lambda i: -len(beliefs[i].strip())):
        match = re.match(re.escape(beliefs[index].strip()) + end, rest, flags=re.IGNORECASE)
        if match is not None:
            return index, rest[match.end() :].strip()
    # A well-formed prefix with a label that is not one of the beliefs: unparsed, the answer after it.
    other = re.match(r"(.+?)" + end, rest, flags=re.DOTALL) if tail.strip() else None
    return None, (rest[other.end() :] if other else text).strip()


@dataclass
class BeliefSampling:
    """How GDPO inference samples: the mode, how many beliefs and answers per question, the prefix."""

    mode: str = field(
        default="belief",
        metadata={
            "help": "belief: draw the belief from the model's belief distribution, then answer; free: "
            "generate the whole response and parse its belief.",
            "choices": list(MODES),
        },
    )
    samples: int = field(default=8, metadata={"help": "Beliefs sampled per question."})
    answers: int = field(default=2, metadata={"help": "Answers generated per question (for consistency)."})
    belief_template: str = field(
        default=DEFAULT_BELIEF_TEMPLATE, metadata={"help": "How a response opens with its belief."}
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; expected one of {MODES}")


def generate_with_beliefs(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[dict[str, Any]],
    settings: BeliefSampling | None = None,
    sampling: SamplingConfig | None = None,
) -> list[dict[str, Any]]:
    """Sample beliefs and belief-conditioned answers for each question.

    Returns, per question: ``probabilities`` (the model's renormalized belief distribution),
    ``sampled`` (``samples`` belief indices, None for unparsed) and ``generations`` (dicts ``belief``,
    ``response``). In ``belief`` mode beliefs are drawn from the probabilities (seeded by
    ``sampling.seed``) and answers generated after the prefixes of the first ``answers`` of them; in
    ``free`` mode each of the ``samples`` responses is generated whole and its belief parsed from it.
    ``sampling.progress`` shows bars of the questions scored and the sequences generated.
    """
    settings = settings or BeliefSampling()
    mode, samples, answers, template = (
        settings.mode,
        settings.samples,
        settings.answers,
        settings.belief_template,
    )
    sampling = sampling or SamplingConfig(max_new_tokens=48, temperature=1.0, batch_size=32, seed=0)
    seed = sampling.seed or 0
    generator = TransformersGenerator(model, tokenizer, sampling)
    probabilities = belief_probabilities(model, tokenizer, questions, template, progress=sampling.progress)
    rng = torch.Generator().manual_seed(seed)
    results = []
    if mode == "belief":
        rows, owners = [], []
        for index, (q, probs) in enumerate(zip(questions, probabilities, strict=True)):
            drawn = sample_beliefs(probs, samples, rng)
            results.append({"probabilities": probs, "sampled": drawn, "generations": []})
            for belief in drawn[:answers]:
                rows.append(
                    prefix_ids(
                        tokenizer, q["prompt"], belief_prefix(template, q["beliefs"][belief]), eos=False
                    )
                )
                owners.append((index, belief))
        texts = generator.generate_from_ids(rows) if rows else []
        for (index, belief), (text,) in zip(owners, texts, strict=True):
            results[index]["generations"].append({"belief": belief, "response": text.strip()})
    else:
        texts = generator.generate([q["prompt"] for q in questions], samples)
        for q, probs, outs in zip(questions, probabilities, texts, strict=True):
            parsed = [parse_belief(text, q["beliefs"], template) for text in outs]
            results.append(
                {
                    "probabilities": probs,
                    "sampled": [belief for belief, _ in parsed],
                    "generations": [{"belief": b, "response": answer} for b, answer in parsed[:answers]],
                }
            )
    return results


def question_metrics(
    target: Sequence[float],
    probabilities: Sequence[float],
    sampled: Sequence[int | None],
    consistent: Sequence[bool] = (),
) -> dict[str, float]:
    """The metrics of one question (see the module docstring)."""
    k = len(target)
    hist = [0.0] * (k + 1)
    for belief in sampled:
        hist[k if belief is None else belief] += 1
    hist = [h / max(1, len(sampled)) for h in hist]
    top = max(range(k), key=lambda i: target[i])
    out = {
        "js_distance_sampled": float(jensenshannon([*target, 0.0], hist)),
        "js_distance_prob": float(jensenshannon(target, probabilities)),
        "majority_bias": hist[top] / target[top],
        "majority_bias_prob": probabilities[top] / target[top],
        "unparsed_rate": hist[k],
    }
    if consistent:
        out["belief_consistency"] = sum(consistent) / len(consistent)
    return out


def reference_distributions(target: Sequence[float]) -> dict[str, list[float]]:
    """Fixed "models" to print beside a model: uniform, the majority one-hot, the reversed ranking."""
    k = len(target)
    top = max(range(k), key=lambda i: target[i])
    order = sorted(range(k), key=lambda i: -target[i])
    reversed_probs = [0.0] * k
    for rank, index in enumerate(order):
        reversed_probs[index] = target[order[k - 1 - rank]]
    return {
        "uniform": [1.0 / k] * k,
        "majority": [1.0 if i == top else 0.0 for i in range(k)],
        "reversed": reversed_probs,
    }


def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({key for row in rows for key in row})
    return {key: sum(r[key] for r in rows if key in r) / sum(1 for r in rows if key in r) for key in keys}


def aggregate(questions: Sequence[dict[str, Any]], per_question: list[dict[str, float]]) -> dict[str, Any]:
    """Means per population (a record's ``population`` field, else "all") and overall."""
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for q, row in zip(questions, per_question, strict=True):
        groups[str(q.get("population", "all"))].append(row)
    return {
        "num_questions": len(per_question),
        "overall": _mean_rows(per_question),
        "populations": {
            name: {"num_questions": len(rows), **_mean_rows(rows)} for name, rows in sorted(groups.items())
        },
    }


def evaluate_beliefs(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    settings: BeliefSampling | None = None,
    *,
    judge: Judge | None = None,
    sampling: SamplingConfig | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score a model on belief records (one question per distinct prompt): the metrics dict (``model``,
    and ``reference`` rows for uniform / majority / reversed) and the per-question generations."""
    settings = settings or BeliefSampling()
    if judge is None:
        from grouppo.embedded.opinions import label_judge as judge
    questions = unique_questions(records)
    results = generate_with_beliefs(model, tokenizer, questions, settings, sampling)
    rows, reference_rows = [], defaultdict(list)
    details = []
    for q, result in zip(questions, results, strict=True):
        judged = [
            bool(judge(g["response"], q["beliefs"], g["belief"]))
            for g in result["generations"]
            if g["belief"] is not None
        ]
        rows.append(question_metrics(q["distribution"], result["probabilities"], result["sampled"], judged))
        for name, probs in reference_distributions(q["distribution"]).items():
            # A reference "samples" its probabilities exactly: its histogram is its distribution.
            reference_rows[name].append(exact_metrics(q["distribution"], probs))
        details.append(
            {
                "prompt": q["prompt"],
                "population": q.get("population"),
                "beliefs": q["beliefs"],
                "target": q["distribution"],
                **result,
            }
        )
    metrics = {
        "mode": settings.mode,
        "samples": settings.samples,
        "model": aggregate(questions, rows),
        "reference": {name: aggregate(questions, r) for name, r in reference_rows.items()},
    }
    return metrics, details


def exact_metrics(target: Sequence[float], probs: Sequence[float]) -> dict[str, float]:
    """The metrics of a distribution ``probs`` taken as exact (no sampling): JS distance to ``target``
    and majority bias, under both their sampled and their ``_prob`` names."""
    top = max(range(len(target)), key=lambda i: target[i])
    js = float(jensenshannon(target, probs))
    return {
        "js_distance_sampled": js,
        "js_distance_prob": js,
        "majority_bias": probs[top] / target[top],
        "majority_bias_prob": probs[top] / target[top],
    }


def plot_distributions(details: Sequence[dict[str, Any]], path: str | Path, limit: int = 6) -> None:
    """Bar charts of the target, the model's probabilities and the sampled histogram, ``limit`` questions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = list(details[:limit])
    cols = min(3, len(shown)) or 1
    rows = (len(shown) + cols - 1) // cols or 1
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, d in zip(axes.flat, shown, strict=False):
        k = len(d["beliefs"])
        hist = [sum(1 for b in d["sampled"] if b == i) / max(1, len(d["sampled"])) for i in range(k)]
        xs = range(k)
        width = 0.27
        ax.bar([x - width for x in xs], d["target"], width, label="target")
        ax.bar(list(xs), d["probabilities"], width, label="model prob")
        ax.bar([x + width for x in xs], hist, width, label="sampled")
        ax.set_xticks(list(xs), [b[:14] for b in d["beliefs"]], rotation=20, fontsize=7)
        prompt = d["prompt"][-1]["content"] if isinstance(d["prompt"], list) else d["prompt"]
        ax.set_title(f"{d.get('population') or ''}: {prompt.split('. ', 1)[-1][:40]}", fontsize=8)
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(results: dict[str, dict[str, Any]], key: str = "overall") -> str:
    """Markdown: one row per named result (a model or a reference) of the metrics (``key``: "overall"
    or a population name)."""
    cols = [
        "js_distance_sampled",
        "js_distance_prob",
        "majority_bias",
        "majority_bias_prob",
        "belief_consistency",
    ]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, agg in results.items():
        row = agg[key] if key == "overall" else agg["populations"].get(key, {})
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" if c in row else "" for c in cols) + " |")
    return "\n".join(lines)
