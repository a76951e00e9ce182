"""The pre-registered experiments' data views and baselines (experiments/if_groups.py, gdpo_curve.py)."""

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
    assert verdict({"interval": [-0.02, 0.06]}, 0.045) == "not distinguishable"


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
    assert m["relative_entropy"] == 0 and m["pooled_top_mass"] == 0 and m["target_on_pooled_top"] == 0.3
    assert m["majority_bias"] == 2.0


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
