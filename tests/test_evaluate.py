"""``grouppo eval``: the metrics JSON and the saved generations, on a tiny model."""

import json

import pytest

from grouppo.apps.cli import main
from grouppo.embedded.synthetic import tiny_llama

KEYS = {"num_prompts", "prompt_level_strict", "prompt_level_loose", "instruction_level_strict",
        "instruction_level_loose", "unscored_instructions"}  # fmt: skip


@pytest.mark.parametrize("benchmark,limit", [("ifeval", 3), ("ifbench", 2)])
def test_eval_cli_writes_metrics_and_generations(tmp_path, tokenizer, benchmark, limit):
    model_dir = tmp_path / "tiny"
    tiny_llama(tokenizer, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    metrics_path, generations_path = tmp_path / "m.json", tmp_path / "g.jsonl"
    argv = ["eval", benchmark, "--model", str(model_dir), "--limit", str(limit), "--max_new_tokens", "5",
            "--json", str(metrics_path), "--save_generations", str(generations_path)]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads(metrics_path.read_text())
    assert KEYS <= set(metrics) and metrics["num_prompts"] == limit
    rows = [json.loads(line) for line in generations_path.read_text().splitlines()]
    assert len(rows) == limit and all({"key", "prompt", "response"} <= set(r) for r in rows)
    assert all(r["key"] for r in rows)
