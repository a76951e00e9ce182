"""Instruction-following evaluation: greedy answers to IFEval-style or IFBench prompts, checked by the
official checkers (``grouppo.embedded.instructions``).

``ifeval`` runs on held-out prompts from ``grouppo data make-if-prompts`` (split ``eval``: base
requests never seen in training); ``ifbench`` on the 294 IFBench test prompts, which are never trained on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from grouppo.data import DataError, record_error, record_locations, type_name
from grouppo.embedded.instructions import (
    check_response,
    if_metrics,
    load_ifbench,
    make_if_prompts,
    require_benchmark,
)
from grouppo.generation import Generator, SamplingConfig, TransformersGenerator
from grouppo.load import load_records, write_jsonl
from grouppo.tokenize import chat_prompt

GREEDY = SamplingConfig(max_new_tokens=384, temperature=0.0, batch_size=16, seed=0)


def check_prompt_records(records: Sequence[Any], source: str = "prompts", limit: int | None = None) -> None:
    """Raise a DataError naming the record (its line in a JSONL file) and the field unless each of the
    first ``limit`` records is an instruction-following prompt record: ``prompt`` (text or chat messages),
    ``instruction_id_list`` (strings) and ``kwargs`` (one object per instruction)."""
    source, locations = record_locations(records, source)
    if not records:
        raise DataError(f"{source}: no prompt records")
    for index, record in enumerate(records[:limit]):
        where = locations[index] if locations else index
        if not isinstance(record, Mapping):
            raise record_error(source, where, None, f"expected an object, got {type_name(record)}")
        prompt = record.get("prompt")
        if not prompt or not isinstance(prompt, str | list):
            problem = f"expected non-empty text or messages, got {prompt!r}"
            raise record_error(source, where, "prompt", problem)
        ids, kwargs = record.get("instruction_id_list"), record.get("kwargs")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            problem = f"expected a list of strings, got {ids!r}"
            raise record_error(source, where, "instruction_id_list", problem)
        if (
            not isinstance(kwargs, list)
            or len(kwargs) != len(ids)
            or not all(isinstance(k, Mapping | None) for k in kwargs)
        ):
            raise record_error(
                source, where, "kwargs", f"expected a list of {len(ids)} objects (one per instruction), "
                f"got {kwargs!r}",
            )  # fmt: skip


def benchmark_prompts(
    benchmark: str, *, prompts: str | None = None, n: int = 200, seed: int = 0, limit: int | None = None
) -> list[dict[str, Any]]:
    """The prompt records of a benchmark: a JSONL file (or any ``load_records`` source) when given, else
    the held-out generated prompts (``ifeval``: ``n`` records of split ``eval`` drawn with ``seed``) or
    the IFBench test set. Records read from ``prompts`` are checked (``check_prompt_records``)."""
    require_benchmark(benchmark)
    if prompts is not None:
        records = load_records(prompts)
        check_prompt_records(records, source=str(prompts), limit=limit)
    elif benchmark == "ifbench":
        records = load_ifbench()
    else:
        records = make_if_prompts(n, seed, split="eval")
    return records[:limit] if limit is not None else records


def evaluate_instruction_following(
    generator: Generator, tokenizer: Any, records: Sequence[Mapping[str, Any]], benchmark: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Answer every prompt once with ``generator`` and check the answers.

    Returns the metrics of ``grouppo.embedded.instructions.if_metrics`` (with ``benchmark``) and one
    generation record per prompt: ``key``, ``prompt``, ``instruction_id_list``, ``kwargs``, ``response`` and
    the per-instruction ``strict`` and ``loose`` results (None: the checker cannot run here), everything
    needed to recompute the metrics or to check the answers again.
    """
    answers = generator.generate([chat_prompt(r["prompt"], tokenizer) for r in records], 1)
    results, generations = [], []
    for record, (response,) in zip(records, answers, strict=True):
        checks = check_response(
            response, record["instruction_id_list"], record["kwargs"], record["prompt"], benchmark=benchmark
        )
        results.append(checks)
        generations.append(
            {
                "key": record.get("key"),
                "prompt": record["prompt"],
                "instruction_id_list": list(record["instruction_id_list"]),
                "kwargs": list(record["kwargs"]),
                "response": response,
                "strict": [c.strict for c in checks],
                "loose": [c.loose for c in checks],
            }
        )
    return {"benchmark": benchmark, **if_metrics(results)}, generations


def run_eval(
    model: Any,
    tokenizer: Any,
    benchmark: str,
    *,
    prompts: str | None = None,
    records: Sequence[Mapping[str, Any]] | None = None,
    limit: int | None = None,
    sampling: SamplingConfig = GREEDY,
    json_path: str | Path | None = None,
    generations_path: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``benchmark`` and write the metrics JSON and the generations JSONL if asked.

    The prompt records are ``records`` when given (already read, e.g. before the model was loaded), else
    ``benchmark_prompts(benchmark, prompts=prompts, limit=limit)``. ``sampling.progress`` shows a bar of
    the answers generated.
    """
    if records is None:
        records = benchmark_prompts(benchmark, prompts=prompts, limit=limit)
    metrics, generations = evaluate_instruction_following(
        TransformersGenerator(model, tokenizer, sampling), tokenizer, records, benchmark
    )
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if generations_path is not None:
        write_jsonl(generations, generations_path)
    return metrics


def match_prompts(
    models: Mapping[str, Sequence[Mapping[str, Any]]],
) -> dict[str, dict[Any, Mapping[str, Any]]]:
    """Each model's saved generations keyed by prompt (``key``, else ``prompt``), in the first model's
    order; ValueError when a row has no per-instruction results, a prompt appears twice, or the models
    do not hold the same prompts."""
    out: dict[str, dict[Any, Mapping[str, Any]]] = {}
    for name, rows in models.items():
        keyed: dict[Any, Mapping[str, Any]] = {}
        for i, row in enumerate(rows):
            if not {"strict", "loose"} <= set(row):
                raise ValueError(f"{name} row {i + 1}: no per-instruction results (strict, loose)")
            key = row.get("key") if row.get("key") is not None else row.get("prompt")
            if key in keyed:
                raise ValueError(f"{name}: prompt {key!r} appears twice")
            keyed[key] = row
        if out:
            first, reference = next(iter(out.items()))
            if keyed.keys() != reference.keys():
                only = sorted(map(str, keyed.keys() ^ reference.keys()))
                raise ValueError(
                    f"{first} and {name} are not generations on the same prompts: they differ in {len(only)} "
                    f"prompts (first: {only[0]!r})"
                )
        out[name] = keyed
    return out


def compare_generations(
    a_rows: Sequence[Mapping[str, Any]], b_rows: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Two models' saved generations on the same prompts (``--save_generations`` files), compared: per
    IFEval metric, A, B, ``B - A`` and its paired 95% bootstrap interval over prompts.

    Rows are matched by ``key`` (by ``prompt`` where a row has no key); both files must hold the same
    prompts, each once, with the same instructions."""
    from grouppo.embedded.instructions import if_units, scored_alike
    from grouppo.intervals import paired_difference

    rows = match_prompts({"A": a_rows, "B": b_rows})
    a, b = rows["A"], rows["B"]
    keys = list(a)
    # Both on the same instructions (scored_alike checks each prompt has as many): one left unscored for
    # either model is left out for both.
    rows_a, rows_b = scored_alike([a[k] for k in keys], [b[k] for k in keys])
    units_a, units_b = if_units(rows_a), if_units(rows_b)
    out: dict[str, dict[str, Any]] = {}
    for metric in units_a:
        (na, da), (nb, db) = units_a[metric], units_b[metric]
        result = paired_difference((na, da), (nb, db))
        out[metric] = {"a": sum(na) / sum(da), "b": sum(nb) / sum(db), **result, "prompts": len(na)}
    return out


def compare_table(comparison: Mapping[str, Mapping[str, Any]], a_name: str = "A", b_name: str = "B") -> str:
    """A markdown table of ``compare_generations``' result, saying where the interval holds 0."""
    lines = [
        "| metric | A | B | B - A | 95% interval | |",
        "|---|---:|---:|---:|---|---|",
    ]
    for metric, r in comparison.items():
        low, high = r["interval"]
        verdict = "includes 0: not distinguishable" if r["includes_zero"] else "excludes 0"
        lines.append(
            f"| {metric} | {r['a']:.3f} | {r['b']:.3f} | {r['difference']:+.3f} | "
            f"[{low:+.3f}, {high:+.3f}] | {verdict} |"
        )
    first = next(iter(comparison.values()), {"prompts": 0})
    lines.append(f"\nA = {a_name}, B = {b_name}; {first['prompts']} prompts, paired bootstrap over prompts.")
    return "\n".join(lines)
