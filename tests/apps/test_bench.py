"""grouppo bench: the pair decompositions, and that every strategy runs and computes the same loss
where it makes the same comparisons (so the benchmark compares like with like); the memory-growth
mode and ``benchmarks/memory.py``, its front end. No test asserts a measured time or memory figure."""

import importlib.util
import json
import re
import statistics
from pathlib import Path

import pytest

import grouppo.apps.bench.memory as memory_bench
import grouppo.apps.bench.steps as steps_bench
from grouppo.apps.bench import main
from grouppo.apps.bench.memory import memory_growth_report, run_backward_memory
from grouppo.apps.bench.spec import BenchSpec, build_groups, device_description, spec_row, to_pairs
from grouppo.apps.bench.steps import add_timing_round, report, run_one
from grouppo.embedded.synthetic import random_groups

REPO = Path(__file__).resolve().parents[2]

TINY = dict(
    hidden=32,
    intermediate=64,
    layers=2,
    heads=2,
    kv_heads=2,
    vocab=200,
    prompt_len=6,
    response_len=5,
    steps=1,
    warmup=1,
)
TINY_FLAGS = [f"--{k}={v}" for k, v in TINY.items()]
TINY_TOKENS = TINY["prompt_len"] + 4 * TINY["response_len"]  # one group of K=4: the prompt counted once

# What report(), plot() and the summaries read from a training-step row.
STEP_FIELDS = {
    "strategy", "group_size", "chunk_size", "prompt_len", "response_len", "vocab_size", "peak_mem_bytes",
    "static_mem_bytes", "step_time_s", "step_times_s", "tokens_per_s", "first_loss", "mfu", "device",
    "params", "groups", "dtype", "pairs",
}  # fmt: skip
# What memory_growth_report() reads from a memory-growth row.
MEMORY_FIELDS = {
    "strategy", "group_size", "chunk_size", "prompt_len", "response_len", "vocab_size", "hidden_size",
    "intermediate_size", "heads", "layers", "params", "attn_implementation", "torch_threads", "dtype",
    "groups", "baseline_mem_bytes", "peak_mem_bytes", "step_increment_bytes", "step_time_s", "loss", "device",
}  # fmt: skip


def in_process(monkeypatch):
    """Memory-growth runs in this process instead of a subprocess each: fast, and measures nothing."""
    monkeypatch.setattr(
        memory_bench, "measure_step_memory", lambda spec, timeout=None: run_backward_memory(spec)
    )


def test_random_groups_lay_out_what_they_are_asked_for():
    fixed = random_groups([4, 3], [2, 1], seed=5, prompt_lens=[7, 2], response_len=9, vocab=50,
                          random_scores=False, ref_logps=True)  # fmt: skip
    assert [len(g["prompt_ids"]) for g in fixed] == [7, 2]
    assert [[len(r) for r in g["response_ids"]] for g in fixed] == [[9] * 4, [9] * 3]
    assert [g["labels"] for g in fixed] == [[1, 1, 0, 0], [1, 0, 0]]
    assert all(g["scores"] == [float(x) for x in g["labels"]] for g in fixed)
    ids = [t for g in fixed for t in g["prompt_ids"] + sum(g["response_ids"], [])]
    assert min(ids) >= 3 and max(ids) < 50  # never pad, bos or eos
    assert [len(g["ref_logps"]) for g in fixed] == [4, 3]
    varied = random_groups([5, 2], [1, 2], seed=5, max_response=4)
    assert {len(r) for g in varied for r in g["response_ids"]} <= {1, 2, 3, 4}
    assert [len(g["prompt_ids"]) for g in varied] == [3, 4]  # default 3 + g
    assert all(len(g["scores"]) == len(g["labels"]) and "ref_logps" not in g for g in varied)
    assert random_groups([5, 2], [1, 2], seed=5, max_response=4) == varied
    assert random_groups([5, 2], [1, 2], seed=6, max_response=4) != varied


def test_pair_decompositions_of_a_group():
    (group,) = build_groups(BenchSpec(group_size=6, **TINY))
    best = to_pairs([group], "best_vs_rest")
    every = to_pairs([group], "all_pairs")
    assert len(best) == 5 and len(every) == 9  # K - 1, and 3 positives x 3 negatives
    assert {tuple(p["chosen_ids"]) for p in every} == {tuple(r) for r in group["response_ids"][:3]}
    assert {tuple(p["rejected_ids"]) for p in every} == {tuple(r) for r in group["response_ids"][3:]}
    assert all(p["prompt_ids"] == group["prompt_ids"] for p in best + every)
    with pytest.raises(ValueError, match="decomposition"):
        to_pairs([group], "ranked")


@pytest.mark.slow
def test_strategies_making_the_same_comparisons_have_the_same_loss(tmp_path):
    rows = {
        s: run_one(BenchSpec(strategy=s, group_size=4, **TINY), out=str(tmp_path))
        for s in ("coupled", "decoupled:1", "trl:all_pairs", "trl:best_vs_rest")
    }
    for s, row in rows.items():
        assert STEP_FIELDS <= row.keys(), STEP_FIELDS - row.keys()
        assert spec_row(BenchSpec(strategy=s, group_size=4, **TINY)).items() <= row.items()
        assert len(row["step_times_s"]) == TINY["steps"]
        assert row["step_time_s"] == statistics.median(row["step_times_s"])
        assert row["tokens_per_s"] * row["step_time_s"] == pytest.approx(TINY_TOKENS)  # same data for all
        assert row["device"] == device_description()
    assert len({row["params"] for row in rows.values()}) == 1  # one model shape for every strategy
    table = report(list(rows.values()))
    assert [line.split(" | ")[:2] for line in table.splitlines() if line.startswith("| 4 |")] == [
        ["| 4", s] for s in rows
    ]
    assert rows["trl:all_pairs"]["pairs"] == 4 and rows["trl:best_vs_rest"]["pairs"] == 3
    assert rows["coupled"]["first_loss"] == pytest.approx(rows["trl:all_pairs"]["first_loss"], rel=1e-5)
    assert rows["decoupled:1"]["first_loss"] == pytest.approx(rows["coupled"]["first_loss"], rel=1e-6)


@pytest.mark.slow
def test_cli_writes_json_rows_and_a_plot(tmp_path):
    out = tmp_path / "bench"
    assert (
        main(
            ["steps", "--strategies", "coupled", "--group_sizes", "2", "--output_dir", str(out), *TINY_FLAGS]
        )
        == 0
    )
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert row["strategy"] == "coupled" and "error" not in row, row
    from PIL import Image

    with Image.open(out.with_suffix(".png")) as image:  # a picture, not just bytes
        assert image.size[0] > 100 and image.size[1] > 100


def test_find_max_k_doubles_until_a_run_fails(tmp_path, monkeypatch):
    def fake(spec, timeout=None):  # pretend K > 8 runs out of memory, without running anything
        if spec.group_size > 8:
            return {**spec_row(spec), "error": "CUDA out of memory"}
        return {
            **spec_row(spec),
            "peak_mem_bytes": 1,
            "step_time_s": 1.0,
            "tokens_per_s": 1.0,
            "mfu": None,
            "device": "fake",
            "params": 1,
            "groups": 1,
            "dtype": "float32",
            "pairs": None,
        }

    monkeypatch.setattr(steps_bench, "run_isolated", fake)
    out = tmp_path / "maxk"
    args = [
        "steps",
        "--strategies",
        "coupled",
        "--group_sizes",
        "2",
        "--find_max_k",
        "--output_dir",
        str(out),
    ]
    assert main(args) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["max_k"] == {"coupled": 8}
    assert [r["group_size"] for r in result["rows"]] == [2, 4, 8, 16]
    assert "largest K trained, coupled: 8" in out.with_suffix(".md").read_text()


def test_timing_rounds_report_the_median_and_rescale_throughput():
    row = {"step_time_s": 2.0, "tokens_per_s": 100.0, "mfu": 0.4}
    add_timing_round(row, {"step_time_s": 4.0})
    add_timing_round(row, {"step_time_s": 1.0})
    add_timing_round(row, {"error": "killed"})
    assert row["round_step_times_s"] == [2.0, 4.0, 1.0] and row["step_time_s"] == 2.0
    assert row["tokens_per_s"] == pytest.approx(100.0) and row["mfu"] == pytest.approx(0.4)
    add_timing_round(row, {"step_time_s": 4.0})  # rounds 1, 2, 4, 4: median 3
    assert row["step_time_s"] == 3.0
    assert row["tokens_per_s"] == pytest.approx(200 / 3) and row["mfu"] == pytest.approx(0.8 / 3)
    assert row["failed_rounds"] == ["killed"]


@pytest.mark.slow
def test_cli_rounds_time_every_run_again(tmp_path):
    out = tmp_path / "bench"
    args = ["steps", "--strategies", "coupled", "--group_sizes", "2", "--rounds", "2"]
    assert main([*args, "--output_dir", str(out), *TINY_FLAGS]) == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(row["round_step_times_s"]) == 2


def test_memory_rows_of_coupled_and_decoupled_have_the_same_loss():
    rows = {
        s: run_backward_memory(BenchSpec(strategy=s, group_size=4, **TINY))
        for s in ("coupled", "decoupled:1", "decoupled:3")
    }
    for s, row in rows.items():
        assert MEMORY_FIELDS <= row.keys(), MEMORY_FIELDS - row.keys()
        assert spec_row(BenchSpec(strategy=s, group_size=4, **TINY)).items() <= row.items()
        shape = (row["hidden_size"], row["intermediate_size"], row["layers"], row["heads"], row["kv_heads"])
        assert shape == tuple(TINY[k] for k in ("hidden", "intermediate", "layers", "heads", "kv_heads"))
        assert row["step_increment_bytes"] == row["peak_mem_bytes"] - row["baseline_mem_bytes"]
    assert rows["decoupled:1"]["loss"] == pytest.approx(rows["coupled"]["loss"], rel=1e-6)
    assert rows["decoupled:3"]["loss"] == pytest.approx(rows["coupled"]["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="coupled or decoupled"):
        run_backward_memory(BenchSpec(strategy="trl:all_pairs", group_size=4, **TINY))


def test_memory_growth_cli_renders_the_requested_grid(tmp_path, monkeypatch):
    in_process(monkeypatch)
    out = tmp_path / "memory"
    strategies = ["coupled", "decoupled:1", "decoupled:2"]
    args = ["memory", "--strategies", *strategies, "--group_sizes", "2", "4", "--output_dir", str(out)]
    assert main([*args, *TINY_FLAGS]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["command"] == "grouppo bench " + " ".join([*args, *TINY_FLAGS])
    assert [(r["group_size"], r["strategy"]) for r in result["rows"]] == [
        (k, s) for k in (2, 4) for s in strategies
    ]
    assert all("error" not in r for r in result["rows"])
    table = out.with_suffix(".md").read_text()
    wall = re.search(r" Total wall time \d+ s\.", table)  # the run's own wall time: not from the rows
    assert table.replace(wall.group(), "") == memory_growth_report(result["rows"], result["command"])
    body = [line.split(" | ") for line in table.splitlines() if line[:3] in ("| 2", "| 4")]
    # K, coupled, (increment, ratio) per chunk size, then a step time per strategy
    assert [cells[0] for cells in body] == ["| 2", "| 4"] and all(len(cells) == 9 for cells in body)
    stars = [[cells[i].endswith("*") for i in (2, 4)] for cells in body]  # one chunk: nothing decoupled
    assert stars == [[False, True], [False, False]]  # only K=2 at chunk 2
    assert "- decoupled (chunk 1): " in table and "- decoupled (chunk 2): " in table
    assert "K=4 vs K=2 (target for decoupled: <= 1.15x)" in table
    assert not (tmp_path / "memory.png").exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--strategies", "coupled", "trl:all_pairs"],
        ["--strategies", "decoupled:2"],
        ["--rounds", "2"],
        ["--find_max_k"],
    ],
)
def test_memory_growth_refuses_what_it_cannot_compare(flags, monkeypatch):
    in_process(monkeypatch)
    with pytest.raises((SystemExit, ValueError)):  # an option it does not take, or strategies it cannot pair
        main(["memory", *flags, *TINY_FLAGS])


def test_memory_table_reads_the_recorded_results():
    # The table the recorded rows (written by benchmarks/memory.py before it called grouppo bench) were
    # published with is rendered again from them, up to the paragraph that names the tool to time with.
    rows = json.loads((REPO / "benchmarks/results/memory_cpu.json").read_text())
    recorded = (REPO / "benchmarks/results/memory_cpu.md").read_text()
    rendered = memory_growth_report(rows, "", None)
    cut = "Step times are"
    assert rendered[: rendered.index(cut)] == recorded[: recorded.index(cut)]


def test_memory_script_keeps_its_command_line(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("memory_script", REPO / "benchmarks/memory.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.bench_argv(script.parse_args([])) == [
        "memory", "--strategies", "coupled", "decoupled:2", "--group_sizes", "2", "8", "32",
        "--prompt_len", "128", "--response_len", "256", "--hidden", "512", "--intermediate", "1408",
        "--heads", "8", "--kv_heads", "8", "--layers", "8", "--vocab", "32000", "--seed", "0",
        "--output_dir", "benchmarks/results/memory_cpu",
    ]  # fmt: skip
    in_process(monkeypatch)
    tiny = ["--hidden", "32", "--intermediate", "64", "--layers", "2", "--heads", "2", "--vocab", "200",
            "--prompt_len", "6", "--response_len", "5"]  # fmt: skip
    assert (
        script.main(
            ["--group_sizes", "2", "4", "--chunk_sizes", "1", "3", *tiny, "--output_dir", str(tmp_path)]
        )
        == 0
    )
    rows = json.loads((tmp_path / "memory_cpu.json").read_text())["rows"]
    assert [(r["group_size"], r["chunk_size"]) for r in rows] == [
        (k, c) for k in (2, 4) for c in (None, 1, 3)
    ]
    assert rows[0]["kv_heads"] == 2 and rows[0]["response_len"] == 5
    assert "| decoupled (chunk 3) step increment (MiB) |" in (tmp_path / "memory_cpu.md").read_text()


@pytest.mark.slow
def test_generation_bench_writes_every_row_against_the_plain_baseline(tmp_path, tokenizer):
    """``grouppo bench generation`` on a tiny model: both workloads, the plain baselines and grouppo's
    generator with each of its choices, the ratio column and the measured step bound (no figure checked:
    timing is not a test)."""
    from grouppo.embedded.synthetic import tiny_llama

    model_dir = tmp_path / "tiny"
    tiny_llama(tokenizer, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "gen"
    argv = ["generation", "--model_name_or_path", str(model_dir), "--prompts", "3", "--num_generations", "2",
            "--batch_size", "4", "--max_new_tokens", "5", "--output_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["rows"]
    assert len(rows) == 10 and {r["workload"] for r in rows} == {"greedy answers", "2 samples each"}
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert sum(r["generator"] == "plain generate, float32, batch 16" for r in rows) == 2
    table = out.with_suffix(".md").read_text()
    assert "| 1.00x |" in table and "at least" in table and result["command"] in table


@pytest.mark.slow
def test_precision_bench_times_both_precisions_and_measures_the_logp_cost(tmp_path, tokenizer):
    """``grouppo bench precision`` on a tiny model: a float32 and a bfloat16-autocast row with the
    ratio, and the log-prob differences, which are nonzero and small (no time checked)."""
    from grouppo.embedded.synthetic import tiny_llama

    model_dir = tmp_path / "tiny"
    tiny_llama(tokenizer, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "precision"
    assert (
        main(["precision", "--model_name_or_path", str(model_dir), "--steps", "2", "--output_dir", str(out)])
        == 0
    )
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["precision"] for r in result["rows"]] == ["float32", "bfloat16 autocast"]
    assert all(r["steps"] == 2 and r["median_step_s"] > 0 for r in result["rows"])
    d = result["logp_differences"]
    assert 0 < d["bf16_vs_fp32_mean"] <= d["bf16_vs_fp32_max"] < 0.05 * d["response_tokens_mean"]
    table = out.with_suffix(".md").read_text()
    assert "| float32 | 2 |" in table and "| 1.00x |" in table and result["command"] in table


def test_lookup_decoding_replay_counts_verification_passes():
    spec = importlib.util.spec_from_file_location("lookup_script", REPO / "benchmarks/lookup_decoding.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # The last token seen before: the most recent match of the longest suffix is proposed.
    assert script.lookup_draft([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2) == [7, 1]
    assert script.lookup_draft([1, 2, 3, 4], 3) == []
    # Nothing repeats: one pass per token, as plain decoding.
    assert script.passes([10, 11], [1, 2, 3, 4, 5], 4) == 5
    # An answer that copies the prompt: the first pass gives 1 token, each next one a draft of 4 plus the
    # model's own token.
    prompt = list(range(20, 40))
    assert script.passes(prompt, [20, *range(21, 31)], 4) == 3
    # A wrong draft costs nothing but the pass: the model's own token is still kept.
    assert script.passes([5, 6, 5, 7], [5, 8], 2) == 2
