"""grouppo.convert: format detection, TRL pairs, UltraFeedback rows and the GDPO release read as grouppo's
schemas, convert_file and validate_file."""

import json
import logging
import math

import pytest
from conftest import BELIEF, GROUP, PAIR, assistant, jsonl, raises, user

from grouppo.convert import (
    convert_file,
    converter_names,
    detect_format,
    from_trl_pairwise,
    from_ultrafeedback,
    to_group_records,
    validate_file,
)
from grouppo.data import (
    BeliefStats,
    DataError,
    GroupStats,
    Records,
    normalize_record,
    prepare_groups,
)
from grouppo.load import load_records, write_jsonl


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


def test_mixed_formats_name_the_first_record_that_differs(tmp_path):
    path = jsonl(tmp_path, "mixed.jsonl", [PAIR, "", PAIR, GROUP, PAIR])
    records = load_records(str(path))
    raises(
        DataError,
        lambda: to_group_records(records),
        f"{path}: line 4: a group record (fields prompt, responses, scores), but line 1 is a TRL pair",
        "must share one format",
    )
    raises(DataError, lambda: validate_file(str(path)), f"{path}: line 4: a group record")


def test_unknown_format_names_the_fields_and_the_accepted_formats(tmp_path):
    path = jsonl(tmp_path, "odd.jsonl", [{"question": "q", "answer": "a", "chosen": "x", "label": None}])
    fragments = (
        "unknown record format; its fields: question, answer, chosen (null: label)",
        "as a TRL pair it lacks 'rejected'",
        "groups: group records",
        "trl: TRL preference pairs",
        "ultrafeedback: raw UltraFeedback rows",
        "beliefs: GDPO belief records",
    )
    raises(DataError, lambda: to_group_records(load_records(str(path))), f"{path}: line 1: ", *fragments)
    raises(DataError, lambda: detect_format({"question": "q"}), "its fields: question")
    raises(DataError, lambda: detect_format(["p", "a"]), "expected an object (a dict of fields), got list")


def test_nothing_usable_is_visible(tmp_path):
    path = jsonl(tmp_path, "groups.jsonl", [{**GROUP, "scores": [2, 2]}, {**GROUP, "labels": [1, 1]}])
    stats = validate_file(str(path), skip_invalid=True)
    assert isinstance(stats, GroupStats)
    assert (stats.records, stats.kept, stats.skipped, stats.usable) == (2, 0, 2, False)
    assert stats.summary().splitlines()[-1].startswith("nothing usable: none of the 2 records")
    empty = jsonl(tmp_path, "empty.jsonl", ["", "  "])
    stats = validate_file(str(empty))
    assert (stats.records, stats.kept) == (0, 0)
    assert stats.summary().splitlines()[-1] == "nothing usable: the data holds no records"


def test_belief_records_given_to_to_group_records(tmp_path):
    path = jsonl(tmp_path, "beliefs.jsonl", [BELIEF])
    raises(
        DataError,
        lambda: to_group_records(load_records(str(path))),
        f"{path}: line 1: these are GDPO belief records",
        "GDPO data, not group records",
        "grouppo gdpo",
    )
    release = {"prompt": "q", "accept_choice_id": 0, "accept_response": "a", "reject_response": "b",
               "probabilities": [0.5, 0.5]}  # fmt: skip
    raises(
        DataError,
        lambda: to_group_records([release], source="release"),
        "release: record 1: these are GDPO release records",
        "grouppo data convert --from gdpo",
    )


def test_validate_file_reports_belief_records(tmp_path):
    records = [
        BELIEF,
        {**BELIEF, "belief": 1, "chosen": "Less.", "rejected": "More."},
        {**BELIEF, "population": "B", "distribution": [0.2, 0.8]},
        {**BELIEF, "question_id": 1, "beliefs": ["yes", "no", "unsure"], "distribution": [0.5, 0.25, 0.25]},
        {**BELIEF, "distribution": [0.5, 0.4]},
    ]
    path = jsonl(tmp_path, "beliefs.jsonl", records)
    raises(DataError, lambda: validate_file(str(path)), f"{path}: line 5: field 'distribution': sums to 0.9")
    stats = validate_file(str(path), skip_invalid=True)
    assert isinstance(stats, BeliefStats)
    assert (stats.records, stats.kept, stats.skipped, stats.questions) == (5, 4, 1, 2)
    assert stats.belief_counts == {2: 3, 3: 1}
    assert stats.populations == {"A": 3, "B": 1}
    summary = stats.summary()
    assert "questions: 2" in summary and "populations (population: records): 2 (A: 3, B: 1)" in summary


def test_convert_file_writes_nothing_when_a_record_is_bad(tmp_path):
    records = [PAIR] * 6 + [{"prompt": "p", "chosen": "good", "rejected": ""}]
    source = jsonl(tmp_path, "pairs.jsonl", records)
    out = tmp_path / "out" / "groups.jsonl"
    raises(
        DataError,
        lambda: convert_file("trl", str(source), str(out)),
        f"{source}: line 7: field 'rejected': got an empty string",
    )
    assert not out.parent.exists()
    raises(
        DataError,
        lambda: convert_file("ultrafeedback", str(source), str(out)),
        "holds TRL preference pairs",
        "convert it with --from trl",
    )
    assert not out.parent.exists()
    assert convert_file("trl", str(source), str(out), skip_invalid=True) == 6


def test_trl_plain_pairs(tmp_path):
    path = jsonl(tmp_path, "pairs.jsonl", [PAIR, {**PAIR, "prompt": "q", "id": 7}, PAIR])
    groups, message = to_group_records(load_records(str(path)))
    assert message == f"{path}: read 3 TRL pairs as 3 groups of 2"
    assert groups[1] == {"prompt": "q", "responses": ["good", "bad"], "labels": [1, 0], "id": 7}
    assert groups.locations == ["line 1", "line 2", "line 3"]
    assert prepare_groups(groups)[1].kept == 3


def test_trl_pairs_merged_by_prompt(tmp_path):
    pairs = [PAIR, {**PAIR, "rejected": "worse"}, {**PAIR, "prompt": "q"}, {**PAIR, "chosen": "great"}]
    path = jsonl(tmp_path, "pairs.jsonl", pairs)
    groups, message = to_group_records(load_records(str(path)), merge_prompts=True)
    assert message == f"{path}: read 4 TRL pairs as 2 groups (merged by prompt; K: 2: 1, 4: 1)"
    assert groups[0]["responses"] == ["good", "bad", "worse", "great"]
    assert groups.locations == ["line 1 (merged with 2 more pairs of its prompt)", "line 3"]


def test_trl_conversational_pairs():
    pair = {"prompt": user("q"), "chosen": assistant("good"), "rejected": assistant("bad")}
    groups, message = to_group_records([pair] * 5, source="chat")
    assert message == "chat: read 5 TRL pairs as 5 groups of 2"
    assert groups[0] == {
        "prompt": user("q"),
        "responses": [assistant("good"), assistant("bad")],
        "labels": [1, 0],
    }


def test_trl_implicit_prompt_pairs():
    system = [{"role": "system", "content": "be brief"}]
    pair = {
        "chosen": system + user("q") + assistant("good"),
        "rejected": system + user("q") + assistant("bad"),
    }
    groups, message = to_group_records([pair, pair], source="implicit")
    assert message == "implicit: read 2 TRL pairs as 2 groups of 2"
    assert groups[0]["prompt"] == system + user("q")
    assert groups[0]["responses"] == [assistant("good"), assistant("bad")]


def test_ultrafeedback_binarized_rows(tmp_path):
    def row(i):
        prompt = f"Question {i}?"
        return {
            "prompt": prompt,
            "prompt_id": f"id{i}",
            "chosen": user(prompt) + assistant("good"),
            "rejected": user(prompt) + assistant("bad"),
            "messages": user(prompt) + assistant("good"),
            "score_chosen": 8.0,
            "score_rejected": 4.5,
        }

    path = jsonl(tmp_path, "train_prefs.jsonl", [row(i) for i in range(3)])
    groups, message = to_group_records(load_records(str(path)))
    assert message == f"{path}: read 3 TRL pairs as 3 groups of 2"
    assert groups[2] == {
        "prompt": user("Question 2?"),
        "responses": [assistant("good"), assistant("bad")],
        "scores": [8.0, 4.5],
        "labels": [1, 0],
        "prompt_id": "id2",
        "messages": user("Question 2?") + assistant("good"),
    }
    stats = validate_file(str(path))
    assert (stats.kept, stats.note) == (3, message)


def test_ultrafeedback_raw_rows(tmp_path):
    def completion(response, score):
        return {"response": response, "overall_score": score, "model": "m"}

    rows = [
        {"source": "evol", "instruction": "Write.", "completions": [completion("a", 7), completion("b", 3)]},
        {"instruction": "Sum.", "completions": [completion("x", 1), completion("y", 5), completion("z", 2)]},
        {"instruction": "Few.", "completions": [completion("only", 5)]},
    ]
    path = tmp_path / "uf.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    raises(
        DataError, lambda: to_group_records(load_records(str(path))), f"{path}: record 3: field 'completions'"
    )
    groups, message = to_group_records(load_records(str(path)), skip_invalid=True)
    assert (
        message == f"{path}: read 3 UltraFeedback rows as 2 scored groups (1 skipped: could not be converted)"
    )
    assert groups[1] == {"prompt": "Sum.", "responses": ["x", "y", "z"], "scores": [1.0, 5.0, 2.0]}
    stats = validate_file(str(path), skip_invalid=True)
    assert (stats.records, stats.kept, stats.skipped) == (3, 2, 1)


def test_group_records_pass_through_untouched():
    records = Records([GROUP, {**GROUP, "extra": 1}], source="g.jsonl", locations=["line 2", "line 5"])
    groups, message = to_group_records(records)
    assert groups is records
    assert message == "g.jsonl: read 2 group records"
    assert to_group_records([], source="none") == ([], "none: no records")
