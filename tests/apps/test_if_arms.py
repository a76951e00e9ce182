"""The pairs-vs-groups experiment's data views (experiments/if_arms.py): every arm sees the same prompts'
responses, pairs are labelled by score, and prompts without a preference in the view are left out."""

import importlib.util
from pathlib import Path

import pytest

from grouppo.data import prepare_groups

EXPERIMENTS = Path(__file__).parents[2] / "experiments"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if_arms = _load("if_arms")

GROUPS = [
    {"prompt": "p0", "key": "a", "responses": list("abcdefgh"), "scores": [0.5, 1, 0, 0.5, 1, 0, 0.5, 0.5]},
    {"prompt": "p1", "key": "b", "responses": list("abcdefgh"), "scores": [1, 1, 1, 1, 0, 0, 0, 0]},
    {"prompt": "p2", "key": "c", "responses": list("abcde"), "scores": [0, 0.5, 0.5, 0.5, 1]},
]


def test_best_worst_pairs_take_the_first_best_and_first_worst():
    records = if_arms.arm_records(GROUPS, "dpo_best_worst")
    assert [(r["responses"], r["labels"], r["scores"]) for r in records] == [
        (["b", "c"], [1, 0], [1, 0]),
        (["a", "e"], [1, 0], [1, 0]),
        (["e", "a"], [1, 0], [1, 0]),
    ]
    assert records[0]["key"] == "a" and records[0]["prompt"] == "p0"


def test_random_pairs_differ_in_score_are_labelled_by_it_and_are_seeded():
    records = if_arms.arm_records(GROUPS, "dpo_random_pair", seed=3)
    assert len(records) == 3
    for record in records:
        assert record["labels"] == [1, 0] and record["scores"][0] > record["scores"][1]
    assert records == if_arms.arm_records(GROUPS, "dpo_random_pair", seed=3)
    draws = {str(if_arms.arm_records(GROUPS, "dpo_random_pair", seed=s)) for s in range(8)}
    assert len(draws) > 1


def test_group_arms_take_the_first_k_and_drop_views_without_preference():
    k4 = if_arms.arm_records(GROUPS, "groupdpo_k4")
    # p1's first four responses all scored 1: nothing to contrast in that view.
    assert [r["key"] for r in k4] == ["a", "c"]
    assert k4[0]["responses"] == list("abcd") and "labels" not in k4[0]
    k8 = if_arms.arm_records(GROUPS, "groupdpo_k8")
    assert [len(r["responses"]) for r in k8] == [8, 8, 5]
    labelled, stats = prepare_groups(k8, positive_rule="top_bottom")
    assert stats.skipped == 0 and all(r["labels"].count(1) >= 1 for r in labelled)


def test_unknown_arm_is_an_error():
    with pytest.raises(ValueError, match="unknown arm"):
        if_arms.arm_records(GROUPS, "grpo")


def test_table_reports_accuracy_and_the_log_ratio_of_the_second_half(tmp_path):
    scores = dict.fromkeys(if_arms.METRICS, 0.25)
    before = {"ifeval": scores, "ifbench": scores}
    history = [{"step": s, "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s} for s in (1, 2, 3, 4)]
    history.append({"train_loss": 0.5})
    after = {"ifeval": dict.fromkeys(if_arms.METRICS, 0.5), "ifbench": scores}
    row = {"arm": "groupdpo_k8", "mode": "offline", "nll_weight": 0.2, "prompts": 21, "steps": 4,
           "after": after, "history": history}  # fmt: skip
    steps, values = zip(*if_arms.log_ratios(row, "chosen", beta=0.1), strict=True)
    assert steps == (1, 2, 3, 4) and values == pytest.approx([1.0, 2.0, 3.0, 4.0])
    lines = if_arms.table(before, [row], beta=0.1).splitlines()
    assert lines[2].startswith("| starting model |") and "0.250" in lines[2]
    # steps 3 and 4: (3 + 4) / 2 for the positives, the negatives mirrored
    expected = "| groupdpo_k8 | offline | 0.2 | 0 | 21 | 4 | 0.500 | 0.500 | 0.250 | 0.250 | +3.50 | -3.50 |"
    assert lines[3] == expected
    if_arms.plot_log_ratios([row], 0.1, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_committed_experiment_tables_are_rendered_from_the_committed_json():
    """The README's experiment tables come from experiments/results/*.json, not typed in by hand."""
    import json

    results = EXPERIMENTS / "results"
    gdpo_arms = _load("gdpo_arms")
    runs = {}
    for name in ("gdpo_arms", "gdpo_arms_seed1", "gdpo_arms_seed2"):
        gdpo = json.loads((results / f"{name}.json").read_text())
        assert gdpo_arms.markdown(gdpo["metrics"]) == (results / f"{name}.md").read_text()
        runs[gdpo["args"]["seed"]] = gdpo["metrics"]
    assert gdpo_arms.seed_table(runs) == (results / "gdpo_arms_seeds.md").read_text()
    from grouppo.apps.quickstart import summary_table

    main_job = json.loads((results / "quickstart_metrics.json").read_text())
    summary = summary_table(main_job["before"], main_job["after"], main_job["changes"])
    assert summary + "\n" == (results / "quickstart_summary.md").read_text()
    for mode in ("offline", "online"):
        run = json.loads((results / f"if_arms_{mode}.json").read_text())
        assert {row["mode"] for row in run["arms"]} == {mode}
        text = if_arms.markdown(run["before"], run["arms"], run["config"]["beta"])
        assert text + "\n" == (results / f"if_arms_{mode}.md").read_text()
    for name in ("if_arms", "if_arms_online128"):
        run = json.loads((results / f"{name}.json").read_text())
        text = if_arms.markdown(run["before"], run["arms"], run["config"]["beta"], run["comparison"])
        assert text + "\n" == (results / f"{name}.md").read_text()


def test_sampling_table_reads_skipped_groups_and_reward_from_the_online_history():
    history = [{"step": s, "online/equal_reward_groups": e, "reward/mean": r}
               for s, e, r in ((1, 0.5, 0.0), (2, 0.0, 0.2), (3, 1.0, 0.4), (4, 0.5, 0.6))]  # fmt: skip
    row = {"arm": "groupdpo_k8", "mode": "online", "nll_weight": 0.2, "seconds": 61.4,
           "history": [*history, {"train_loss": 0.5}]}  # fmt: skip
    # skipped: mean(0.5, 0, 1, 0.5) = 50%; quarter = 1 step: first 0.0, last 0.6
    assert if_arms.sampling_table([row]).splitlines()[2] == "| groupdpo_k8 | 0.2 | 50% | 0.000 | 0.600 | 61 |"
    before = {"ifeval": dict.fromkeys(if_arms.METRICS, 0.25)}
    offline_row = {**row, "mode": "offline", "prompts": 3, "steps": 4, "after": before}
    assert "groups skipped" not in if_arms.markdown(before, [offline_row], beta=0.1)
    assert "groups skipped" in if_arms.markdown(before, [{**offline_row, "mode": "online"}], beta=0.1)


def _saved(path, passed):
    """Saved generations of 4 prompts with 2 instructions each: ``passed[i]`` of prompt i's followed."""
    from grouppo.load import write_jsonl

    rows = [{"key": i, "prompt": f"p{i}", "strict": [n > 0, n > 1], "loose": [n > 0, n > 1]}
            for i, n in enumerate(passed)]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(rows, path)


def test_arms_are_compared_with_the_best_pairwise_arm_on_the_same_prompts(tmp_path):
    # prompt-level strict: best_worst 2/4, random_pair 1/4, k8 4/4, starting model 0/4
    passed = {"dpo_best_worst": [2, 2, 1, 0], "dpo_random_pair": [2, 1, 0, 0], "groupdpo_k8": [2, 2, 2, 2]}
    rows = []
    for arm, values in passed.items():
        row = {"arm": arm, "mode": "offline", "nll_weight": 0.2, "seed": 0}
        for benchmark in ("ifeval", "ifbench"):
            _saved(tmp_path / "arms" / if_arms._tag(row) / "eval" / f"after_{benchmark}.jsonl", values)
        accuracy = sum(v == 2 for v in values) / 4
        row["after"] = {b: {"prompt_level_strict": accuracy} for b in ("ifeval", "ifbench")}
        rows.append(row)
    for benchmark in ("ifeval", "ifbench"):
        _saved(tmp_path / "eval" / f"before_{benchmark}.jsonl", [0, 1, 1, 0])
    comparison = if_arms.comparisons(tmp_path, rows)
    assert comparison["reference"] == "offline_dpo_best_worst_nll0.2_seed0"
    assert set(comparison["arms"]) == {"starting model", "offline_dpo_random_pair_nll0.2_seed0",
                                       "offline_groupdpo_k8_nll0.2_seed0"}  # fmt: skip
    k8 = comparison["arms"]["offline_groupdpo_k8_nll0.2_seed0"]["ifeval"]
    assert k8["prompt_level_strict"]["difference"] == pytest.approx(0.5)  # 4/4 - 2/4
    assert k8["instruction_level_strict"]["difference"] == pytest.approx(8 / 8 - 5 / 8)
    start = comparison["arms"]["starting model"]["ifbench"]["prompt_level_strict"]
    assert start["difference"] == pytest.approx(-0.5) and start["prompts"] == 4
    text = if_arms.comparison_table(comparison)
    assert "+0.500 [" in text and "Smallest detectable difference" in text


def test_seed_table_reports_mean_and_range_of_arms_run_with_several_seeds():
    rows = [{"arm": "groupdpo_k8", "mode": "offline", "nll_weight": 0.2, "seed": s,
             "after": {"ifeval": {"prompt_level_strict": v, "instruction_level_strict": v}}}
            for s, v in ((0, 0.2), (1, 0.3), (2, 0.4))]  # fmt: skip
    single = {**rows[0], "arm": "dpo_best_worst"}
    line = if_arms.seed_table([*rows, single]).splitlines()[2]
    assert line == "| groupdpo_k8 | offline | 0.2 | 0,1,2 | 0.300 (0.200 to 0.400) | 0.300 (0.200 to 0.400) |"
    assert if_arms.seed_table([single]) == ""


def test_gdpo_interval_table_pairs_models_on_the_same_prompts():
    gdpo_arms = _load("gdpo_arms")
    uniform = [0.3, 0.3, 0.3, 0.3]

    def arm(js, bias):
        values = zip(js, bias, uniform, strict=True)
        return {"per_prompt": [{"population": "A", "js_distance_prob": j, "majority_bias_prob": b,
                                "uniform_js_distance_prob": u} for j, b, u in values]}  # fmt: skip

    metrics = {"sft": arm([0.4, 0.5, 0.4, 0.5], [0.5, 0.6, 0.5, 0.6]),
               "sft_gdpo": arm([0.2, 0.3, 0.2, 0.3], [1.5, 1.6, 1.4, 1.7])}  # fmt: skip
    lines = gdpo_arms.interval_table(metrics).splitlines()
    assert lines[2].startswith("| sft | 0.450 [") and lines[2].endswith("| below 1 |")
    gdpo = lines[3].split(" | ")
    assert gdpo[2] == "-0.200 [-0.200, -0.200] closer"  # the same gap on every prompt
    assert gdpo[3].startswith("-0.050 [") and lines[3].endswith("| above 1 |")
    assert lines[4].startswith("| (uniform) | 0.300 [0.300, 0.300] |")


@pytest.mark.parametrize("arm", ["groupdpo_k8", "groupdpo_k8_above_mean"])
def test_group_arms_keep_all_k_and_never_pair_tied_scores(arm):
    records = if_arms.arm_records(GROUPS, arm)
    assert [len(r["responses"]) for r in records] == [8, 8, 5]
    labelled, _ = prepare_groups(records, positive_rule=if_arms.GROUP_RULES[arm])
    for record in labelled:
        positives = [s for s, label in zip(record["scores"], record["labels"], strict=True) if label == 1]
        negatives = [s for s, label in zip(record["scores"], record["labels"], strict=True) if label == 0]
        assert min(positives) > max(negatives)


def test_top_bottom_drops_the_tied_middle_run_where_halves_would_split_it():
    # p0 ranks 1, 1, 0.5 x 4, 0, 0: its halves would split the 0.5s; the nearest score boundaries (after
    # the 1s, before the 0s) are equally far from the middle, so the 0.5s are dropped.
    labelled, _ = prepare_groups(if_arms.arm_records(GROUPS, "groupdpo_k8"), positive_rule="top_bottom")
    assert labelled[0]["scores"] == [1, 0, 1, 0] and labelled[0]["labels"] == [1, 0, 1, 0]


def test_gdpo_seed_table_shows_every_seed_and_gdpos_paired_lead_per_seed():
    gdpo_arms = _load("gdpo_arms")

    def arm(js):
        return {"per_prompt": [{"js_distance_prob": j, "uniform_js_distance_prob": 0.3} for j in js]}

    def run(shift):
        split = {"sft": arm([0.4 + shift, 0.5 + shift]), "sft_gdpo": arm([0.2 + shift, 0.4 + shift])}
        return {"train": split, "test": split}

    lines = gdpo_arms.seed_table({0: run(0.0), 1: run(0.1)}).splitlines()
    assert lines[0] == "Seeds: 0, 1."
    assert lines[4] == "| train | sft | 0.450, 0.550 | 0.500 (0.450 to 0.550) |"
    assert lines[6] == "| train | (uniform) | 0.300, 0.300 | 0.300 (0.300 to 0.300) |"
    # GDPO - SFT is -0.2 or -0.1 on the two prompts: its interval excludes 0 at both seeds.
    assert lines[13].startswith("| train | 0 | -0.150 [-0.200, -0.100] closer | ")
    assert lines[14].startswith("| train | 1 | -0.150 [-0.200, -0.100] closer | ")
