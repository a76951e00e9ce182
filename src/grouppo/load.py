"""Where data comes in and goes out: files, saved datasets and the Hub, read as ``grouppo.data.Records``.

:func:`load_records` reads JSON lines, JSON, Parquet, CSV/TSV, a folder written by ``datasets``'
``save_to_disk`` or a Hugging Face Hub dataset, each record labelled with its 1-based line (JSON lines)
or record number, so that errors name them. A path that looks local is never sent to the Hub, and a Hub
that cannot be reached (grouppo runs offline) is an error that says so. :func:`write_jsonl` writes a
whole file or nothing.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from grouppo.data import DataError, Records, is_conversational, type_name

logger = logging.getLogger(__name__)

FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet", ".csv", ".tsv")

LOCAL_INPUTS = (
    "a .jsonl, .json, .parquet, .csv or .tsv file, or a folder written by datasets' Dataset.save_to_disk or "
    "DatasetDict.save_to_disk (or a folder of such data files)"
)
ACCEPTED_INPUTS = f"{LOCAL_INPUTS}, or a Hugging Face Hub dataset name (owner/name)"

def _require_dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, got {type_name(value)}")
    return value


def _utf8_error(path: Path, error: UnicodeDecodeError, line: int, offset: int) -> DataError:
    bad = error.object[error.start : error.start + 1].hex()
    return DataError(
        f"{path}: line {line}: byte 0x{bad} at byte offset {offset} is not valid UTF-8; the file must be "
        "UTF-8 text (re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`)"
    )


def _decode(path: Path, data: bytes) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark dropped), or DataError naming the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise _utf8_error(path, error, line, error.start) from None


def _read_jsonl(path: Path) -> Records:
    records, locations = [], []
    offset = 0
    with path.open("rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise _utf8_error(path, error, line_number, offset + error.start) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}: line {line_number}: not valid JSON ({error.msg}, column {error.colno}); "
                    "expected one JSON object per line"
                ) from None
            records.append(_require_dict(value, f"{path}: line {line_number}"))
            locations.append(f"line {line_number}")
    return Records(records, source=str(path), locations=locations)


def _json_splits(value: Any) -> list[str]:
    return [key for key, item in value.items() if isinstance(item, list)] if isinstance(value, dict) else []


def _load_json(path: Path) -> Any:
    text = _decode(path, path.read_bytes())
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}: line {error.lineno}: not valid JSON ({error.msg}, column {error.colno}); expected a "
            "JSON list of objects, or an object whose split fields ('train', ...) hold such lists"
        ) from None


def _read_json(path: Path, split: str) -> Records:
    value = _load_json(path)
    if isinstance(value, dict):
        splits = _json_splits(value)
        if split not in splits:
            available = ", ".join(splits) if splits else "none (no field holds a list)"
            raise DataError(
                f"{path}: no split {split!r}; the file's splits: {available} (expected a JSON list of "
                f"objects, or an object whose {split!r} field is one)"
            )
        value = value[split]
    if not isinstance(value, list):
        raise DataError(
            f"{path}: expected a JSON list of objects, or an object whose {split!r} field is one; "
            f"got {type_name(value)}"
        )
    return Records(
        [_require_dict(item, f"{path}: record {position + 1}") for position, item in enumerate(value)],
        source=str(path),
    )


# CSV cells hold text: in these fields a cell that opens with "[" is read as JSON (a list of responses,
# scores, labels, ...), so group and belief records can be written as CSV too.
CSV_LIST_FIELDS = (
    "responses", "scores", "labels", "beliefs", "distribution", "completions", "probabilities", "options",
)  # fmt: skip
CSV_MESSAGE_FIELDS = ("prompt", "chosen", "rejected", "messages")


def _csv_cells(path: Path, rows: list[dict[str, Any]]) -> None:
    for position, row in enumerate(rows):
        for name, value in row.items():
            if not (isinstance(value, str) and value.lstrip().startswith("[")):
                continue
            if name in CSV_LIST_FIELDS:
                try:
                    row[name] = json.loads(value)
                except json.JSONDecodeError as error:
                    raise DataError(
                        f"{path}: record {position + 1}: field {name!r}: a CSV cell holding a list must be "
                        f'JSON text, like ["a", "b"] or [1, 0] ({error.msg}, column {error.colno})'
                    ) from None
            elif name in CSV_MESSAGE_FIELDS:
                try:
                    parsed = json.loads(value)
                except json.JSONDecodeError:
                    continue  # plain text that happens to open with "["
                if is_conversational(parsed):
                    row[name] = parsed


def _read_csv(path: Path, delimiter: str) -> Records:
    import pyarrow
    import pyarrow.csv

    data = path.read_bytes()
    _decode(path, data)
    bad_rows: list[Any] = []

    def invalid_row(row: Any) -> str:
        bad_rows.append(row)
        return "skip"

    try:
        table = pyarrow.csv.read_csv(
            io.BytesIO(data),
            parse_options=pyarrow.csv.ParseOptions(
                delimiter=delimiter, newlines_in_values=True, invalid_row_handler=invalid_row
            ),
        )
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as error:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise DataError(f"{path}: not a valid {kind} file ({error})") from None
    if bad_rows:
        row = bad_rows[0]
        text = row.text.encode("utf-8")
        lines = data.split(b"\n")
        line = next((n for n, raw in enumerate(lines, start=1) if raw.rstrip(b"\r") == text), None)
        where = f"line {line}" if line is not None else "a row"
        raise DataError(
            f"{path}: {where}: expected {row.expected_columns} columns (as in the header), got "
            f"{row.actual_columns}: {row.text[:80]!r}; quote cells that hold the delimiter"
        )
    rows = table.to_pylist()
    _csv_cells(path, rows)
    return Records(rows, source=str(path))


def _read_parquet(path: Path) -> Records:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowInvalid, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    return Records(rows, source=str(path))


HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
FILE_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,7}$")


def looks_local(name: str) -> bool:
    """Whether ``name`` reads as a local path rather than a Hub dataset name: it has a file suffix, starts
    with ``/``, ``./``, ``../`` or ``~``, or holds a path separator without being of the ``owner/name``
    form. Such a name, when nothing is there, is never sent to the Hub."""
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    if "\\" in name or (os.altsep is not None and os.altsep in name):
        return True
    if FILE_SUFFIX.search(name.rsplit("/", 1)[-1]):
        return True
    return "/" in name and not HUB_NAME.match(name)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _local_path(path_or_name: str) -> Path | None:
    """The local file or folder ``path_or_name`` names; None for a Hub name; FileNotFoundError for a
    local-looking path where nothing is."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    if looks_local(path_or_name):
        raise FileNotFoundError(
            f"{path_or_name}: no such file; expected a local {', '.join(FILE_SUFFIXES)} file or a dataset "
            "folder (a name that looks like a local path is never looked up on the Hugging Face Hub)"
        )
    return None


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        got = f"a {suffix!r} file" if suffix else "a file without a suffix"
        raise DataError(f"{path}: cannot read {got}; expected {ACCEPTED_INPUTS}")
    return suffix


def _missing_split(source: str, split: str, splits: Sequence[str]) -> DataError:
    return DataError(
        f"{source}: no split {split!r}; available splits: {', '.join(splits) or 'none'} "
        "(choose one with --split, --dataset_train_split or --dataset_test_split)"
    )


def _hub_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]  # ConnectionError, TimeoutError, HTTP errors of the Hub
    for module, name in (("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _offline_error(name: str, error: BaseException) -> DataError:
    return DataError(
        f"{name}: not found locally (no such file or folder), and the Hugging Face Hub could not be reached "
        f"to load it as a dataset name ({type(error).__name__}: {str(error)[:300]}); grouppo runs offline: "
        f"give {LOCAL_INPUTS}"
    )


def _load_dataset(name: str, split: str, config_name: str | None, local: bool) -> Records:
    import datasets

    try:
        splits = datasets.get_dataset_split_names(name, config_name)
        if split not in splits:
            raise _missing_split(name, split, list(splits))
        dataset = datasets.load_dataset(name, config_name, split=split)
    except _hub_errors() as error:
        if local:
            raise DataError(
                f"{name}: the folder could not be read as a dataset ({type(error).__name__}: {error}); "
                f"expected {ACCEPTED_INPUTS}"
            ) from error
        raise _offline_error(name, error) from error
    return Records(dataset.to_list(), source=name)


def _load_saved(path: Path, source: str, split: str) -> Records:
    import datasets

    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise _missing_split(source, split, list(saved))
        saved = saved[split]
    return Records(saved.to_list(), source=source)


def load_records(path_or_name: str, *, split: str = "train", config_name: str | None = None) -> Records:
    """Read records as plain dicts from a local file, a local dataset folder or a Hugging Face dataset.

    The result is a :class:`Records` list: ``source`` is ``path_or_name`` as given and ``locations``
    labels each record (``"line N"``, 1-based, for JSON lines; ``"record N"`` otherwise), so that every
    validator names the record a problem is in.

    - ``.jsonl``: one JSON object per line; blank lines are skipped (and counted); a bad line raises
      DataError naming the file and the line (1-based, as editors count).
    - ``.json``: a list of objects, or an object whose ``split`` field holds that list.
    - ``.parquet``: every row. ``.csv``/``.tsv``: every row, types inferred (numbers are numbers); in list
      fields (``responses``, ``scores``, ``labels``, ...) a cell opening with ``[`` is read as JSON, and
      in ``prompt``/``chosen``/``rejected``/``messages`` a cell holding a JSON list of messages too.
    - a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (``split`` picked);
      another folder through ``datasets.load_dataset`` (its data files).
    - a Hub dataset name (``owner/name``) that is not a local path: ``datasets.load_dataset(path_or_name,
      config_name, split=split)``; when the Hub cannot be reached, DataError (grouppo runs offline).

    A file holds one table: ``split`` selects nothing in it (a JSON object of splits aside), so a file
    given for evaluation is read whole; :func:`dataset_splits` reports its one split as ``"train"``. A
    split missing from a JSON object, a DatasetDict or a Hub dataset raises DataError listing those there.
    Text must be UTF-8 (DataError naming the line and byte offset otherwise). A local file of another
    type raises DataError listing the accepted ones; a name that looks like a local path (see
    :func:`looks_local`) where nothing is raises FileNotFoundError and is never sent to the Hub.

    JSON is read with the json module rather than Arrow, so records may differ in type from one
    another (a string prompt here, a message list there), which Arrow's schema inference rejects.
    """
    path = _local_path(path_or_name)
    if path is None:
        return _load_dataset(path_or_name, split, config_name, local=False)
    if path.is_dir():
        if _is_saved_dataset(path):
            return _load_saved(path, path_or_name, split)
        return _load_dataset(str(path), split, config_name, local=True)
    suffix = _check_suffix(path)
    if suffix == ".jsonl":
        records = _read_jsonl(path)
    elif suffix == ".json":
        records = _read_json(path, split)
    elif suffix in (".csv", ".tsv"):
        records = _read_csv(path, "\t" if suffix == ".tsv" else ",")
    else:
        records = _read_parquet(path)
    records.source = path_or_name
    return records


def dataset_splits(path_or_name: str, config_name: str | None = None) -> list[str]:
    """The splits :func:`load_records` can read from ``path_or_name``.

    A file holds one table, reported as ``["train"]`` (a JSON object: its fields that hold lists); a
    ``DatasetDict`` folder its splits (a ``Dataset`` folder ``["train"]``); another folder or a Hub
    name ``datasets.get_dataset_split_names`` (DataError when the Hub cannot be reached). So a caller
    can take an evaluation split from the same data set (TRL's ``dataset_test_split``) only where one is.
    """
    path = _local_path(path_or_name)
    if path is not None and path.is_dir() and _is_saved_dataset(path):
        index = path / "dataset_dict.json"
        if not index.is_file():
            return ["train"]
        try:
            return [str(name) for name in json.loads(index.read_text(encoding="utf-8"))["splits"]]
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"{index}: not a valid datasets split index ({error})") from None
    if path is not None and not path.is_dir():
        if _check_suffix(path) != ".json":
            return ["train"]
        value = _load_json(path)
        return _json_splits(value) if isinstance(value, dict) else ["train"]
    import datasets

    name = path_or_name if path is None else str(path)
    try:
        return list(datasets.get_dataset_split_names(name, config_name))
    except _hub_errors() as error:
        if path is not None:
            raise DataError(
                f"{name}: the folder could not be read as a dataset ({type(error).__name__}: {error}); "
                f"expected {ACCEPTED_INPUTS}"
            ) from error
        raise _offline_error(name, error) from error


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> int:
    """Write records as UTF-8 JSON lines (non-ASCII kept as is), creating parent folders; return the count.

    The file appears whole or not at all: records go to a temporary file beside it, renamed over ``path``
    once all are written. A record that cannot be written as JSON raises DataError naming it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for record in records:
                try:
                    line = json.dumps(dict(record), ensure_ascii=False, allow_nan=True)
                except (TypeError, ValueError) as error:
                    raise DataError(
                        f"{path}: record {count + 1}: cannot be written as JSON ({error})"
                    ) from None
                out.write(line + "\n")
                count += 1
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return count


