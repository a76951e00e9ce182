"""Bootstrap intervals over prompts, and the paired comparison of two models' saved generations."""

import json
import math

import pytest

from grouppo.apps.cli import main
from grouppo.embedded.instructions import InstructionResult, if_metrics, if_units
from grouppo.evaluation import compare_generations
from grouppo.intervals import paired_difference, ratio_interval
from grouppo.load import write_jsonl


def test_interval_of_a_proportion_has_the_normal_width():
    # 0/1 outcomes, p = 0.5, n = 400: the normal interval is 0.5 +- 1.96 * sqrt(0.25 / 400) = +-0.049
    values = [1, 0] * 200
    low, high = ratio_interval(values)
    assert low < 0.5 < high
    assert 0.085 < high - low < 0.11
    assert ratio_interval(values) == [low, high]  # seeded


def test_interval_of_a_ratio_resamples_whole_prompts():
    # Every prompt holds 4 instructions, all followed or none: resampling prompts (not instructions)
    # must give the width of 10 prompts, not of 40 independent instructions.
    num, den = [4, 0] * 5, [4] * 10
    low, high = ratio_interval(num, den)
    prompt_low, prompt_high = ratio_interval([1, 0] * 5)
    assert math.isclose(high - low, prompt_high - prompt_low, abs_tol=1e-9)
    assert high - low > 0.4  # 10 prompts: wide


def test_interval_of_nothing_and_bad_shapes():
    assert all(math.isnan(x) for x in ratio_interval([]))
    with pytest.raises(ValueError, match="numerators"):
        ratio_interval([1, 2], [1])


def test_paired_difference_cancels_what_the_models_share():
    # B follows exactly the prompts A follows, plus 6 of 60 more: the unpaired intervals overlap widely,
    # the paired one excludes 0.
    a = [1] * 30 + [0] * 30
    b = [1] * 36 + [0] * 24
    ones = [1] * 60
    result = paired_difference((a, ones), (b, ones))
    assert math.isclose(result["difference"], 0.1)
    low, high = result["interval"]
    assert 0 < low <= 0.1 <= high and not result["includes_zero"]
    a_low, a_high = ratio_interval(a)
    b_low, b_high = ratio_interval(b)
    assert b_low < a_high  # unpaired: not told apart


def test_paired_difference_of_equal_models_is_zero():
    values = [1, 0, 1, 1, 0]
    result = paired_difference((values, [1] * 5), (values, [1] * 5))
    assert result == {"difference": 0.0, "interval": [0.0, 0.0], "includes_zero": True}
    with pytest.raises(ValueError, match="same units"):
        paired_difference(([1], [1]), ([1, 0], [1, 1]))


def test_if_units_leave_unscored_instructions_and_prompts_out():
    rows = [
        {"strict": [True, False], "loose": [True, True]},
        {"strict": [None, True], "loose": [None, True]},
        {"strict": [None], "loose": [None]},  # nothing scored: not a prompt of any metric
    ]
    units = if_units(rows)
    assert units["prompt_level_strict"] == ([0, 1], [1, 1])
    assert units["prompt_level_loose"] == ([1, 1], [1, 1])
    assert units["instruction_level_strict"] == ([1, 1], [2, 1])
    assert units["instruction_level_loose"] == ([2, 1], [2, 1])


def test_if_metrics_carry_their_intervals():
    results = [[InstructionResult("a", i % 3 == 0, True)] for i in range(30)]
    metrics = if_metrics(results)
    assert metrics["prompt_level_strict"] == 10 / 30
    for metric in ("prompt_level_strict", "instruction_level_strict"):
        low, high = metrics["ci95"][metric]
        assert low < metrics[metric] < high
    assert metrics["ci95"]["prompt_level_loose"] == [1.0, 1.0]


def _rows(followed: list[bool]) -> list[dict]:
    return [{"key": i, "prompt": f"p{i}", "response": "r", "strict": [f], "loose": [f]}
            for i, f in enumerate(followed)]  # fmt: skip


def test_compare_generations_pairs_rows_by_key():
    a = _rows([True] * 20 + [False] * 20)
    b = list(reversed(_rows([True] * 26 + [False] * 14)))  # another order: matched by key
    result = compare_generations(a, b)["prompt_level_strict"]
    assert result["prompts"] == 40
    assert math.isclose(result["difference"], 6 / 40) and not result["includes_zero"]
    with pytest.raises(ValueError, match="same prompts"):
        compare_generations(a, b[:-1])
    with pytest.raises(ValueError, match="twice"):
        compare_generations(a + a[:1], b)


def test_compare_generations_measures_both_models_on_the_same_instructions():
    # Prompt 0's second instruction is unscored for A only, prompt 1's only instruction for B only: both
    # are left out for both models: A and B are compared on prompt 0's first instruction and prompt 2.
    a = [{"key": 0, "strict": [True, None], "loose": [True, None]},
         {"key": 1, "strict": [True], "loose": [True]},
         {"key": 2, "strict": [False, True], "loose": [True, True]}]
    b = [{"key": 0, "strict": [True, False], "loose": [True, False]},
         {"key": 1, "strict": [None], "loose": [None]},
         {"key": 2, "strict": [True, True], "loose": [True, True]}]  # fmt: skip
    result = compare_generations(a, b)
    assert result["instruction_level_strict"]["prompts"] == 2  # prompt 1 has no instruction both scored
    assert result["instruction_level_strict"]["a"] == 2 / 3 and result["instruction_level_strict"]["b"] == 1.0
    assert result["prompt_level_strict"]["a"] == 0.5 and result["prompt_level_strict"]["b"] == 1.0


def test_scored_alike_leaves_out_everywhere_what_one_model_left_out():
    from grouppo.embedded.instructions import scored_alike

    a = [{"key": "x", "strict": [True, None], "loose": [True, None]}]
    b = [{"key": "x", "strict": [False, True], "loose": [False, True], "response": "kept"}]
    masked_a, masked_b = scored_alike(a, b)
    assert masked_a == [{"key": "x", "strict": [True, None], "loose": [True, None]}]
    assert masked_b == [{"key": "x", "strict": [False, None], "loose": [False, None], "response": "kept"}]
    assert b[0]["strict"] == [False, True]  # the rows given are not changed
    with pytest.raises(ValueError, match="not the same prompt"):
        scored_alike(a, [{"key": "y", "strict": [True, True], "loose": [True, True]}])
    with pytest.raises(ValueError, match="not one prompt set"):
        scored_alike(a, a + a)


def test_eval_compare_cli(tmp_path, capsys):
    write_jsonl(_rows([True, False] * 10), tmp_path / "a.jsonl")
    write_jsonl(_rows([True, True] * 10), tmp_path / "b.jsonl")
    out = tmp_path / "cmp.json"
    files = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert main(["eval", "compare", *files, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| prompt_level_strict | 0.500 | 1.000 | +0.500 |" in table and "excludes 0" in table
    saved = json.loads(out.read_text())
    assert saved["prompt_level_strict"]["includes_zero"] is False
    write_jsonl(_rows([True]), tmp_path / "c.jsonl")
    assert main(["eval", "compare", str(tmp_path / "a.jsonl"), str(tmp_path / "c.jsonl")]) != 0
    assert "same prompts" in capsys.readouterr().err


def test_seeds_and_prompts_difference_with_one_seed_is_the_paired_difference():
    import numpy as np

    from grouppo.intervals import seeds_and_prompts_difference

    rng = np.random.default_rng(3)
    a = (rng.integers(0, 3, 200).tolist(), [2] * 200)
    b = (rng.integers(0, 3, 200).tolist(), [2] * 200)
    one = seeds_and_prompts_difference([b], [a])
    assert {k: one[k] for k in ("difference", "interval", "includes_zero")} == paired_difference(a, b)
    assert one["per_seed"] == [one["difference"]]


def test_seeds_and_prompts_difference_widens_with_the_spread_between_seeds():
    import numpy as np

    from grouppo.intervals import seeds_and_prompts_difference

    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 400).astype(float)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:40]] = 1.0  # 40 prompts more followed: +0.1
    ones = [1.0] * 400
    # Seed 0: B gains 0.1 over A; seed 1: B loses 0.1. A mean of 0 with a spread between seeds that the
    # prompts alone do not show.
    b = [(better.tolist(), ones), (base.tolist(), ones)]
    a = [(base.tolist(), ones), (better.tolist(), ones)]
    spread = seeds_and_prompts_difference(b, a)
    same = seeds_and_prompts_difference([b[0], b[0]], [a[0], a[0]])
    assert spread["per_seed"][0] == -spread["per_seed"][1] > 0
    assert abs(spread["difference"]) < 1e-12 and spread["includes_zero"]
    assert same["interval"][1] - same["interval"][0] < spread["interval"][1] - spread["interval"][0]
    mean = seeds_and_prompts_difference(b)
    assert mean["difference"] == pytest.approx((better.sum() + base.sum()) / 800)
    with pytest.raises(ValueError, match="same seeds"):
        seeds_and_prompts_difference(b, a[:1])
    with pytest.raises(ValueError, match="same, non-empty set of prompts"):
        seeds_and_prompts_difference([(base.tolist(), ones), (base[:10].tolist(), ones[:10])])


def test_seeds_with_their_own_prompts_resample_each_seed_apart():
    import numpy as np

    from grouppo.intervals import seeds_and_prompts_difference

    rng = np.random.default_rng(5)
    runs = [
        tuple((rng.integers(0, 3, n).tolist(), [2] * n) for _ in range(2)) for n in (200, 150)
    ]  # seed 0: 200 prompts, seed 1: 150 others
    one = seeds_and_prompts_difference([runs[0][1]], [runs[0][0]], shared_prompts=False)
    assert {k: one[k] for k in ("difference", "interval", "includes_zero")} == paired_difference(*runs[0])
    both = seeds_and_prompts_difference([b for _, b in runs], [a for a, _ in runs], shared_prompts=False)
    assert both["per_seed"] == [paired_difference(a, b)["difference"] for a, b in runs]
    assert both["difference"] == pytest.approx(sum(both["per_seed"]) / 2)
    low, high = both["interval"]
    assert low < both["difference"] < high
    level = seeds_and_prompts_difference([b for _, b in runs], shared_prompts=False)
    assert level["per_seed"] == [sum(b[0]) / sum(b[1]) for _, b in runs]
    with pytest.raises(ValueError, match="seed 1"):
        seeds_and_prompts_difference([runs[0][1], runs[1][1]], [runs[0][0], runs[0][0]], shared_prompts=False)
