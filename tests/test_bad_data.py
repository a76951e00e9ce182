"""Every data problem a user can hit is an error they can act on: the file, the 1-based line or record,
the field, and what would be accepted. Plus the formats read directly (TRL pairs, UltraFeedback)."""

import json
import logging
import math
import time

import pytest

from grouppo.convert import convert_file, detect_format, to_group_records, validate_file
from grouppo.data import BeliefStats, DataError, GroupStats, Records, normalize_record, prepare_groups
from grouppo.load import dataset_splits, load_records, write_jsonl
from grouppo.tokenize import max_token_chars, tokenize_belief_record, tokenize_group


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


GROUP = {"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 0.0]}
PAIR = {"prompt": "p", "chosen": "good", "rejected": "bad"}
BELIEF = {
    "prompt": user("Should the city spend more on transit?"),
    "beliefs": ["more", "less"],
    "distribution": [0.7, 0.3],
    "belief": 0,
    "chosen": "More, buses are full.",
    "rejected": "Less, nobody rides.",
    "population": "A",
    "question_id": 0,
}


def jsonl(tmp_path, name, lines):
    """A JSON lines file from ``lines``: dicts are dumped, strings written as they are."""
    path = tmp_path / name
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything is sent to the Hugging Face Hub."""
    datasets = pytest.importorskip("datasets")

    def sent(*args, **kwargs):
        pytest.fail(f"sent to the Hub: {args}")

    monkeypatch.setattr(datasets, "load_dataset", sent)
    monkeypatch.setattr(datasets, "get_dataset_split_names", sent)
    return datasets


def raises(exception, call, *fragments):
    """Run ``call``; assert it raises ``exception`` whose message holds every fragment; return it."""
    with pytest.raises(exception) as raised:
        call()
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return raised.value


# ------------------------------------------------------------------------------------------ reading files


def test_bad_json_line_names_the_file_and_line_blank_lines_counted(tmp_path):
    path = jsonl(tmp_path, "groups.jsonl", [GROUP, "", GROUP, '{"prompt": "p", "responses": ["a",'])
    error = raises(DataError, lambda: load_records(str(path)), "not valid JSON", "one JSON object per line")
    assert str(error).startswith(f"{path}: line 4: ")
    raises(DataError, lambda: validate_file(str(path)), f"{path}: line 4: not valid JSON")


def test_a_line_that_is_not_an_object(tmp_path):
    path = jsonl(tmp_path, "groups.jsonl", [GROUP, "[1, 2]"])
    raises(DataError, lambda: load_records(str(path)), f"{path}: line 2: expected a JSON object, got list")


@pytest.mark.parametrize(
    ("name", "data", "where"),
    [
        (
            "latin1.jsonl",
            b'{"prompt": "p"}\n\n{"prompt": "caf\xe9"}\n',
            "line 3: byte 0xe9 at byte offset 32",
        ),
        ("latin1.json", b'[{"prompt": "p"},\n {"prompt": "caf\xe9"}]', "line 2: byte 0xe9 at byte offset 34"),
        ("latin1.csv", b"prompt,chosen,rejected\np,caf\xe9,b\n", "line 2: byte 0xe9 at byte offset 28"),
    ],
)
def test_non_utf8_byte_names_the_line_and_offset(tmp_path, name, data, where):
    path = tmp_path / name
    path.write_bytes(data)
    assert f"offset {data.index(bytes([0xE9]))}" in where  # the offset counts bytes from 0
    error = raises(DataError, lambda: load_records(str(path)), "the file must be UTF-8")
    assert str(error).startswith(f"{path}: {where} is not valid UTF-8")


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GROUP).encode() + b"\n")
    assert load_records(str(path)) == [GROUP]


@pytest.mark.parametrize("name", ["data.txt", "data.xlsx", "data"])
def test_unknown_suffix_lists_the_accepted_types(tmp_path, name, no_hub):
    path = tmp_path / name
    path.write_text("prompt,chosen\n", encoding="utf-8")
    accepted = (".jsonl", ".json", ".parquet", ".csv", ".tsv", "save_to_disk", "Hub dataset name")
    raises(DataError, lambda: load_records(str(path)), f"{path}: cannot read", *accepted)
    raises(DataError, lambda: dataset_splits(str(path)), f"{path}: cannot read")


def test_unreadable_parquet_file(tmp_path):
    path = tmp_path / "groups.parquet"
    path.write_text("not parquet", encoding="utf-8")
    raises(DataError, lambda: load_records(str(path)), f"{path}: not a readable Parquet file")


@pytest.mark.parametrize(
    "name", ["missing.jsonl", "./missing", "../missing", "~/no/such/dir", "a/b/c", "dir\\file", "/no/such"]
)
def test_missing_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch, name, no_hub):
    monkeypatch.chdir(tmp_path)
    raises(FileNotFoundError, lambda: load_records(name), f"{name}: no such file", "never looked up on the")
    raises(FileNotFoundError, lambda: dataset_splits(name), f"{name}: no such file")
    raises(FileNotFoundError, lambda: validate_file(name), f"{name}: no such file")


@pytest.mark.parametrize(
    "error", [ConnectionError("no network"), TimeoutError("timed out"), OSError("offline mode")]
)
def test_hub_name_offline_is_a_data_error(monkeypatch, tmp_path, error):
    datasets = pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    asked = []

    def unreachable(*args, **kwargs):
        asked.append(args[0])
        raise error

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setattr(datasets, "get_dataset_split_names", unreachable)
    raised = raises(
        DataError,
        lambda: load_records("someone/prefs"),
        "someone/prefs: not found locally",
        "the Hugging Face Hub could not be reached",
        "grouppo runs offline",
        ".jsonl",
    )
    assert raised.__cause__ is error
    raises(DataError, lambda: dataset_splits("someone/prefs"), "someone/prefs: not found locally")
    assert asked == ["someone/prefs", "someone/prefs"]


def test_hub_name_splits_and_a_local_folder_of_the_same_shape(monkeypatch, tmp_path, datasets_lib):
    monkeypatch.setattr(datasets_lib, "get_dataset_split_names", lambda name, config=None: ["train", "test"])
    assert dataset_splits("someone/prefs") == ["train", "test"]
    monkeypatch.chdir(tmp_path)
    datasets_lib.Dataset.from_list([PAIR]).save_to_disk("someone/prefs")  # an owner/name that is local
    monkeypatch.setattr(datasets_lib, "load_dataset", lambda *a, **k: pytest.fail("sent to the Hub"))
    assert load_records("someone/prefs") == [PAIR]


def test_hub_name_with_a_missing_split_lists_the_splits(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)

    def split_names(name, config_name=None):
        return ["train", "test"]

    def never(*args, **kwargs):
        raise AssertionError("a split that is not there is not loaded")

    monkeypatch.setattr(datasets, "get_dataset_split_names", split_names)
    monkeypatch.setattr(datasets, "load_dataset", never)
    raises(
        DataError,
        lambda: load_records("someone/prefs", split="validation"),
        "someone/prefs: no split 'validation'; available splits: train, test",
    )


def test_csv_is_read_with_numbers_as_numbers(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(
        "prompt,chosen,rejected,score_chosen,score_rejected\n"
        '"Hi, you",good,bad,8,3.5\nq,"two\nlines",x,1,0\n',
        encoding="utf-8",
    )
    records = load_records(str(path))
    assert records == [
        {"prompt": "Hi, you", "chosen": "good", "rejected": "bad", "score_chosen": 8, "score_rejected": 3.5},
        {"prompt": "q", "chosen": "two\nlines", "rejected": "x", "score_chosen": 1, "score_rejected": 0.0},
    ]
    assert (records.source, records.locations) == (str(path), ["record 1", "record 2"])
    groups, message = to_group_records(records)
    assert message == f"{path}: read 2 TRL pairs as 2 groups of 2"
    assert groups[0]["scores"] == [8.0, 3.5]
    assert dataset_splits(str(path)) == ["train"]


def test_csv_row_with_a_wrong_column_count_names_the_line(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\np,a,b\nq,c\n", encoding="utf-8")
    raises(DataError, lambda: load_records(str(path)), f"{path}: line 3: expected 3 columns", "got 2")


def test_tsv_group_records_with_json_list_cells(tmp_path):
    path = tmp_path / "groups.tsv"
    path.write_text(
        "prompt\tresponses\tscores\n"
        'Hi\t["a", "b", "c"]\t[3, 1, 2]\n'
        '[{"role": "user", "content": "q"}]\t["x", "y"]\t[0, 1]\n',
        encoding="utf-8",
    )
    records = load_records(str(path))
    assert records == [
        {"prompt": "Hi", "responses": ["a", "b", "c"], "scores": [3, 1, 2]},
        {"prompt": user("q"), "responses": ["x", "y"], "scores": [0, 1]},
    ]
    stats = validate_file(str(path))
    assert (stats.records, stats.kept, stats.skipped) == (2, 2, 0)


def test_csv_list_cell_that_is_not_json_names_record_and_field(tmp_path):
    path = tmp_path / "groups.csv"
    path.write_text('prompt,responses,labels\np,"[""a"", ""b""]","[1, 0]"\nq,"[a, b]","[1, 0]"\n', "utf-8")
    raises(
        DataError,
        lambda: load_records(str(path)),
        f"{path}: record 2: field 'responses': a CSV cell holding a list must be JSON text",
    )


@pytest.fixture
def datasets_lib(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    datasets.disable_progress_bars()
    return datasets


def test_save_to_disk_dataset_folder(tmp_path, datasets_lib, no_hub):
    folder = tmp_path / "pairs"
    datasets_lib.Dataset.from_list([PAIR, {**PAIR, "chosen": "fine"}]).save_to_disk(str(folder))
    records = load_records(str(folder))
    assert records == [PAIR, {**PAIR, "chosen": "fine"}]
    assert (records.source, records.locations) == (str(folder), ["record 1", "record 2"])
    assert dataset_splits(str(folder)) == ["train"]


def test_save_to_disk_dataset_dict_folder_picks_the_split(tmp_path, datasets_lib, no_hub):
    folder = tmp_path / "splits"
    train, test = [GROUP], [{**GROUP, "prompt": "held out"}]
    datasets_lib.DatasetDict(
        {"train": datasets_lib.Dataset.from_list(train), "test": datasets_lib.Dataset.from_list(test)}
    ).save_to_disk(str(folder))
    assert load_records(str(folder)) == train
    assert load_records(str(folder), split="test") == test
    assert dataset_splits(str(folder)) == ["train", "test"]


def test_missing_split_lists_the_available_ones(tmp_path, datasets_lib, no_hub):
    folder = tmp_path / "splits"
    datasets_lib.DatasetDict(
        {"train": datasets_lib.Dataset.from_list([GROUP]), "test": datasets_lib.Dataset.from_list([GROUP])}
    ).save_to_disk(str(folder))
    raises(
        DataError,
        lambda: load_records(str(folder), split="validation"),
        f"{folder}: no split 'validation'; available splits: train, test",
    )
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": [GROUP], "eval": [GROUP], "meta": {"v": 1}}), encoding="utf-8")
    assert dataset_splits(str(path)) == ["train", "eval"]
    raises(
        DataError,
        lambda: load_records(str(path), split="test"),
        f"{path}: no split 'test'; the file's splits: train, eval",
    )


# ------------------------------------------------------------------------------------------ formats


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


def test_text_prompt_with_message_responses_is_refused_before_tokenization(tmp_path):
    record = {"prompt": "q", "responses": [assistant("a"), "b"], "labels": [1, 0]}
    path = jsonl(tmp_path, "groups.jsonl", [GROUP, "", record])
    raises(
        DataError,
        lambda: validate_file(str(path)),
        f"{path}: line 3: field 'responses': response 0 is a list of chat messages",
        "but 'prompt' is plain text",
        "both must be text or both chat messages",
    )
    pair = {"prompt": "q", "chosen": assistant("a"), "rejected": "b"}
    raises(
        DataError,
        lambda: to_group_records([PAIR, pair], source="prefs"),
        "prefs: record 2: field 'chosen': chat messages, but 'prompt' is plain text",
        "both must be text or both chat messages",
    )


def test_chat_prompt_with_text_responses_is_accepted_and_tokenizes(tokenizer):
    group = normalize_record({"prompt": user("q"), "responses": ["a", assistant("b")], "labels": [1, 0]}, 0)
    row = tokenize_group(group, tokenizer)
    assert len(row["response_ids"]) == 2 and all(row["response_ids"])


def test_chat_messages_need_a_tokenizer_with_a_chat_template():
    from grouppo.embedded.synthetic import tiny_tokenizer

    plain = tiny_tokenizer()
    plain.chat_template = None
    group = {"prompt": user("q"), "responses": ["a", "b"], "labels": [1, 0]}
    raises(
        DataError, lambda: tokenize_group(group, plain), "chat messages need a tokenizer with a chat template"
    )


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


def test_write_jsonl_leaves_no_half_written_file(tmp_path):
    path = tmp_path / "groups.jsonl"
    path.write_text("old\n", encoding="utf-8")
    raises(
        DataError,
        lambda: write_jsonl([GROUP, GROUP, {**GROUP, "meta": object()}], path),
        f"{path}: record 3: cannot be written as JSON",
    )
    assert path.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["groups.jsonl"]


# ------------------------------------------------------------------------------------------ size limits


def test_huge_response_is_cut_before_tokenizing(tokenizer, monkeypatch):
    c = max_token_chars(tokenizer)
    assert c == max(len(entry) for entry in tokenizer.get_vocab())
    seen = []
    call = type(tokenizer).__call__

    def recording(self, *args, **kwargs):
        seen.append(len(kwargs.get("text") or args[0]))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", recording)
    huge = "the cat sat on the mat. " * 850_000  # 20 MB
    assert len(huge) > 20_000_000
    start = time.perf_counter()
    row = tokenize_group(
        {"prompt": "Tell me.", "responses": [huge, "no"], "labels": [1, 0]}, tokenizer, max_length=32
    )
    assert time.perf_counter() - start < 5
    assert max(seen) <= len("Tell me.") + 32 * c + len(tokenizer.eos_token)
    short = {"prompt": "Tell me.", "responses": [huge[:2000], "no"], "labels": [1, 0]}
    assert row == tokenize_group(short, tokenizer, max_length=32)
    assert len(row["prompt_ids"]) + len(row["response_ids"][0]) == 32


@pytest.mark.parametrize("chat", [False, True])
def test_cut_response_gives_the_ids_of_the_whole_text(tokenizer, chat):
    text = "Un café, s'il vous plaît! 日本語 " * 400  # ~13k characters, tokenized whole below
    prompt = user("Order.") if chat else "Order."
    for max_length, max_prompt_length in ((24, None), (64, 4), (200, None), (24, 20)):
        row = tokenize_group(
            {"prompt": prompt, "responses": [text, "x"], "labels": [1, 0]},
            tokenizer,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )
        whole = tokenize_group({"prompt": prompt, "responses": [text, "x"], "labels": [1, 0]}, tokenizer)
        prompt_ids = whole["prompt_ids"][-max_prompt_length:] if max_prompt_length else whole["prompt_ids"]
        room = max_length - len(prompt_ids)
        if room <= 0:
            assert row is None
            continue
        assert row["prompt_ids"] == prompt_ids
        assert row["response_ids"] == [ids[:room] for ids in whole["response_ids"]]


def test_huge_prompt_is_dropped_without_tokenizing_or_cut_to_max_prompt_length(tokenizer):
    huge = "why? " * 4_000_000
    start = time.perf_counter()
    assert (
        tokenize_group({"prompt": huge, "responses": ["a", "b"], "labels": [1, 0]}, tokenizer, max_length=64)
        is None
    )
    row = tokenize_group(
        {"prompt": user(huge), "responses": ["a", "b"], "labels": [1, 0]},
        tokenizer,
        max_length=64,
        max_prompt_length=16,
    )
    assert time.perf_counter() - start < 5
    assert len(row["prompt_ids"]) == 16
    small = tokenize_group(
        {"prompt": user(huge[-2000:]), "responses": ["a", "b"], "labels": [1, 0]},
        tokenizer,
        max_length=64,
        max_prompt_length=16,
    )
    assert row == small


def test_huge_belief_answer_is_cut_before_tokenizing(tokenizer):
    huge = "More, buses are full. " * 1_000_000
    start = time.perf_counter()
    row = tokenize_belief_record({**BELIEF, "chosen": huge}, tokenizer, max_length=160)
    assert time.perf_counter() - start < 5
    assert row == tokenize_belief_record({**BELIEF, "chosen": huge[:3000]}, tokenizer, max_length=160)
    assert max(len(r) for r in row["response_ids"]) + len(row["prompt_ids"]) == 160
    assert tokenize_belief_record({**BELIEF, "prompt": huge}, tokenizer, max_length=160) is None


# ------------------------------------------------------------------------------------------ formats read


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


def test_math_nan_in_python_records_is_refused():
    raises(
        DataError,
        lambda: normalize_record({**GROUP, "scores": [1.0, math.nan]}, 4),
        "record 5: field 'scores'",
    )
