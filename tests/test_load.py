"""grouppo.load: reading records from JSON lines, JSON, CSV/TSV, Parquet, dataset folders and Hub names
(offline), and writing JSON lines; every error names the file, the line or record, and what would be
accepted."""

import json

import pytest
from conftest import GROUP, PAIR, assistant, jsonl, raises, user

from grouppo.convert import (
    to_group_records,
    validate_file,
)
from grouppo.data import (
    DataError,
)
from grouppo.load import dataset_splits, load_records, write_jsonl


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
def no_hub(monkeypatch):
    """Fail the test if anything is sent to the Hugging Face Hub."""
    datasets = pytest.importorskip("datasets")

    def sent(*args, **kwargs):
        pytest.fail(f"sent to the Hub: {args}")

    monkeypatch.setattr(datasets, "load_dataset", sent)
    monkeypatch.setattr(datasets, "get_dataset_split_names", sent)
    return datasets


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
