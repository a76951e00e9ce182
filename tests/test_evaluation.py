"""``grouppo eval``: the metrics JSON and the saved generations, on a tiny model."""

import json

import pytest
from conftest import recompute_metrics

from grouppo.apps.cli import main
from grouppo.embedded.instructions import check_response
from grouppo.embedded.synthetic import tiny_llama
from grouppo.evaluation import benchmark_prompts

KEYS = {
    "num_prompts",
    "prompt_level_strict",
    "prompt_level_loose",
    "instruction_level_strict",
    "instruction_level_loose",
    "unscored_instructions",
}


# Prompts with unscored instructions: an unknown id, and a checker whose nltk data is not installed.
# "p4" has nothing scored, so it is left out of the prompt-level metrics.
UNSCORED = [
    {"key": "p1", "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {
        "key": "p2",
        "prompt": "Say hi.",
        "instruction_id_list": ["punctuation:no_comma", "made_up:unknown"],
        "kwargs": [{}, {}],
    },
    {
        "key": "p3",
        "prompt": "Say hi.",
        "instruction_id_list": ["change_case:english_capital", "length_constraints:number_sentences"],
        "kwargs": [{}, {"num_sentences": 2, "relation": "less than"}],
    },
    {"key": "p4", "prompt": "Say hi.", "instruction_id_list": ["made_up:unknown"], "kwargs": [{}]},
]


@pytest.mark.parametrize(
    "benchmark,limit,prompts", [("ifeval", 3, None), ("ifbench", 2, None), ("ifeval", 4, UNSCORED)]
)
def test_eval_cli_writes_metrics_and_generations(tmp_path, tokenizer, benchmark, limit, prompts):
    model_dir = tmp_path / "tiny"
    tiny_llama(tokenizer, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    metrics_path, generations_path = tmp_path / "m.json", tmp_path / "g.jsonl"
    argv = [
        "eval",
        benchmark,
        "--model_name_or_path",
        str(model_dir),
        "--limit",
        str(limit),
        "--max_new_tokens",
        "5",
        "--json",
        str(metrics_path),
        "--save_generations",
        str(generations_path),
    ]
    prompts_path = None
    if prompts is not None:
        prompts_path = tmp_path / "prompts.jsonl"
        prompts_path.write_text("".join(json.dumps(r) + "\n" for r in prompts))
        argv += ["--dataset_name", str(prompts_path)]
    assert main(argv) == 0
    metrics = json.loads(metrics_path.read_text())
    assert KEYS <= set(metrics) and metrics["num_prompts"] == limit
    rows = [json.loads(line) for line in generations_path.read_text().splitlines()]
    assert len(rows) == limit and all({"key", "prompt", "response"} <= set(r) for r in rows)
    assert all(r["key"] for r in rows)
    # Each saved generation carries one strict and one loose result per instruction of its prompt, as the
    # official checkers score the saved response again...
    records = benchmark_prompts(benchmark, prompts=prompts_path and str(prompts_path), limit=limit)
    for row, record in zip(rows, records, strict=True):
        assert (row["key"], row["prompt"]) == (record.get("key"), record["prompt"])
        checks = check_response(
            row["response"],
            record["instruction_id_list"],
            record["kwargs"],
            record["prompt"],
            benchmark=benchmark,
        )
        assert row["strict"] == [c.strict for c in checks] and row["loose"] == [c.loose for c in checks]
        pairs = zip(row["strict"], row["loose"], strict=True)
        assert all(s is None or (s is False or lo is True) for s, lo in pairs)  # strict implies loose
    # ... and the metrics JSON is exactly what those per-instruction results give.
    expected = recompute_metrics(rows)
    assert {key: metrics[key] for key in expected} == pytest.approx(expected, abs=1e-12)
    assert metrics["benchmark"] == benchmark
    if prompts is UNSCORED:
        assert [r["strict"].count(None) for r in rows] == [0, 1, 1, 1]
        assert metrics["unscored_instructions"] == 3 and metrics["num_scored_prompts"] == 3


def test_prompt_records_are_checked_before_anything_is_generated(tmp_path):
    from grouppo.data import DataError

    path = tmp_path / "prompts.jsonl"
    rows = [UNSCORED[0], {**UNSCORED[1], "kwargs": [{}]}]  # two instructions, one kwargs object
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"{path}: line 2: field 'kwargs': expected a list of 2 objects"):
        benchmark_prompts("ifeval", prompts=str(path))
    assert len(benchmark_prompts("ifeval", prompts=str(path), limit=1)) == 1  # only what is used is checked
