"""Tests of grouppo.data: labelling rules, record validation, loading and converters."""

import json
import logging
import math
import random

import pytest

from grouppo.convert import (
    convert_file,
    converter_names,
    from_trl_pairwise,
    from_ultrafeedback,
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
from grouppo.load import load_records, write_jsonl


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


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


def test_write_then_load_jsonl_round_trip_with_mixed_types(tmp_path):
    records = [
        {"prompt": "héllo", "responses": ["a", "b"], "labels": [1, 0]},
        {"prompt": user("hi"), "responses": [assistant("x"), assistant("y")], "scores": [1.5, -2]},
    ]
    path = tmp_path / "nested" / "dir" / "groups.jsonl"
    assert write_jsonl(records, path) == 2
    assert "héllo" in path.read_text(encoding="utf-8")
    assert load_records(str(path)) == records


def test_load_jsonl_skips_blank_lines_and_names_a_malformed_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}: line 4: not valid JSON"):
        load_records(str(path))
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n', encoding="utf-8")
    assert load_records(str(path)) == [{"a": 1}, {"a": 2}]


def test_load_jsonl_rejects_a_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: expected a JSON object, got list"):
        load_records(str(path))


def test_load_json_list_or_split_object(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"a": 1}, {"a": "x"}]), encoding="utf-8")
    assert load_records(str(path)) == [{"a": 1}, {"a": "x"}]
    path.write_text(json.dumps({"train": [{"a": 1}], "test": [{"a": 2}]}), encoding="utf-8")
    assert load_records(str(path)) == [{"a": 1}]
    assert load_records(str(path), split="test") == [{"a": 2}]
    with pytest.raises(DataError, match="an object whose 'validation' field is one"):
        load_records(str(path), split="validation")


def test_load_parquet(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    rows = [
        {"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 2.0]},
        {"prompt": "q", "responses": ["c", "d", "e"], "scores": [0.5, 0.0, 3.0]},
    ]
    path = tmp_path / "groups.parquet"
    pyarrow_parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    assert load_records(str(path)) == rows


def test_load_local_dataset_folder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "my_dataset"
    rows = [{"prompt": "p", "responses": ["a", "b"], "labels": [1, 0]}]
    write_jsonl(rows, folder / "train.jsonl")
    assert load_records(str(folder)) == rows


def test_load_missing_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file; expected a local .jsonl"):
        load_records(str(tmp_path / "missing.jsonl"))


# is_conversational


def test_is_conversational():
    assert is_conversational(user("hi") + assistant("hello"))
    assert not is_conversational("hi")
    assert not is_conversational([])
    assert not is_conversational([{"role": "user"}])
    assert not is_conversational(["hi"])


# from_trl_pairwise


def test_trl_plain_pair():
    assert from_trl_pairwise([{"prompt": "p", "chosen": "good", "rejected": "bad", "id": 1}]) == [
        {"prompt": "p", "responses": ["good", "bad"], "labels": [1, 0], "id": 1}  # other fields are kept
    ]


def test_trl_conversational_pair_with_scores():
    record = {
        "prompt": user("q"),
        "chosen": assistant("good"),
        "rejected": assistant("bad"),
        "score_chosen": 8,
        "score_rejected": 3.5,
    }
    assert from_trl_pairwise([record]) == [
        {
            "prompt": user("q"),
            "responses": [assistant("good"), assistant("bad")],
            "scores": [8.0, 3.5],
            "labels": [1, 0],
        }
    ]


def test_trl_implicit_prompt_takes_the_shared_leading_messages():
    system = [{"role": "system", "content": "be nice"}]
    record = {
        "chosen": system + user("q") + assistant("good"),
        "rejected": system + user("q") + assistant("bad") + user("more?") + assistant("no"),
    }
    (group,) = from_trl_pairwise([record])
    assert group["prompt"] == system + user("q")
    assert group["responses"] == [assistant("good"), assistant("bad") + user("more?") + assistant("no")]
    assert normalize_record(group, 0)["labels"] == [1, 0]


@pytest.mark.parametrize(
    ("record", "field", "fragment"),
    [
        ({"prompt": "p", "rejected": "bad"}, "chosen", "missing or null"),
        ({"prompt": "p", "chosen": "good", "rejected": 4}, "rejected", "got int"),
        ({"chosen": "good", "rejected": "bad"}, "prompt", "full conversations"),
        (
            {"chosen": user("a") + assistant("x"), "rejected": user("b") + assistant("y")},
            "prompt",
            "share no",
        ),
        ({"chosen": user("a"), "rejected": user("a") + assistant("y")}, "chosen", "nothing remains"),
        (
            {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1, "score_rejected": "x"},
            "score_rejected",
            "got str",
        ),
    ],
)
def test_trl_errors_name_record_and_field(record, field, fragment):
    with pytest.raises(DataError) as raised:
        from_trl_pairwise([{"prompt": "p", "chosen": "a", "rejected": "b"}, record], source="prefs")
    assert str(raised.value).startswith(f"prefs: record 2: field '{field}': ")
    assert fragment in str(raised.value)


def test_trl_skip_invalid_skips_and_warns(caplog):
    records = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}]
    with caplog.at_level(logging.WARNING, logger="grouppo.data"):
        groups = from_trl_pairwise(records, skip_invalid=True)
    assert len(groups) == 1
    assert "skipped 1 of 2 records" in caplog.text


def test_trl_merge_prompts_groups_pairs_and_drops_contradictions(caplog):
    records = [
        {"prompt": "p", "chosen": "A", "rejected": "B"},
        {"prompt": "q", "chosen": "X", "rejected": "Y"},
        {"prompt": "p", "chosen": "A", "rejected": "C"},
        {"prompt": "p", "chosen": "B", "rejected": "D"},
        {"prompt": "p", "chosen": "E", "rejected": "C"},
    ]
    with caplog.at_level(logging.WARNING, logger="grouppo.data"):
        groups = from_trl_pairwise(records, merge_prompts=True)
    assert groups == [
        {"prompt": "p", "responses": ["A", "C", "D", "E"], "labels": [1, 0, 0, 1]},
        {"prompt": "q", "responses": ["X", "Y"], "labels": [1, 0]},
    ]
    assert "dropped 1 contradictory responses" in caplog.text


def test_trl_merge_prompts_keeps_consistent_scores_only():
    consistent = [
        {"prompt": user("p"), "chosen": "A", "rejected": "B", "score_chosen": 9, "score_rejected": 2},
        {"prompt": user("p"), "chosen": "A", "rejected": "C", "score_chosen": 9, "score_rejected": 1},
    ]
    assert from_trl_pairwise(consistent, merge_prompts=True) == [
        {"prompt": user("p"), "responses": ["A", "B", "C"], "scores": [9.0, 2.0, 1.0], "labels": [1, 0, 0]}
    ]
    inconsistent = [consistent[0], {**consistent[1], "score_chosen": 8}]
    assert "scores" not in from_trl_pairwise(inconsistent, merge_prompts=True)[0]
    unscored = [consistent[0], {"prompt": user("p"), "chosen": "A", "rejected": "C"}]
    assert "scores" not in from_trl_pairwise(unscored, merge_prompts=True)[0]


def test_trl_merge_prompts_drops_a_prompt_left_without_a_negative(caplog):
    records = [
        {"prompt": "p", "chosen": "A", "rejected": "B"},
        {"prompt": "p", "chosen": "B", "rejected": "A"},
        {"prompt": "p", "chosen": "C", "rejected": "B"},
    ]
    with caplog.at_level(logging.WARNING, logger="grouppo.data"):
        assert from_trl_pairwise(records, merge_prompts=True) == []
    assert "dropped 2 contradictory responses" in caplog.text
    assert "1 prompts left without both a positive and a negative" in caplog.text


# from_ultrafeedback


def completion(response, score, model="m"):
    return {"response": response, "overall_score": score, "fine-grained_score": 4.0, "model": model}


def test_ultrafeedback_drops_bad_completions_and_keeps_source():
    row = {
        "source": "evol_instruct",
        "instruction": "Write a haiku.",
        "completions": [
            completion("first", 7.5),
            completion("", 9.0),
            completion("third", None),
            completion("fourth", "N/A"),
            completion("fifth", 3),
            {"response": "sixth"},
        ],
    }
    assert from_ultrafeedback([row]) == [
        {
            "prompt": "Write a haiku.",
            "responses": ["first", "fifth"],
            "scores": [7.5, 3.0],
            "dataset_source": "evol_instruct",
        }
    ]


def test_ultrafeedback_row_with_too_few_completions():
    rows = [
        {"instruction": "a", "completions": [completion("x", 1), completion("y", 2)]},
        {"instruction": "b", "completions": [completion("x", 1), completion("y", math.inf)]},
    ]
    with pytest.raises(DataError, match=r"^uf: record 2: field 'completions': 1 of 2 completions are usable"):
        from_ultrafeedback(rows, source="uf")
    groups = from_ultrafeedback(rows, skip_invalid=True, source="uf")
    assert [group["prompt"] for group in groups] == ["a"]
    assert "dataset_source" not in groups[0]


def test_ultrafeedback_requires_an_instruction():
    with pytest.raises(
        DataError, match=r"^data: record 1: field 'instruction': got null; expected a non-empty"
    ):
        from_ultrafeedback([{"completions": []}])


# convert_file and validate_file


def test_convert_trl_then_validate_round_trip(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(
        [
            {"prompt": "p", "chosen": "A", "rejected": "B"},
            {"prompt": "p", "chosen": "A", "rejected": "C"},
            {"prompt": user("q"), "chosen": assistant("X"), "rejected": assistant("Y")},
        ],
        pairs,
    )
    out = tmp_path / "out" / "groups.jsonl"
    assert convert_file("trl", str(pairs), str(out), merge_prompts=True) == 2
    stats = validate_file(str(out))
    assert (stats.records, stats.kept, stats.skipped) == (2, 2, 0)
    assert stats.group_sizes == {3: 1, 2: 1}
    assert stats.negatives == {2: 1, 1: 1}


def test_convert_ultrafeedback_then_validate_with_each_rule(tmp_path):
    raw = tmp_path / "uf.json"
    rows = [
        {"instruction": "a", "completions": [completion(str(i), s) for i, s in enumerate([1, 5, 3, 4])]},
        {"instruction": "b", "completions": [completion("x", 2), completion("y", 2)]},
    ]
    raw.write_text(json.dumps(rows), encoding="utf-8")
    out = tmp_path / "groups.jsonl"
    assert convert_file("ultrafeedback", str(raw), str(out)) == 2
    with pytest.raises(DataError, match=rf"^{out}: line 2: field 'scores': all 2 scores are equal"):
        validate_file(str(out))
    stats = validate_file(str(out), skip_invalid=True, positive_rule="best_vs_rest")
    assert (stats.kept, stats.skipped) == (1, 1)
    assert stats.positives == {1: 1}
    assert stats.negatives == {3: 1}


def test_convert_file_rejects_unknown_kind_and_misplaced_merge(tmp_path):
    assert set(converter_names()) == {"trl", "ultrafeedback", "gdpo"}
    with pytest.raises(ValueError, match="expected one of gdpo, trl, ultrafeedback"):
        convert_file("sharegpt", "in.jsonl", str(tmp_path / "out.jsonl"))
    with pytest.raises(ValueError, match="merge_prompts applies only to the 'trl' converter"):
        convert_file("ultrafeedback", "in.jsonl", str(tmp_path / "out.jsonl"), merge_prompts=True)
