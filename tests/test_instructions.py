import copy
import json
import random
import subprocess
import sys
from itertools import combinations

import pytest
from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS, conflict_make

from grouppo.embedded import instructions
from grouppo.embedded.instructions import (
    IFBENCH_INSTALL,
    NEEDS_NLTK_DATA,
    REPEAT_PROMPT,
    InstructionResult,
    build_checker,
    check_response,
    if_metrics,
    load_ifbench,
    make_if_prompts,
    trainable_instruction_ids,
    write_if_prompts,
)


def _nltk_data_missing() -> bool:
    import nltk

    try:
        nltk.data.find("corpora/stopwords")
        nltk.data.find("tokenizers/punkt")
    except LookupError:
        return True
    return False


NLTK_MISSING = _nltk_data_missing()


@pytest.fixture(scope="module")
def train():
    return make_if_prompts(200, 0)


@pytest.fixture(scope="module")
def held_out():
    return make_if_prompts(100, 0, split="eval")


@pytest.fixture(scope="module")
def ifbench():
    return load_ifbench()


def test_same_seed_same_records_and_global_random_untouched(train):
    random.seed(123)
    state = random.getstate()
    assert make_if_prompts(200, 0) == train
    assert random.getstate() == state
    other = make_if_prompts(200, 1)
    assert [r["prompt"] for r in other] != [r["prompt"] for r in train]
    assert train[5]["key"] == "if-train-000005-s0" and other[5]["key"] == "if-train-000005-s1"
    assert len({r["prompt"] for r in train}) == len(train)


def test_records_are_json_with_one_kwargs_dict_per_instruction(train, held_out):
    for record in train + held_out:
        assert json.loads(json.dumps(record)) == record
        assert set(record) == {"key", "prompt", "instruction_id_list", "kwargs", "request", "split"}
        assert len(record["kwargs"]) == len(record["instruction_id_list"])
        assert all(isinstance(kwargs, dict) for kwargs in record["kwargs"])
        assert record["prompt"].startswith(record["request"])


def test_every_instruction_rebuilds_from_its_kwargs_and_is_scored(train, held_out):
    response = 'hello there.\n\n* one point\n\nP.S. "and" [name] <<title>> ***'
    for record in train + held_out:
        for instruction_id, kwargs in zip(record["instruction_id_list"], record["kwargs"], strict=True):
            checker = build_checker(instruction_id, kwargs, record["prompt"])
            assert checker.build_description(**kwargs) in record["prompt"]
            assert (checker.get_instruction_args() or {}) == kwargs
        results = check_response(response, record["instruction_id_list"], record["kwargs"], record["prompt"])
        assert all(isinstance(r.strict, bool) and isinstance(r.loose, bool) for r in results), results


def test_train_and_eval_requests_are_disjoint(train, held_out):
    assert {r["split"] for r in train} == {"train"} and {r["split"] for r in held_out} == {"eval"}
    assert not {r["request"] for r in train} & {r["request"] for r in held_out}
    assert not {r["key"] for r in train} & {r["key"] for r in held_out}
    assert held_out[0]["key"] == "if-eval-000000-s0"


def test_one_to_three_compatible_checkable_instructions(train, held_out):
    conflicts = conflict_make(copy.deepcopy(INSTRUCTION_CONFLICTS))
    used = set()
    for record in train + held_out:
        ids = record["instruction_id_list"]
        assert 1 <= len(ids) <= 3
        assert len(set(ids)) == len(ids)
        assert not any(b in conflicts[a] for a, b in combinations(ids, 2)), ids
        used.update(ids)
    assert used <= set(trainable_instruction_ids())
    assert not used & set(NEEDS_NLTK_DATA)
    assert len(used) >= 20  # nearly every trainable type shows up in 300 prompts


def test_repeat_prompt_comes_last_and_repeats_the_text_before_it(train, held_out):
    repeats = [r for r in train + held_out if REPEAT_PROMPT in r["instruction_id_list"]]
    assert repeats
    for record in repeats:
        assert record["instruction_id_list"][-1] == REPEAT_PROMPT
        to_repeat = record["kwargs"][-1]["prompt_to_repeat"]
        assert record["prompt"].startswith(to_repeat + "\n")
        answer = to_repeat + "\nhere is my answer"
        [*_, result] = check_response(
            answer, record["instruction_id_list"], record["kwargs"], record["prompt"]
        )
        assert result.strict is True


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split 'test'"):
        make_if_prompts(3, 0, split="test")


@pytest.mark.skipif(not NLTK_MISSING, reason="nltk data is installed here")
def test_excluded_types_need_missing_nltk_data():
    for instruction_id in NEEDS_NLTK_DATA:
        [result] = check_response("Some text. More text.", [instruction_id], [{}], "")
        assert result.strict is None and result.loose is None
        assert "not found" in result.reason


def test_strict_and_loose_on_hand_cases():
    quotation = ["startend:quotation"]
    [result] = check_response('Sure, here it is:\n"all wrapped"', quotation, [{}], "")
    assert (result.strict, result.loose) == (False, True)  # loose drops the first line
    [result] = check_response('"all wrapped"', quotation, [{}], "")
    assert (result.strict, result.loose) == (True, True)
    end = ["startend:end_checker"]
    phrase = {"end_phrase": "Is there anything else I can help with?"}
    [result] = check_response("Done. **Is there anything else I can help with?**", end, [phrase], "")
    assert (result.strict, result.loose) == (False, True)  # loose removes the asterisks
    [result] = check_response("   \n", ["punctuation:no_comma"], [{}], "")
    assert (result.strict, result.loose) == (False, False)  # blank responses follow nothing
    [result] = check_response("a, b", ["punctuation:no_comma"], [{}], "")
    assert (result.strict, result.loose) == (False, False)


def test_unknown_instruction_is_unscored_and_kwargs_must_align():
    [result] = check_response("text", ["no:such_instruction"], [{}], "")
    assert not result.scored and "unknown ifeval instruction" in result.reason
    with pytest.raises(ValueError, match="2 instruction ids but 1 kwargs"):
        check_response("text", ["punctuation:no_comma", "startend:quotation"], [{}], "")
    # None values mean "unused", as in the IFEval and IFBench files.
    [result] = check_response("a b", ["punctuation:no_comma"], [{"keyword": None}], "")
    assert result.strict is True


def test_if_metrics_leave_unscored_out_of_every_denominator():
    def r(strict, loose):
        return InstructionResult("x", strict, loose, None if strict is not None else "missing data")

    metrics = if_metrics(
        [
            [r(True, True), r(False, True)],
            [r(True, True), r(None, None)],
            [r(None, None)],
        ]
    )
    # intervals over the 2 scored prompts: prompt-level strict is 1 of 2, so anything from 0 to 1
    assert metrics.pop("ci95") == {
        "prompt_level_strict": [0.0, 1.0], "prompt_level_loose": [1.0, 1.0],
        "instruction_level_strict": [0.5, 1.0], "instruction_level_loose": [1.0, 1.0],
    }  # fmt: skip
    assert metrics == {
        "num_prompts": 3,
        "num_scored_prompts": 2,
        "prompt_level_strict": 0.5,
        "prompt_level_loose": 1.0,
        "instruction_level_strict": 2 / 3,
        "instruction_level_loose": 1.0,
        "unscored_instructions": 2,
    }
    assert if_metrics([])["prompt_level_strict"] == 0.0


def test_load_ifbench(ifbench, train, held_out):
    assert len(ifbench) == 294
    for record in ifbench:
        assert set(record) == {"key", "prompt", "instruction_id_list", "kwargs"}
        assert len(record["kwargs"]) == len(record["instruction_id_list"])
        assert all(value is not None for kwargs in record["kwargs"] for value in kwargs.values())
    generated = train + held_out
    assert not {r["key"] for r in ifbench} & {r["key"] for r in generated}
    assert not {r["prompt"] for r in ifbench} & {r["prompt"] for r in generated}


def test_load_ifbench_missing(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_ifbench(tmp_path / "IFBench_test.jsonl")
    monkeypatch.setattr(instructions.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=IFBENCH_INSTALL):
        load_ifbench()


@pytest.mark.skipif(not NLTK_MISSING, reason="nltk data is installed here")
def test_ifbench_checker_needing_nltk_data_is_unscored(ifbench):
    record = next(r for r in ifbench if r["instruction_id_list"] == ["ratio:stop_words"])
    [result] = check_response(
        "A reply to it.", record["instruction_id_list"], record["kwargs"], record["prompt"], "ifbench"
    )
    assert result.strict is None and result.loose is None and "stopwords" in result.reason
    # A blank answer follows nothing, but whether the instruction is scored does not depend on the answer.
    ids, kwargs = record["instruction_id_list"], record["kwargs"]
    [blank] = check_response("  ", ids, kwargs, record["prompt"], "ifbench")
    assert blank.strict is None and blank.loose is None and "stopwords" in blank.reason
    checked = [
        check_response("A reply.", r["instruction_id_list"], r["kwargs"], r["prompt"], "ifbench")
        for r in ifbench
    ]
    metrics = if_metrics(checked)
    assert metrics["unscored_instructions"] == 25  # of 335 instruction instances, as in the reference notes
    assert metrics["num_prompts"] == 294


def test_write_if_prompts(tmp_path):
    train_path, eval_path = write_if_prompts(tmp_path / "if.jsonl", 5, 7, 3)
    assert eval_path == tmp_path / "if.eval.jsonl"
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    held_out = [json.loads(line) for line in eval_path.read_text().splitlines()]
    assert train == make_if_prompts(5, 7) and held_out == make_if_prompts(3, 7, split="eval")


@pytest.mark.slow
def test_loading_the_ifbench_checkers_reaches_for_no_network():
    # if_verifiable's IFBench module calls nltk.download at import for data it lacks; grouppo must not.
    code = (
        "import nltk\n"
        "def refuse(*a, **k):\n"
        "    raise SystemExit('nltk.download called')\n"
        "nltk.download = refuse\n"
        "from grouppo.embedded.instructions import _registry\n"
        "assert len(_registry('ifbench')) > 50\n"
        "assert nltk.download is refuse\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_an_undetectable_language_counts_as_followed_without_a_log_line(capsys, caplog):
    """The official rule: a response whose language cannot be detected follows ``language:response_
    language``; the official checker's error line about it is dropped, any other log record kept."""
    import logging

    language = (["language:response_language"], [{"language": "en"}])
    results = check_response("🌍🌍🌍", *language, "Answer in English.")
    assert results[0].strict is True
    assert "Unable to detect language" not in capsys.readouterr().err + caplog.text
    logging.getLogger().error("a user's own error")
    assert "a user's own error" in caplog.text
