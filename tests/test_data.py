"""Tests of grouppo.data: labelling rules, record validation, loading and converters."""

import logging
import math
import random

import pytest
from conftest import GROUP, assistant, jsonl, raises, user

from grouppo.convert import (
    validate_file,
)
from grouppo.data import (
    POSITIVE_RULES,
    DataError,
    GroupStats,
    is_conversational,
    labels_from_scores,
    normalize_record,
    prepare_groups,
)

# labels_from_scores


@pytest.mark.parametrize(
    ("rule", "scores", "expected"),
    [
        ("top_bottom", [1.0, 4.0, 3.0, 2.0], [0, 1, 1, 0]),
        ("top_bottom", [1.0, 5.0, 3.0, 2.0, 4.0], [0, 1, None, 0, 1]),
        ("top_bottom", [3.0, 1.0, 3.0], [1, 0, None]),  # the middle one dropped, tied with a positive
        ("top_bottom", [5.0, 4.0, 4.0, 1.0, 0.0], [1, 1, None, 0, 0]),
        # A tie across the cut moves the cut to the nearest score boundary: no tied pair.
        ("top_bottom", [2.0, 1.0, 2.0, 2.0], [1, 0, 1, 1]),
        ("top_bottom", [1, 1, 0, 1, 1, 0, 1, 0], [1, 1, 0, 1, 1, 0, 1, 0]),
        ("top_bottom", [0, 1, 0, 0, 0, 0.5, 0, 0], [0, 1, 0, 0, 0, 1, 0, 0]),
        # Boundaries equally far from the middle: the tied run between them is dropped.
        ("top_bottom", [0.5, 1, 0.5, 0.5, 0, 0.5, 0.5, 0.5], [None, 1, None, None, 0, None, None, None]),
        ("best_vs_rest", [1.0, 3.0, 3.0, 2.0], [0, 1, 1, 0]),
        ("above_mean", [1.0, 2.0, 3.0, 6.0], [0, 0, 0, 1]),
        ("above_mean", [1.0, 2.0, 3.0], [0, 0, 1]),
        ("best_vs_worst", [2.0, 5.0, 1.0, 5.0, 1.0], [None, 1, 0, None, None]),
    ],
)
def test_labels_from_scores_rules(rule, scores, expected):
    assert labels_from_scores(scores, rule) == expected


def test_top_bottom_is_the_default_rule_and_first_listed():
    assert POSITIVE_RULES[0] == "top_bottom"
    assert normalize_record({"prompt": "p", "responses": ["a", "b"], "scores": [0, 1]}, 0)["labels"] == [0, 1]


@pytest.mark.parametrize("rule", POSITIVE_RULES)
def test_no_rule_pairs_a_positive_with_an_equally_scored_negative(rule):
    rng = random.Random(0)
    for _ in range(500):
        k = rng.randint(2, 9)
        scores = [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(k)]
        labels = labels_from_scores(scores, rule)
        positives = [s for s, label in zip(scores, labels, strict=True) if label == 1]
        negatives = [s for s, label in zip(scores, labels, strict=True) if label == 0]
        if len(set(scores)) == 1:
            assert not positives and not negatives
            continue
        assert positives and negatives and min(positives) > max(negatives), (rule, scores, labels)
        ranked = sorted(scores, reverse=True)
        if rule == "top_bottom" and ranked[k // 2 - 1] > ranked[k - k // 2]:  # the paper's halves
            assert labels.count(1) == labels.count(0) == k // 2


@pytest.mark.parametrize("rule", POSITIVE_RULES)
def test_equal_scores_give_no_preference_under_every_rule(rule):
    assert labels_from_scores([2.0, 2.0, 2.0], rule) == [None, None, None]
    assert labels_from_scores([], rule) == []


def test_labels_from_scores_rejects_unknown_rule():
    with pytest.raises(ValueError, match="top_bottom, best_vs_rest, above_mean, best_vs_worst"):
        labels_from_scores([1.0, 2.0], "median")


# normalize_record


def test_normalize_string_record_with_labels_keeps_scores_and_extra_fields():
    record = {
        "prompt": "Hi",
        "responses": ["a", "b", "c"],
        "labels": [True, 0, 1],
        "scores": [1, 2, 3],
        "id": 7,
    }
    assert normalize_record(record, 0) == {
        "prompt": "Hi",
        "responses": ["a", "b", "c"],
        "scores": [1.0, 2.0, 3.0],
        "labels": [1, 0, 1],
        "id": 7,
    }
    assert record["labels"] == [True, 0, 1]


def test_normalize_conversational_record_from_scores_drops_the_middle_response():
    record = {
        "prompt": user("2+2?"),
        "responses": [assistant("4"), "5", assistant("four"), assistant("22"), "3"],
        "scores": [9, 1, 8, 0, 5],
        "meta": {"split": "x"},
    }
    assert normalize_record(record, 3) == {
        "prompt": user("2+2?"),
        "responses": [assistant("4"), "5", assistant("four"), assistant("22")],
        "scores": [9.0, 1.0, 8.0, 0.0],
        "labels": [1, 0, 1, 0],
        "meta": {"split": "x"},
    }


def test_normalize_uses_the_positive_rule_and_removes_dropped_scores():
    record = {"prompt": "p", "responses": ["a", "b", "c", "d"], "scores": [3, 1, 2, 3]}
    group = normalize_record(record, 0, positive_rule="best_vs_worst")
    assert group["responses"] == ["a", "b"]
    assert group["scores"] == [3.0, 1.0]
    assert group["labels"] == [1, 0]


def test_normalize_without_scores_gives_none_scores():
    assert normalize_record({"prompt": "p", "responses": ["a", "b"], "labels": [0, 1]}, 0)["scores"] is None


GOOD = {"prompt": "p", "responses": ["a", "b"], "labels": [1, 0]}


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"prompt": None}, "prompt", "missing or null; expected a non-empty string"),
        ({"prompt": "  "}, "prompt", "got an empty string"),
        ({"prompt": 3}, "prompt", "got int"),
        ({"prompt": []}, "prompt", "got an empty list"),
        ({"prompt": [{"role": "user"}]}, "prompt", "message 0 has no string 'content'"),
        ({"prompt": ["hello"]}, "prompt", "message 0 is a str"),
        ({"responses": ["a"], "labels": [1]}, "responses", "expected a list of at least 2 responses, got 1"),
        ({"responses": "ab"}, "responses", "expected a list of at least 2 responses, got str"),
        ({"responses": ["a", ""]}, "responses", "response 1: got an empty string"),
        ({"responses": ["a", [{"role": "assistant", "content": 5}]]}, "responses", "response 1: message 0"),
        ({"scores": [1.0, 2.0, 3.0]}, "scores", "expected 2 numbers (one per response), got 3"),
        ({"scores": [1.0, float("nan")]}, "scores", "score 1: got nan; expected a finite number"),
        ({"scores": [1.0, True]}, "scores", "score 1: got bool; expected a finite number"),
        ({"scores": [1.0, "2"]}, "scores", "score 1: got str"),
        ({"labels": [1, 0, 1]}, "labels", "expected 2 labels (one per response"),
        ({"labels": [1, 2]}, "labels", "label 1 is 2; expected 1 (positive) or 0 (negative)"),
        ({"labels": [1, "0"]}, "labels", "label 1 is '0'"),
        (
            {"labels": [1, 1]},
            "labels",
            "at least one positive (1) and one negative (0), got 2 positives and 0",
        ),
        ({"labels": None}, "labels", "both 'labels' and 'scores' are missing"),
        (
            {"labels": None, "scores": [2, 2]},
            "scores",
            "all 2 scores are equal (2), so they express no preference",
        ),
    ],
)
def test_normalize_errors_name_source_record_and_field(changes, field, fragment):
    record = {**GOOD, **changes}
    with pytest.raises(DataError) as raised:
        normalize_record(record, 3, source="train.jsonl")
    message = str(raised.value)
    assert message.startswith(f"train.jsonl: record 4: field '{field}': ")  # index 3 is the 4th record
    assert fragment in message


def test_normalize_rejects_a_record_that_is_not_an_object():
    with pytest.raises(
        DataError, match=r"^data: record 6: expected an object \(a dict of fields\), got list$"
    ):
        normalize_record(["p", "a"], 5)


def test_normalize_rejects_unknown_rule_even_with_labels():
    with pytest.raises(ValueError, match="unknown positive rule 'best'"):
        normalize_record(GOOD, 0, positive_rule="best")


# prepare_groups and GroupStats

RECORDS = [
    {"prompt": "p0", "responses": ["a", "b"], "labels": [1, 0]},
    {"prompt": "p1", "responses": ["a", "b", "c", "d"], "scores": [4, 3, 2, 1]},
    {"prompt": "p2", "responses": ["a"], "labels": [1]},
    {"prompt": "p3", "responses": ["a", "b", "c"], "labels": [1, 1, 0]},
    {"prompt": "p4", "responses": ["a", "b"], "scores": [1, 1]},
]


def test_prepare_groups_raises_on_the_first_bad_record():
    with pytest.raises(DataError, match="^mix: record 3: field 'responses'"):
        prepare_groups(RECORDS, source="mix")


def test_prepare_groups_skips_and_counts(caplog):
    with caplog.at_level(logging.WARNING, logger="grouppo.data"):
        groups, stats = prepare_groups(RECORDS, skip_invalid=True, source="mix")
    assert [group["prompt"] for group in groups] == ["p0", "p1", "p3"]
    assert (stats.records, stats.kept, stats.skipped) == (5, 3, 2)
    assert stats.group_sizes == {2: 1, 4: 1, 3: 1}
    assert stats.positives == {1: 1, 2: 2}
    assert stats.negatives == {1: 2, 2: 1}
    assert len(stats.skip_reasons) == 2
    assert stats.skip_reasons[0].startswith("mix: record 3: field 'responses'")
    assert stats.skip_reasons[1].startswith("mix: record 5: field 'scores'")
    assert "mix: skipped 2 of 5 invalid records" in caplog.text


def test_prepare_groups_keeps_at_most_ten_skip_reasons():
    bad = [{"prompt": "p", "responses": []}] * 12
    groups, stats = prepare_groups(bad, skip_invalid=True)
    assert groups == []
    assert stats.skipped == 12
    assert len(stats.skip_reasons) == 10
    assert stats.skip_reasons[-1].startswith("data: record 10:")


def test_group_stats_summary():
    _, stats = prepare_groups(RECORDS, skip_invalid=True, source="mix")
    lines = stats.summary().splitlines()
    assert lines[:6] == [
        "records read: 5",
        "groups kept: 3",
        "records skipped: 2",
        "group size K (K: groups): 2: 1, 3: 1, 4: 1",
        "positives per group (|P|: groups): 1: 1, 2: 2",
        "negatives per group (|N|: groups): 1: 2, 2: 1",
    ]
    assert lines[6] == "skip reasons (first 2 of 2):"
    assert lines[7].startswith("  mix: record 3: field 'responses'")
    assert len(lines) == 9


def test_empty_group_stats_summary():
    assert GroupStats().summary().splitlines()[3] == "group size K (K: groups): none"


# load_records and write_jsonl


# is_conversational


def test_is_conversational():
    assert is_conversational(user("hi") + assistant("hello"))
    assert not is_conversational("hi")
    assert not is_conversational([])
    assert not is_conversational([{"role": "user"}])
    assert not is_conversational(["hi"])


# from_trl_pairwise


# from_ultrafeedback


# convert_file and validate_file


@pytest.mark.parametrize(
    ("responses", "fragment"),
    [
        ([], "expected a list of at least 2 responses, got 0"),
        (None, "expected a list of at least 2 responses, got null"),
        (["a", "  "], "response 1: got an empty string"),
    ],
)
def test_empty_responses(tmp_path, responses, fragment):
    path = jsonl(tmp_path, "groups.jsonl", [GROUP, {**GROUP, "responses": responses}])
    raises(DataError, lambda: validate_file(str(path)), f"{path}: line 2: field 'responses': {fragment}")


def test_nan_score_names_line_and_field(tmp_path):
    path = jsonl(
        tmp_path,
        "groups.jsonl",
        [GROUP, GROUP, '{"prompt": "p", "responses": ["a", "b"], "scores": [1, NaN]}'],
    )
    raises(
        DataError,
        lambda: validate_file(str(path)),
        f"{path}: line 3: field 'scores': score 1: got nan; expected a finite number",
    )


def test_scores_of_the_wrong_length(tmp_path):
    path = jsonl(tmp_path, "groups.jsonl", [{**GROUP, "scores": [1, 2, 3]}])
    raises(
        DataError,
        lambda: validate_file(str(path)),
        f"{path}: line 1: field 'scores': expected 2 numbers (one per response), got 3",
    )


def test_skipped_records_keep_their_lines(tmp_path, caplog):
    path = jsonl(tmp_path, "groups.jsonl", [GROUP, "", {**GROUP, "scores": [1, 1]}, GROUP, {"prompt": "p"}])
    with caplog.at_level(logging.WARNING, logger="grouppo.data"):
        stats = validate_file(str(path), skip_invalid=True)
    assert (stats.records, stats.kept, stats.skipped) == (4, 2, 2)
    assert stats.skip_reasons[0].startswith(f"{path}: line 3: field 'scores': all 2 scores are equal")
    assert stats.skip_reasons[1].startswith(f"{path}: line 5: field 'responses'")
    assert f"{path}: skipped 2 of 4 invalid records" in caplog.text


def test_math_nan_in_python_records_is_refused():
    raises(
        DataError,
        lambda: normalize_record({**GROUP, "scores": [1.0, math.nan]}, 4),
        "record 5: field 'scores'",
    )


def test_a_score_beyond_float32_is_refused_naming_line_and_field(tmp_path):
    from grouppo.data import DataError, prepare_groups
    from grouppo.load import load_records, write_jsonl

    path = tmp_path / "groups.jsonl"
    write_jsonl([{"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 0.0]},
                 {"prompt": "q", "responses": ["a", "b"], "scores": [1e39, 0.0]}], path)  # fmt: skip
    with pytest.raises(DataError, match=f"{path}: line 2: field 'scores'.*within float32's range"):
        prepare_groups(load_records(str(path)))
    assert prepare_groups([{"prompt": "q", "responses": ["a", "b"], "scores": [3e38, 0.0]}])[1].kept == 1
