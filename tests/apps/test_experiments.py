"""The pre-registered experiments' data views and baselines (experiments/if_groups.py, gdpo_curve.py)."""

import argparse
import json
import math
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).parents[2] / "experiments"


sys.path.insert(0, str(EXPERIMENTS))
import gdpo_curve  # noqa: E402
import if_groups  # noqa: E402

POOL = [
    # The first response that scores unlike the first is the fourth: it moves to second place.
    {"split": "train", "key": "a", "prompt": "p", "responses": list("abcdefghijklmnop"),
     "scores": [0.5, 0.5, 0.5, 1, 0, 0.5, 0.5, 0.5, 1, 1, 0, 0, 0.5, 0.5, 0.5, 0.5]},
    # All tied: no arm trains on it.
    {"split": "train", "key": "b", "prompt": "q", "responses": list("abcdefghijklmnop"), "scores": [1] * 16},
    # Empty responses are dropped before ordering.
    {"split": "train", "key": "c", "prompt": "r", "responses": [" ", "x", "y", *"abcdefghijklm"],
     "scores": [1, 0, 1, *([0.5] * 13)]},
    {"split": "validation", "key": "d", "prompt": "s", "responses": list("abcdefghijklmnop"),
     "scores": [0, 1] * 8},
]  # fmt: skip


def test_views_are_nested_hold_a_preference_and_cover_the_same_prompts():
    views = {name: if_groups.arm_records(POOL, arm) for name, arm in if_groups.ARMS.items()}
    assert {name: [r["key"] for r in v] for name, v in views.items()} == {name: ["a", "c"] for name in views}
    assert views["groupdpo_k2"][0]["responses"] == ["a", "d"]
    assert views["groupdpo_k4"][0]["responses"] == ["a", "d", "b", "c"]
    assert views["groupdpo_k2"][1]["responses"] == ["x", "y"]
    for k in (2, 4, 8, 16):
        for record in views[f"groupdpo_k{k}"]:
            assert len(set(record["scores"])) > 1 and len(record["responses"]) == min(
                k, 15 if record["key"] == "c" else 16
            )
    small, big = views["groupdpo_k8"][0]["responses"], views["groupdpo_k16"][0]["responses"]
    assert big[:8] == small


def test_best_worst_takes_the_extremes_of_the_first_eight():
    a, c = if_groups.arm_records(POOL, if_groups.ARMS["dpo_best_worst"])
    assert a["responses"] == ["d", "e"] and a["scores"] == [1, 0] and a["labels"] == [1, 0]
    assert c["responses"] == ["y", "x"] and c["scores"] == [1, 0]
    assert [
        r["key"] for r in if_groups.arm_records(POOL, if_groups.ARMS["groupdpo_k8"], split="validation")
    ] == ["d"]


def test_the_pre_registered_verdicts():
    verdict = if_groups.verdict
    assert verdict({"interval": [0.01, 0.05]}, 0.045) == "B better"
    assert verdict({"interval": [-0.05, -0.01]}, 0.045) == "A better"
    assert verdict({"interval": [-0.02, 0.03]}, 0.045).startswith("equivalent")
    assert verdict({"interval": [-0.02, 0.06]}, 0.045) == "inconclusive at this scale"
    # The plan's margin is the default: an interval the plan calls inconclusive is not "equivalent".
    assert if_groups.MDE == 0.045 and verdict({"interval": [-0.040, 0.049]}) == "inconclusive at this scale"
    assert verdict({"interval": [-0.045, 0.03]}) == "inconclusive at this scale"  # open bounds
    assert verdict({"interval": [0.0, 0.03]}) == "equivalent within ±0.045"  # touching 0 is not "better"


def test_models_are_compared_on_the_same_prompts_and_instructions_matched_by_key():
    def row(key, strict):
        return {"key": key, "strict": strict, "loose": strict}

    start = [row(2, [True, None]), row(1, [False])]
    arm = [row(1, [True]), row(2, [False, True])]  # another order; instruction 2 of prompt 2 scored here
    rows = if_groups.aligned({("start", None, "ifeval"): start, ("arm", 0, "ifeval"): arm})
    assert rows[("start", None, "ifeval")] == [row(1, [False]), row(2, [True, None])]
    assert rows[("arm", 0, "ifeval")] == [row(1, [True]), row(2, [False, None])]  # unscored in one: in all
    with pytest.raises(ValueError, match="differ in 2 prompts"):
        if_groups.aligned(
            {("start", None, "ifeval"): start, ("arm", 0, "ifeval"): [row(1, [True]), row(3, [True])]}
        )
    with pytest.raises(ValueError, match="appears twice"):
        if_groups.aligned({("start", None, "ifeval"): start, ("arm", 0, "ifeval"): arm + arm[:1]})


def test_the_spread_beside_the_primary_interval():
    # Seed differences 0.1 and 0.3: mean 0.2, SD 0.1414; t(0.975, 1) = 12.706, so 0.2 -+ 1.2706.
    a = ([0] * 10, [1] * 10)
    b = [([1] + [0] * 9, [1] * 10), ([1] * 3 + [0] * 7, [1] * 10)]
    line = if_groups.spread_line([0.1, 0.3], b, [a, a])
    assert "standard deviation of the 2 seeds' differences 0.1414" in line
    assert "(1 degree of freedom) [-1.0706, +1.4706]" in line
    one = if_groups.spread_line([0.1], b[:1], [a])
    assert "standard error over prompts 0.09" in one and "t-interval" not in one  # sqrt(.09/10) = 0.095


def test_held_out_log_probs_take_each_seeds_own_validation_groups():
    # Each seed's pool decides which validation prompts have untied responses: seed 0 scores groups "d"
    # and "e", seed 1 only "e". Means are per seed over its own groups, then over seeds.
    def rows(model, seed, shift):
        keys = ["d", "e"] if seed == 0 else ["e"]
        return [
            {"model": model, "seed": seed, "key": k, "slot": slot, "label": label, "score": 0.0,
             "tokens": 2, "logp": 2 * (-1.0 - i - label + shift)}
            for i, k in enumerate(keys) for slot, label in enumerate((1, 0))
        ]  # fmt: skip

    models = (("starting model", 0), ("x", 0.5))
    records = [r for seed in (0, 1) for m, shift in models for r in rows(m, seed, shift)]
    table = "\n".join(if_groups.heldout_table(records, [0, 1], ["starting model", "x"]))
    assert "2 at seed 0, 1 at seed 1" in table
    # positives: seed 0 mean of -2 and -3, seed 1 -2: mean over seeds -2.25; x is 0.5 higher everywhere.
    assert "| starting model | -2.250 |  | -1.250 |  |" in table
    assert "| x | -1.750 | +0.500 [+0.500, +0.500] | -0.750 | +0.500 [+0.500, +0.500] |" in table
    pairs = [("starting model", "x")]
    between = "\n".join(if_groups.heldout_table(records, [0, 1], ["starting model", "x"], pairs))
    exact = "+0.500 [+0.500, +0.500] *"
    assert f"| x - starting model | {exact} | +0.500, +0.500 | {exact} | +0.500, +0.500 |" in between
    # Paired by (key, slot), never by position: a response missing from one model's records is an error.
    with pytest.raises(ValueError, match="x, seed 0"):
        if_groups.heldout_table(records[1:], [0, 1], ["starting model", "x"])


def test_gdpo_baselines_know_the_question_or_the_population_never_both():
    def row(split, q, population, target):
        return {"split": split, "question_id": q, "population": population, "target": target}

    rows = [
        row("train", 0, "A", [0.8, 0.2]), row("train", 0, "B", [0.2, 0.8]),
        row("train", 1, "A", [0.6, 0.4]), row("train", 1, "B", [0.4, 0.6]),
        row("train", 2, "A", [0.7, 0.2, 0.1]), row("train", 2, "B", [0.1, 0.2, 0.7]),
        row("test", 3, "A", [0.5, 0.3, 0.1, 0.1]), row("test", 3, "B", [0.1, 0.1, 0.3, 0.5]),
    ]  # fmt: skip
    base = gdpo_curve.baselines(rows)
    assert base[("train", 0, "A")]["pooled"] == pytest.approx([0.5, 0.5])
    assert base[("train", 0, "A")]["population prior"] == pytest.approx([0.7, 0.3])  # both 2-option questions
    assert base[("train", 2, "B")]["population prior"] == pytest.approx([0.1, 0.2, 0.7])
    # No 4-option training question: A's training shapes resampled onto 4 positions, normalized.
    prior = base[("test", 3, "A")]["population prior"]
    assert sum(prior) == pytest.approx(1) and prior[0] > prior[-1]
    assert base[("test", 3, "B")]["uniform"] == [0.25] * 4
    m = gdpo_curve.measures([0.5, 0.3, 0.2], [1.0, 0.0, 0.0], [0.2, 0.5, 0.3])
    assert m["entropy"] == 0 and m["pooled_top_mass"] == 0 and m["target_on_pooled_top"] == 0.3
    assert m["majority_bias"] == 2.0 and m["target_entropy"] == pytest.approx(1.0297, abs=1e-4)
    # The relative entropy is a ratio of sums: a near one-hot target does not dominate it as it would a
    # mean of ratios (here 0.79 against a mean ratio of about 32).
    near_one_hot = gdpo_curve.measures([0.999, 0.001], [0.8, 0.2], [0.5, 0.5])
    even = gdpo_curve.measures([0.5, 0.5], [0.99, 0.01], [0.5, 0.5])
    value, (low, high) = gdpo_curve._relative_entropy([near_one_hot, even] * 10)
    assert value == pytest.approx(
        (near_one_hot["entropy"] + even["entropy"]) / (0.00790 + math.log(2)), rel=1e-2
    )
    assert (
        value
        < 1
        < (
            near_one_hot["entropy"] / near_one_hot["target_entropy"]
            + even["entropy"] / even["target_entropy"]
        )
        / 2
    )


def test_the_gdpo_readings_follow_the_plan():
    def d(low, high):
        return {"difference": (low + high) / 2, "interval": [low, high]}

    fits = {"js_vs_prior": d(-0.05, -0.01), "js_vs_uniform": d(-0.3, -0.2), "js_vs_sft": d(-0.3, -0.1)}
    collapsed = {
        "relative_entropy": (0.6, [0.5, 0.7]),
        "mass_vs_targets": d(0.1, 0.2),
        "mass_vs_sft": d(0.05, 0.1),
    }
    text = "\n".join(gdpo_curve.readings_section({"gdpo": fits, "dpo": collapsed}))
    assert "JS - population prior -0.030 [-0.050, -0.010]: **holds**" in text
    assert "**DPO collapses**" in text and text.count("**holds**") == 3 and "follow-up" not in text
    short = {**fits, "js_vs_prior": d(-0.02, 0.01)}
    spread = {**collapsed, "relative_entropy": (0.9, [0.8, 1.02])}  # the interval reaches 1
    text = "\n".join(gdpo_curve.readings_section({"gdpo": short, "dpo": spread}))
    assert text.count("**does not hold**") == 2 and "`--arms gdpo_calibration`): **not run yet**" in text
    # An arm trained past the plan's rule: read at both epochs; the plan's follow-up is not its to call for.
    text = "\n".join(gdpo_curve.readings_section({"gdpo": short, "gdpo @ 10": fits}, {"gdpo": 10}))
    assert "Exploratory" in text and "At epoch 10, as the plan reads it: JS - population prior -0.030" in text
    assert "follow-up" not in text
    # A follow-up arm (another learning rate) gets its figures, at both epochs when past the rule.
    text = "\n".join(
        gdpo_curve.readings_section(
            {"gdpo-lr": short, "gdpo_lr2e-4": short, "gdpo_lr2e-4 @ 6": fits}, {"gdpo_lr2e-4": 6}
        )
    )
    assert "- `gdpo_lr2e-4` (full GDPO at 4 times the learning rate): JS - population prior -0.005" in text
    assert "at epoch 6, where the plan's rule ends it: JS - population prior -0.030" in text
    assert "**holds**" not in text and "gdpo-lr" not in text  # no claim of its own; unknown names ignored


def test_the_plans_stopping_rule_is_found_again_from_a_learning_curve():
    assert gdpo_curve.rule_stop([0.446, 0.476, 0.508, 0.528]) == 4  # never 0.005 below epoch 1's
    assert gdpo_curve.rule_stop([0.30, 0.298, 0.297, 0.296, 0.20]) == 4  # falling, but by less than 0.005
    assert gdpo_curve.rule_stop([0.4, 0.3, 0.2, 0.35, 0.36]) is None  # not yet 3 epochs without a new best
    assert gdpo_curve.rule_stop([]) is None


def test_an_arm_trained_past_the_rule_is_read_as_exploratory_beside_the_plans_own_reading(tmp_path):
    """The committed GDPO-curve records with DPO's last epoch repeated as epochs 5 and 6: the report
    gives DPO at the epoch where the plan's rule stops it (4) and at its last (6), says which is which,
    and reads the claim at both."""
    import shutil

    import recompute

    results = tmp_path / "gdpo_curve"
    shutil.copytree(recompute.RESULTS / "gdpo_curve", results)
    rows = read(results / "beliefs.jsonl.gz")
    rows += [{**r, "epoch": e} for e in (5, 6) for r in rows if r["model"] == "dpo" and r["epoch"] == 4]
    gdpo_curve.write_gz(rows, results / "beliefs.jsonl.gz")
    training = json.loads((results / "training.json").read_text())
    training = [{**t, "epochs": 6} if t["arm"] == "dpo" else t for t in training]
    (results / "training.json").write_text(json.dumps(training))
    table = gdpo_curve.report(results)
    assert "| dpo (4, the plan's stop) |" in table and "| dpo (6) |" in table
    assert "dpo (the rule ends it at epoch 4)" in table
    (line,) = [x for x in table.splitlines() if x.startswith("- **DPO collapses**")]
    assert "Exploratory" in line and "At epoch 4, as the plan reads it:" in line
    assert line.count("**does not hold**") == 2
    assert "| gdpo (13) |" in table and "gdpo (13, the plan's stop)" not in table  # the rule ended it


def test_a_follow_up_arm_is_set_against_full_gdpo_at_the_same_reading():
    """In the committed 20-epoch records the rule ends full GDPO at epoch 13 and ``gdpo_lr2e-4`` at 9:
    the follow-up at its rule's epoch is paired with GDPO at its rule's epoch, at its last with GDPO's
    last, each labelled, and each mean difference is the one the per-prompt records give."""
    import recompute
    from scipy.spatial.distance import jensenshannon

    results = recompute.RESULTS / "gdpo_curve_20epochs"
    rows = read(results / "beliefs.jsonl.gz")

    def js(model: str, epoch: int) -> dict:
        return {
            (r["question_id"], r["population"]): float(jensenshannon(r["target"], r["probabilities"]))
            for r in rows
            if r["model"] == model and r["epoch"] == epoch and r["split"] == "train"
        }

    (line,) = [x for x in gdpo_curve.report(results).splitlines() if x.startswith("- `gdpo_lr2e-4`")]
    last, at_rule = line.split(" at its last epoch; ")
    for text, mine, theirs in ((last, ("gdpo_lr2e-4", 20), 20), (at_rule, ("gdpo_lr2e-4", 9), 13)):
        a, b = js(*mine), js("gdpo", theirs)
        assert len(a) == len(b) == 96
        difference = sum(a[k] - b[k] for k in a) / len(a)
        assert f"JS - full GDPO (epoch {theirs}) {difference:+.3f} [" in text


def test_a_follow_up_arm_the_rule_stopped_is_set_against_gdpo_where_the_rule_stops_it(tmp_path):
    """The 20-epoch records with ``gdpo_lr2e-4`` cut to the 9 epochs its rule gives it, and its records
    put before full GDPO's: it is still paired with full GDPO at 13, where the rule stops full GDPO."""
    import shutil

    import recompute

    results = tmp_path / "cut"
    shutil.copytree(recompute.RESULTS / "gdpo_curve_20epochs", results)
    rows = read(results / "beliefs.jsonl.gz")
    start = [r for r in rows if r["model"] in ("untrained", "sft")]  # the report's reference comes first
    arm = [r for r in rows if r["model"] == "gdpo_lr2e-4" and r["epoch"] <= 9]
    rest = [r for r in rows if r["model"] not in ("untrained", "sft", "gdpo_lr2e-4")]
    gdpo_curve.write_gz(start + arm + rest, results / "beliefs.jsonl.gz")
    training = json.loads((results / "training.json").read_text())
    training = [{**t, "epochs": 9} if t["arm"] == "gdpo_lr2e-4" else t for t in training]
    (results / "training.json").write_text(json.dumps(training))
    table = gdpo_curve.report(results)
    (line,) = [x for x in table.splitlines() if x.startswith("- `gdpo_lr2e-4`")]
    assert "| gdpo_lr2e-4 (9) |" in table and "at its last epoch;" not in line
    assert "JS - full GDPO (epoch 13) +0.018 [" in line  # the committed report's figure at these epochs


def test_two_runs_are_compared_record_by_record(tmp_path):
    """``--compare``: one changed probability (not a group's first record, not a distribution's first
    entry) shows as that (model, epoch)'s largest difference and moves the second run's training JS only
    there; every other row shows 0 and equal JS; records of different prompts are refused."""
    import recompute

    rows = read(recompute.RESULTS / "gdpo_curve" / "beliefs.jsonl.gz")
    changed = [dict(r) for r in rows]
    hit = [r for r in changed if r["model"] == "gdpo" and r["epoch"] == 3 and r["split"] == "train"][5]
    hit["probabilities"] = [*hit["probabilities"][:-1], hit["probabilities"][-1] + 0.25]
    for name, records in (("first", rows), ("second", changed)):
        (tmp_path / name).mkdir()
        gdpo_curve.write_gz(records, tmp_path / name / "beliefs.jsonl.gz")
    header, _, *table = gdpo_curve.across_runs(tmp_path / "first", tmp_path / "second").splitlines()
    assert header.endswith("| train JS (first) | train JS (second) |")
    cells = {(c[0], int(c[1])): c[2:] for c in (line.strip("| ").split(" | ") for line in table)}
    assert len(cells) == len(table) == len({(r["model"], r["epoch"]) for r in rows})
    first_js = gdpo_curve.mean_js([r for r in rows if r["model"] == "gdpo" and r["epoch"] == 3], "train")
    second_js = gdpo_curve.mean_js([r for r in changed if r["model"] == "gdpo" and r["epoch"] == 3], "train")
    assert f"{first_js:.3f}" != f"{second_js:.3f}"
    assert cells.pop(("gdpo", 3)) == ["0.25", f"{first_js:.3f}", f"{second_js:.3f}"]
    assert all(diff == "0" and a == b for diff, a, b in cells.values())
    gdpo_curve.write_gz([r for r in changed if r is not hit], tmp_path / "second" / "beliefs.jsonl.gz")
    with pytest.raises(ValueError, match="different questions"):
        gdpo_curve.across_runs(tmp_path / "first", tmp_path / "second")


def test_the_gdpo_objectives_optimum_is_where_gdpo_loss_is_lowest():
    """``objective_optimum`` against ``grouppo.losses.gdpo_loss`` itself, minimized over the belief
    distribution of one packed group: K belief rows (each an NLL row, with its prefix's token count) and
    a chosen/rejected pair whose log-probs do not depend on the beliefs."""
    import torch

    from grouppo.losses import FlatBeliefBatch, gdpo_loss

    target, tokens = [0.6, 0.25, 0.1, 0.05], [8, 7, 9, 3]
    k = len(target)
    theta = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    role = torch.tensor([0] * k + [1, 2])
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)
    for c, n in ((1.0, 1.0), (1.0, 0.5), (1.0, 0.0)):

        def closure(c=c, n=n):
            opt.zero_grad()
            logps = torch.cat([torch.log_softmax(theta, 0), torch.tensor([-5.0, -6.0], dtype=torch.float64)])
            batch = FlatBeliefBatch(
                logps=logps,
                ref_logps=torch.zeros(k + 2, dtype=torch.float64),
                lengths=torch.tensor(tokens + [4, 4]),
                role=role,
                target=torch.tensor(target + [0.0, 0.0], dtype=torch.float64),
                nll_row=torch.tensor([1] * k + [0, 0]),
                group_index=torch.zeros(k + 2, dtype=torch.long),
                slot=torch.arange(k + 2),
            )
            loss, _ = gdpo_loss(batch, calibration_weight=c, preference_weight=1.0, belief_nll_weight=n)
            loss.backward()
            return loss

        opt.step(closure)
        found = torch.softmax(theta.detach(), 0).tolist()
        expected = gdpo_curve.objective_optimum(target, tokens, c, n)
        assert found == pytest.approx(expected, abs=1e-6)
    assert gdpo_curve.objective_optimum(target, tokens, 1.0, 0.0) == pytest.approx(target)
    assert gdpo_curve.objective_optimum(target, tokens)[3] > 0.05  # pulled towards uniform


def test_every_committed_table_is_what_its_raw_records_give():
    """experiments/recompute.py --check over the committed results: each results.md rebuilt from its
    per-prompt records alone (no model) equals the committed one."""
    import recompute

    folders = [
        p.name
        for p in recompute.RESULTS.iterdir()
        if (p / "results.md").exists() and p.name in recompute.REPORTS
    ]
    assert "reproducibility" in folders
    assert recompute.recompute(check=True) == []


def test_the_recompute_check_fails_on_a_table_its_records_do_not_give(tmp_path):
    import shutil

    import recompute

    shutil.copytree(recompute.RESULTS / "reproducibility", tmp_path / "reproducibility")
    table = tmp_path / "reproducibility" / "results.md"
    committed = table.read_text()
    table.write_text(committed.replace("| 0.172 |", "| 0.999 |", 1))  # one figure that is not the records'
    assert recompute.recompute(tmp_path, check=True) == ["reproducibility"]
    assert "| 0.999 |" in table.read_text()  # --check leaves it; without, it is rewritten
    recompute.recompute(tmp_path)
    assert table.read_text() == committed


def test_a_lost_run_directory_is_rebuilt_from_its_export(tmp_path, monkeypatch):
    """``--restore`` is the inverse of ``--export``: the committed records rebuild every finished stage,
    and exporting the rebuilt directory gives the same records byte for byte."""
    import gzip

    committed = EXPERIMENTS / "results" / "if_groups"
    if_groups.restore(committed, tmp_path / "run")
    assert (tmp_path / "run" / "seed1" / "groupdpo_k8" / "training.json").exists()
    monkeypatch.setattr(if_groups, "report", lambda results: "")
    if_groups.export(tmp_path / "run", tmp_path / "again")
    for name in ("generations.jsonl.gz", "pool.jsonl.gz", "heldout_logps.jsonl.gz"):
        assert gzip.open(committed / name).read() == gzip.open(tmp_path / "again" / name).read(), name
    for name in ("training.json", "environment.json"):
        assert (committed / name).read_text() == (tmp_path / "again" / name).read_text(), name
    if_groups.export(tmp_path / "run", tmp_path / "twice")  # the same records give the same bytes
    for name in ("generations.jsonl.gz", "pool.jsonl.gz", "heldout_logps.jsonl.gz"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "twice" / name).read_bytes(), name
    with pytest.raises(SystemExit, match="already holds a run"):
        if_groups.restore(committed, tmp_path / "run")


def test_pools_come_from_an_export_unchanged(tmp_path):
    committed = EXPERIMENTS / "results" / "if_groups"
    if_groups.pools_from(committed, [1], tmp_path)
    expected = [r for r in if_groups.read_gz(committed / "pool.jsonl.gz") if r["seed"] == 1]
    assert if_groups.read_gz(tmp_path / "seed1" / "pool.jsonl.gz") == expected and len(expected) == 240
    with pytest.raises(SystemExit, match="no pool of seed 7"):
        if_groups.pools_from(committed, [7], tmp_path)


def test_the_same_models_are_compared_across_cpus_answer_by_answer(tmp_path):
    """The exploratory table of section 2: models both runs evaluated, matched by key; one changed answer
    that fails a prompt it passed counts as one differing answer and one differing outcome."""
    import shutil

    section1 = EXPERIMENTS / "results" / "if_groups"
    other = tmp_path / "if_groups_section2"
    other.mkdir()
    shutil.copy(section1 / "environment.json", other)
    shutil.copy(section1 / "heldout_logps.jsonl.gz", other)
    shutil.copy(section1 / "pool.jsonl.gz", other)
    rows = if_groups.read_gz(section1 / "generations.jsonl.gz")
    flipped = next(i for i, r in enumerate(rows) if r["benchmark"] == "ifeval" and all(r["strict"]))
    rows[flipped] = {**rows[flipped], "response": "", "strict": [False] * len(rows[flipped]["strict"])}
    if_groups.write_gz(rows, other / "generations.jsonl.gz")
    table = "\n".join(if_groups.across_cpus(other, section1))
    assert "| starting model |  | ifeval | 1 / 1 of 500 |" in table
    assert "| starting model |  | ifbench | 0 / 0 of 294 |" in table
    assert "| groupdpo_k8 | 0 | ifeval | 0 / 0 of 500 |" in table  # the same records: nothing differs
    assert "| starting model | 1 | -3.1526 | -3.1526 | -3.1016 | -3.1016 | 0 |" in table  # held-out log-probs
    with pytest.raises(ValueError, match="different prompts"):
        if_groups.write_gz(rows[1:], other / "generations.jsonl.gz")
        if_groups.across_cpus(other, section1)
    pool = if_groups.read_gz(section1 / "pool.jsonl.gz")
    if_groups.write_gz(pool[:-1], other / "pool.jsonl.gz")
    with pytest.raises(ValueError, match="different pools"):
        if_groups.across_cpus(other, section1)


def test_a_run_directory_refuses_a_cpu_with_other_kernels(tmp_path):
    """bfloat16 results move with the CPU's kernels: a run started on one CPU is not continued on
    another (before anything is written or any model is loaded)."""
    from grouppo.environment import describe_environment

    now = describe_environment()
    assert if_groups.same_kernels(now, json.loads(json.dumps(now)))
    other = {**now, "cpu": {**now["cpu"], "kernel_flags": [*now["cpu"]["kernel_flags"], "amx_fp16"]}}
    assert not if_groups.same_kernels(other, now)
    assert not if_groups.same_kernels({**now, "torch_threads": 64}, now)
    (tmp_path / "environment.json").write_text(json.dumps([other]))
    with pytest.raises(SystemExit, match="would not be comparable"):
        if_groups.run(if_groups.Design(model="unused"), tmp_path, [0], ["groupdpo_k8"])
    assert json.loads((tmp_path / "environment.json").read_text()) == [other]
    args = argparse.Namespace(out=str(tmp_path), arms=["gdpo"], max_epochs=20)
    with pytest.raises(SystemExit, match="use a new --out"):
        gdpo_curve.run(args)
    assert json.loads((tmp_path / "environment.json").read_text()) == [other]


def test_some_configurations_on_a_second_cpu_are_compared_with_the_same_ones_on_the_first(tmp_path):
    """A second CPU's export holding only some configurations: its table says which comparisons were not
    run, and an answer that differs from the first CPU's under the same configuration is counted."""
    import reproducibility

    first = EXPERIMENTS / "results" / "reproducibility"
    second = tmp_path / "reproducibility_amx"
    second.mkdir()
    keep = ("fp32_b64", "fp32_b16")
    rows = [r for r in if_groups.read_gz(first / "generations.jsonl.gz") if r["config"] in keep]
    changed = next(i for i, r in enumerate(rows) if r["config"] == "fp32_b16" and r["benchmark"] == "ifeval")
    rows[changed] = {**rows[changed], "response": rows[changed]["response"] + " "}
    if_groups.write_gz(rows, second / "generations.jsonl.gz")
    runs = [r for r in json.loads((first / "environment.json").read_text()) if r["config"] in keep]
    (second / "environment.json").write_text(json.dumps(runs))
    lines = reproducibility.report(second, across=first).splitlines()
    fp32, b16 = (next(line for line in lines if line.startswith(f"| {name} |")) for name in keep)
    cells = [c.strip() for c in b16.strip("|").split("|")]
    # per benchmark: prompt strict, instruction strict, vs bf16_b64 (not run here), vs fp32_b64, vs first CPU
    assert cells[4:9] == [cells[4], cells[5], "not run", "1 / 0 of 128", "1 / 0 of 128"]
    assert cells[13:14] == ["0 / 0 of 64"]
    assert "| 0 / 0 of 128 |" in fp32 and "not run" in fp32


# ------------------------------------------------------------------- a run cut short resumes exactly
class _Killed(Exception):
    pass


def _kill_at(step: int):
    """A callback that stops the process (an exception) after checkpoint ``step``: as the next step
    begins, or as training ends when that was the last."""
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise _Killed

        on_train_end = on_step_begin

    return Kill()


def _count_steps(counted: list):
    from transformers import TrainerCallback

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            counted.append(state.global_step)

    return Count()


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_an_instruction_arm_cut_short_resumes_to_the_model_of_the_straight_run(
    tmp_path, model_dir, monkeypatch
):
    import torch

    monkeypatch.setattr(if_groups, "SAVE_SECONDS", 0.0)  # a checkpoint after every step
    words = "the cat sat on a mat and then it ran off".split()
    pool = [
        {"split": "train", "key": f"k{i}", "prompt": f"say {words[i]}",
         "responses": [" ".join(words[j : j + 1 + (i + j) % 4]) for j in range(8)],
         "scores": [(i + j) % 3 / 2 for j in range(8)]}
        for i in range(8)
    ]  # fmt: skip
    design = if_groups.Design(model=str(model_dir), learning_rate=1e-2, max_length=64)
    straight = if_groups.train_arm(design, "groupdpo_k8", 0, pool, tmp_path / "straight")
    assert straight["steps"] == 4 and straight["resumed_from"] is None
    with pytest.raises(_Killed):
        if_groups.train_arm(design, "groupdpo_k8", 0, pool, tmp_path / "cut", callbacks=[_kill_at(2)])
    assert not (tmp_path / "cut" / "trained.json").exists()
    counted: list[int] = []
    resumed = if_groups.train_arm(
        design, "groupdpo_k8", 0, pool, tmp_path / "cut", callbacks=[_count_steps(counted)]
    )
    assert resumed["resumed_from"] == "checkpoint-2" and counted == [3, 4]  # it resumed, not restarted
    before, after = _weights(model_dir), _weights(tmp_path / "straight" / "model")
    assert max((after[k] - v).abs().max() for k, v in before.items()) > 1e-3  # training moved the weights
    cut = _weights(tmp_path / "cut" / "model")
    assert all(torch.equal(cut[k], v) for k, v in after.items())  # bit for bit
    losses = [[h["loss"] for h in run["log_history"] if "loss" in h] for run in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def _save_at(step: int):
    """A callback that saves a checkpoint after step ``step``, as grouppo does when a signal stops a run."""
    from transformers import TrainerCallback

    class Save(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_save = True

    return Save()


def _signal_at(step: int):
    """A callback that sends this process SIGTERM as step ``step`` begins: grouppo saves a checkpoint after
    that step and stops (TrainingInterrupted); transformers still ends the epoch it stopped in."""
    import os
    import signal

    from transformers import TrainerCallback

    class Signal(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step - 1:
                os.kill(os.getpid(), signal.SIGTERM)

    return Signal()


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at_epoch, patience, how", [(1, 5, "kill"), (1.5, 5, "kill"), (2, 1, "kill"), (2.5, 5, "signal")]
)
def test_a_gdpo_arm_cut_short_resumes_to_the_records_of_the_straight_run(
    tmp_path, model_dir, kill_at_epoch, patience, how
):
    """Killed after epoch 1 of 3 (resumed training), half-way through epoch 2 after a checkpoint saved
    there (as on a signal), after the epoch where the stopping rule stopped the run (no more training:
    the checkpoint is the arm's model), or stopped by a real SIGTERM half-way through epoch 3 (the epoch end
    transformers still signals there records no epoch)."""
    import argparse

    from grouppo.embedded.opinions import write_opinions
    from grouppo.runs import TrainingInterrupted

    write_opinions(tmp_path / "data", seed=0)
    train = tmp_path / "data" / "train.jsonl"  # 3 questions x 4 populations: 3 steps an epoch
    kept = [line for line in train.read_text().splitlines() if json.loads(line)["question_id"] in (0, 1, 2)]
    train.write_text("\n".join(kept) + "\n")
    qs = {split: records[:4] for split, records in gdpo_curve.questions(tmp_path / "data").items()}
    args = argparse.Namespace(seed=0, max_epochs=3, patience=patience, min_improvement=0.005)
    monkey_lr = gdpo_curve.ARMS["gdpo"].__class__("gdpo", 1e-2)

    def run(out, callbacks=()):
        original = gdpo_curve.ARMS["gdpo"]
        gdpo_curve.ARMS["gdpo"] = monkey_lr
        try:
            gdpo_curve.train_arm("gdpo", tmp_path / "data", model_dir, out, qs, args, callbacks=callbacks)
        finally:
            gdpo_curve.ARMS["gdpo"] = original
        return json.loads((out / "training.json").read_text())

    straight = run(tmp_path / "straight")
    steps_per_epoch = straight["steps"] // straight["epochs"]
    kill = int(kill_at_epoch * steps_per_epoch)
    if how == "signal":
        with pytest.raises(TrainingInterrupted):
            run(tmp_path / "cut", callbacks=[_signal_at(kill)])
        # Whole epochs only: the epoch end transformers signals at the mid-epoch stop records nothing.
        epochs = read(tmp_path / "straight" / "beliefs.jsonl.gz")
        assert read(tmp_path / "cut" / "beliefs.jsonl.gz") == [r for r in epochs if r["epoch"] <= 2]
    else:
        with pytest.raises(_Killed):
            run(tmp_path / "cut", callbacks=[_save_at(kill), _kill_at(kill)])
    counted: list[int] = []
    resumed = run(tmp_path / "cut", callbacks=[_count_steps(counted)])
    assert resumed["resumed_from"] == f"checkpoint-{kill}"
    assert len(counted) == straight["steps"] - kill  # it resumed, not restarted
    if patience == 1:
        assert straight["epochs"] == 2 and straight["stopped"] != "max_epochs" and counted == []
    for key in ("epochs", "best", "since_best", "stopped", "steps"):
        assert resumed[key] == straight[key], key
    records = [read(out / "beliefs.jsonl.gz") for out in (tmp_path / "straight", tmp_path / "cut")]
    assert records[0] == records[1] and {r["epoch"] for r in records[0]} == set(
        range(1, straight["epochs"] + 1)
    )
    assert not (tmp_path / "cut" / "checkpoints").exists()


def read(path):
    return if_groups.read_gz(path)


# ------------------------------------------------------------------- the scripts run end to end
def test_the_instruction_experiment_runs_reads_its_stages_back_and_exports_what_recompute_gives(
    tmp_path, model_dir
):
    """Every stage on a tiny model: the starting model's evaluation, a pool, two arms trained,
    evaluated and scored; a second run retrains nothing; the export is what recompute rebuilds."""
    import recompute

    design = if_groups.Design(
        model=str(model_dir), train_prompts=16, validation_prompts=4, pool_size=8, eval_prompts=4,
        ifbench_prompts=3, max_new_tokens=16, eval_max_new_tokens=8, generation_batch_size=16,
    )  # fmt: skip
    out, arms = tmp_path / "runs", ["dpo_best_worst", "groupdpo_k4"]
    if_groups.run(design, out, [0], arms)
    for arm in arms:
        folder = out / "seed0" / arm
        names = {p.name for p in folder.iterdir()}
        assert {"training.json", "trained.json", "eval_ifeval.jsonl.gz", "eval_ifbench.jsonl.gz"} <= names
        assert "model" not in names and "checkpoints" not in names  # removed once the arm is done
        assert (
            len(read(folder / "eval_ifeval.jsonl.gz")) == 4
            and len(read(folder / "eval_ifbench.jsonl.gz")) == 3
        )
    written = {
        p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "environment.json"
    }
    if_groups.run(design, out, [0], arms)
    assert {p: p.stat().st_mtime_ns for p in written} == written  # read back, nothing rerun
    if_groups.export(out, tmp_path / "results" / "if_groups")
    table = (tmp_path / "results" / "if_groups" / "results.md").read_text()
    assert "| dpo_best_worst | 0 |" in table and "| groupdpo_k4 | 0 |" in table and "margin ±0.045" in table
    assert recompute.recompute(tmp_path / "results", check=True) == []


@pytest.mark.slow
def test_the_gdpo_curve_runs_and_exports_what_recompute_gives(tmp_path, model_dir):
    import recompute

    out = tmp_path / "runs"
    gdpo_curve.main(["--out", str(out), "--arms", "gdpo", "--model", str(model_dir), "--max_epochs", "2"])
    training = json.loads((out / "gdpo" / "training.json").read_text())
    assert training["epochs"] == 2 and training["stopped"] == "max_epochs"
    assert {r["epoch"] for r in read(out / "gdpo" / "beliefs.jsonl.gz")} == {1, 2}
    assert not (out / "gdpo" / "checkpoints").exists()
    gdpo_curve.export(out, tmp_path / "results" / "gdpo_curve")
    table = (tmp_path / "results" / "gdpo_curve" / "results.md").read_text()
    assert (
        "| gdpo | 5e-05 | 1/1/1 | 2 |" in table
        and "- **GDPO learns each population's distribution**" in table
        and "## Where full GDPO's objective is lowest" in table
    )
    assert recompute.recompute(tmp_path / "results", check=True) == []
    # An arm whose records run past what its training.json says (exported while it trained) is refused,
    # not reported with its latest epoch as final.
    results = tmp_path / "results" / "gdpo_curve"
    arms = json.loads((results / "training.json").read_text())
    (results / "training.json").write_text(json.dumps([{**a, "epochs": 1} for a in arms]))
    with pytest.raises(ValueError, match="gdpo: records up to epoch 2"):
        gdpo_curve.report(results)


def test_the_checkpoint_resumed_from_is_the_newest_complete_one_and_newer_cut_ones_go(tmp_path):
    from grouppo.runs import RUN_FILE

    for step, files in (
        (2, (RUN_FILE, "trainer_state.json", "elapsed.json")),
        (4, ("trainer_state.json",)),
        (6, (RUN_FILE, "trainer_state.json")),
        (1, (RUN_FILE, "trainer_state.json", "elapsed.json")),
    ):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in files:
            (folder / name).write_text(json.dumps({"train_seconds": 10.0 * step}))
    assert if_groups.resumable_checkpoint(tmp_path) == (str(tmp_path / "checkpoint-2"), 20.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert if_groups.resumable_checkpoint(tmp_path / "none") == (None, 0.0)


def test_a_main_job_run_is_taken_in_and_its_answers_set_against_another_machines(tmp_path):
    """``--quickstart RUN_DIR --into quickstart_amx`` turns a ``make run`` directory (here rebuilt from
    the committed Intel records) into a results folder whose table counts, per phase and benchmark, the
    answers that differ from the AMD run's; one changed answer raises its count by one; prompts missing from
    either run, or twice in one, are refused, and so is a folder that recompute does not check."""
    import shutil

    import recompute

    root = tmp_path / "results"
    shutil.copytree(recompute.RESULTS / "quickstart", root / "quickstart")
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    rows = read(recompute.RESULTS / "quickstart_amx" / "generations.jsonl.gz")
    (hit,) = [i for i, r in enumerate(rows) if r["when"] == "before" and r["benchmark"] == "ifbench"][5:6]
    rows[hit] = {**rows[hit], "response": rows[hit]["response"] + " (changed)"}
    for when in ("before", "after"):
        for benchmark in ("ifeval", "ifbench"):
            part = [
                {k: v for k, v in r.items() if k not in ("when", "benchmark")}
                for r in rows
                if r["when"] == when and r["benchmark"] == benchmark
            ]
            path = run / "eval" / f"{when}_{benchmark}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in part))
    shutil.copy(recompute.RESULTS / "quickstart_amx" / "metrics.json", run / "metrics.json")
    assert recompute.main(["--root", str(root), "--quickstart", str(run), "--into", "quickstart_amx"]) == 0
    table = (root / "quickstart_amx" / "results.md").read_text()
    committed = (recompute.RESULTS / "quickstart_amx" / "results.md").read_text()
    unchanged, one_more = "| before | ifbench | 0 / 0 of 64 |", "| before | ifbench | 1 / 0 of 64 |"
    assert unchanged in committed
    assert table == committed.replace(unchanged, one_more)
    theirs = read(root / "quickstart" / "generations.jsonl.gz")
    extra = {**theirs[0], "key": "a prompt only the other run has"}
    for changed in (theirs[1:], [*theirs, extra], [*theirs, theirs[0]]):  # missing, extra, twice
        gdpo_curve.write_gz(changed, root / "quickstart" / "generations.jsonl.gz")
        with pytest.raises(ValueError, match="not the same prompts"):
            recompute.quickstart_report(root / "quickstart_amx", across=root / "quickstart")
    with pytest.raises(SystemExit):  # a folder recompute would never check again
        recompute.main(["--root", str(root), "--quickstart", str(run), "--into", "elsewhere"])
