"""grouppo bench: the pair decompositions, and that every strategy runs and computes the same loss
where it makes the same comparisons (so the benchmark compares like with like)."""

import json

import pytest

from grouppo.apps.bench import BenchSpec, build_groups, main, run_one, to_pairs

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


def test_strategies_making_the_same_comparisons_have_the_same_loss(tmp_path):
    rows = {
        s: run_one(BenchSpec(strategy=s, group_size=4, **TINY), out=str(tmp_path))
        for s in ("coupled", "decoupled:1", "trl:all_pairs", "trl:best_vs_rest")
    }
    for row in rows.values():
        assert row["step_time_s"] > 0 and row["peak_mem_bytes"] >= row["static_mem_bytes"] > 0
        assert row["tokens_per_s"] > 0 and row["device"]
    assert rows["trl:all_pairs"]["pairs"] == 4 and rows["trl:best_vs_rest"]["pairs"] == 3
    assert rows["coupled"]["first_loss"] == pytest.approx(rows["trl:all_pairs"]["first_loss"], rel=1e-5)
    assert rows["decoupled:1"]["first_loss"] == pytest.approx(rows["coupled"]["first_loss"], rel=1e-6)


def test_cli_writes_json_rows_and_a_plot(tmp_path):
    out = tmp_path / "bench"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(["--strategies", "coupled", "--group-sizes", "2", "--out", str(out), *flags]) == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert row["strategy"] == "coupled" and "error" not in row, row
    assert out.with_suffix(".png").stat().st_size > 0


def test_find_max_k_doubles_until_a_run_fails(tmp_path, monkeypatch):
    import grouppo.apps.bench as bench

    def fake(spec, timeout=None):  # pretend K > 8 runs out of memory, without running anything
        if spec.group_size > 8:
            return {**bench._spec_row(spec), "error": "CUDA out of memory"}
        return {
            **bench._spec_row(spec),
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

    monkeypatch.setattr(bench, "run_isolated", fake)
    out = tmp_path / "maxk"
    args = ["--strategies", "coupled", "--group-sizes", "2", "--find-max-k", "--out", str(out)]
    assert main(args) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["max_k"] == {"coupled": 8}
    assert [r["group_size"] for r in result["rows"]] == [2, 4, 8, 16]
    assert "largest K trained, coupled: 8" in out.with_suffix(".md").read_text()


def test_timing_rounds_report_the_median_and_rescale_throughput():
    from grouppo.apps.bench import add_timing_round

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


def test_cli_rounds_time_every_run_again(tmp_path):
    out = tmp_path / "bench"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    args = ["--strategies", "coupled", "--group-sizes", "2", "--rounds", "2"]
    assert main([*args, "--out", str(out), *flags]) == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(row["round_step_times_s"]) == 2
