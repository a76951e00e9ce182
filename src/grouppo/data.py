"""Group records: grouppo's data schema, its validation, file loading and converters.

A group record holds one prompt and K >= 2 responses to it::

    {"prompt": "...", "responses": ["...", "...", ...], "scores": [7.5, 3.0, ...], "labels": [1, 0, ...]}

- ``prompt``: a non-empty string, or a non-empty list of chat messages ``{"role": ..., "content": ...}``.
- ``responses``: K >= 2 items, each a non-empty string or a non-empty list of messages
  (``[{"role": "assistant", "content": "..."}]``). K may differ between records.
- ``scores``: optional, K finite numbers (a reward per response).
- ``labels``: optional, K values 1 (positive) or 0 (negative); true/false are accepted too.

At least one of ``scores`` and ``labels`` is required: labels given are used as they are, otherwise a
positive rule (:func:`labels_from_scores`) reads them from the scores. Other fields are carried along.

Data comes in as JSON lines, JSON, Parquet or a Hugging Face dataset (:func:`load_records`); TRL
preference pairs and raw UltraFeedback rows convert to groups (:data:`CONVERTERS`).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

POSITIVE_RULES: tuple[str, ...] = ("top_bottom", "best_vs_rest", "above_mean", "best_vs_worst")

CANONICAL_FIELDS: tuple[str, ...] = ("prompt", "responses", "scores", "labels")

FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")

MAX_SKIP_REASONS = 10

CONTENT_ACCEPTS = (
    "a non-empty string or a non-empty list of messages, each a dict with string 'role' and 'content'"
)


class DataError(ValueError):
    """Bad input data; the message names the source, record and field."""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _error(source: str, index: int, field_name: str | None, problem: str) -> DataError:
    where = f"{source}: record {index}"
    if field_name is not None:
        where += f": field {field_name!r}"
    return DataError(f"{where}: {problem}")


def _require_object(record: Any, index: int, source: str) -> Mapping[str, Any]:
    if not isinstance(record, Mapping):
        raise _error(source, index, None, f"expected an object (a dict of fields), got {_type_name(record)}")
    return record


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _score_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable score, or None when it is one."""
    if not _is_number(value):
        return f"got {_type_name(value)}; expected a finite number"
    if not math.isfinite(value):
        return f"got {value}; expected a finite number"
    return None


def is_conversational(value: Any) -> bool:
    """True when ``value`` is a non-empty list of chat messages (dicts with "role" and "content")."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(
            isinstance(message, Mapping) and "role" in message and "content" in message for message in value
        )
    )


def _content_problem(value: Any) -> str | None:
    """Why ``value`` is neither a non-empty string nor a list of messages, or None when it is one of them."""
    if value is None:
        return f"missing or null; expected {CONTENT_ACCEPTS}"
    if isinstance(value, str):
        return None if value.strip() else f"got an empty string; expected {CONTENT_ACCEPTS}"
    if not isinstance(value, list):
        return f"got {_type_name(value)}; expected {CONTENT_ACCEPTS}"
    if not value:
        return f"got an empty list; expected {CONTENT_ACCEPTS}"
    for position, message in enumerate(value):
        if not isinstance(message, Mapping):
            return f"message {position} is a {_type_name(message)}; expected {CONTENT_ACCEPTS}"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                return f"message {position} has no string {key!r}; expected {CONTENT_ACCEPTS}"
    return None


def _require_rule(rule: str) -> None:
    if rule not in POSITIVE_RULES:
        raise ValueError(f"unknown positive rule {rule!r}; expected one of {', '.join(POSITIVE_RULES)}")


def labels_from_scores(scores: Sequence[float], rule: str) -> list[int | None]:
    """Label the responses of one group from their scores: 1 = positive, 0 = negative, None = dropped.

    Rules (``POSITIVE_RULES``):

    - ``top_bottom`` (GroupDPO's offline rule, the default): rank the responses by score, highest first,
      ties broken by position (a stable sort: of two equal scores the earlier response ranks higher).
      The top floor(K/2) are positive and the bottom floor(K/2) negative; for odd K the single
      middle-ranked response is dropped. Tied responses can thus land on both sides of the cut.
    - ``best_vs_rest``: every response whose score equals the maximum is positive, all others negative.
    - ``above_mean``: a score strictly above the group's mean is positive, any other negative.
    - ``best_vs_worst``: the first response with the maximal score is positive, the first with the
      minimal score negative, all others dropped (the classic best-vs-worst DPO pair).

    When all scores are equal (or there are none) no preference can be read from them, under any rule:
    every response is None. Otherwise every rule gives at least one positive and one negative.

    Raises ValueError for a rule not in ``POSITIVE_RULES``.
    """
    _require_rule(rule)
    values = list(scores)
    if not values or max(values) == min(values):
        return [None] * len(values)
    top, bottom = max(values), min(values)
    if rule == "best_vs_rest":
        return [1 if score == top else 0 for score in values]
    if rule == "above_mean":
        mean = sum(values) / len(values)
        return [1 if score > mean else 0 for score in values]
    labels: list[int | None] = [None] * len(values)
    if rule == "best_vs_worst":
        labels[values.index(top)] = 1
        labels[values.index(bottom)] = 0
        return labels
    ranked = sorted(range(len(values)), key=lambda position: -values[position])
    half = len(values) // 2
    for position in ranked[:half]:
        labels[position] = 1
    for position in ranked[len(values) - half :]:
        labels[position] = 0
    return labels


def _check_scores(value: Any, k: int, index: int, source: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != k:
        got = len(value) if isinstance(value, (list, tuple)) else _type_name(value)
        raise _error(source, index, "scores", f"expected {k} numbers (one per response), got {got}")
    for position, score in enumerate(value):
        problem = _score_problem(score)
        if problem is not None:
            raise _error(source, index, "scores", f"score {position}: {problem}")
    return [float(score) for score in value]


def _check_labels(value: Any, k: int, index: int, source: str) -> list[int]:
    accepts = "1 (positive) or 0 (negative), or true/false"
    if not isinstance(value, (list, tuple)) or len(value) != k:
        got = len(value) if isinstance(value, (list, tuple)) else _type_name(value)
        raise _error(
            source, index, "labels", f"expected {k} labels (one per response, each {accepts}), got {got}"
        )
    for position, label in enumerate(value):
        if not (isinstance(label, numbers.Integral) and label in (0, 1)):
            raise _error(source, index, "labels", f"label {position} is {label!r}; expected {accepts}")
    return [int(label) for label in value]


def normalize_record(
    record: Mapping[str, Any], index: int, *, positive_rule: str = "top_bottom", source: str = "data"
) -> dict[str, Any]:
    """Validate one group record and return it in canonical form, as a new dict.

    The result has ``prompt``, ``responses``, ``scores`` (floats, or None when the record has none) and
    ``labels`` (ints 1/0), followed by the record's other fields, untouched. Labels given are used as
    they are (scores given beside them are kept, for score-based losses). Without labels they come from
    ``labels_from_scores(scores, positive_rule)``, and the responses it drops leave with their scores.

    ``index`` (0-based) and ``source`` (a file or dataset name) only serve the error messages: every
    problem raises DataError naming the source, the record, the field and what would be accepted.
    """
    _require_rule(positive_rule)
    record = _require_object(record, index, source)
    problem = _content_problem(record.get("prompt"))
    if problem is not None:
        raise _error(source, index, "prompt", problem)
    responses = record.get("responses")
    if not isinstance(responses, (list, tuple)) or len(responses) < 2:
        got = f"{len(responses)}" if isinstance(responses, (list, tuple)) else _type_name(responses)
        raise _error(source, index, "responses", f"expected a list of at least 2 responses, got {got}")
    for position, response in enumerate(responses):
        problem = _content_problem(response)
        if problem is not None:
            raise _error(source, index, "responses", f"response {position}: {problem}")
    k = len(responses)
    scores = None if record.get("scores") is None else _check_scores(record["scores"], k, index, source)
    if record.get("labels") is not None:
        labels: list[int | None] = [*_check_labels(record["labels"], k, index, source)]
    elif scores is not None:
        labels = labels_from_scores(scores, positive_rule)
        if all(label is None for label in labels):
            raise _error(
                source,
                index,
                "scores",
                f"all {k} scores are equal ({scores[0]:g}), so they express no preference; "
                "expected at least two different scores, or 'labels'",
            )
    else:
        raise _error(
            source,
            index,
            "labels",
            "both 'labels' and 'scores' are missing; expected 'labels' (1 or 0 per response), "
            "'scores' (one number per response), or both",
        )
    kept = [position for position, label in enumerate(labels) if label is not None]
    positives = sum(1 for position in kept if labels[position] == 1)
    negatives = len(kept) - positives
    if positives == 0 or negatives == 0:
        raise _error(
            source,
            index,
            "labels",
            "the group needs at least one positive (1) and one negative (0), "
            f"got {positives} positives and {negatives} negatives",
        )
    normalized = {
        "prompt": record["prompt"],
        "responses": [responses[position] for position in kept],
        "scores": None if scores is None else [scores[position] for position in kept],
        "labels": [labels[position] for position in kept],
    }
    normalized.update((key, value) for key, value in record.items() if key not in CANONICAL_FIELDS)
    return normalized


def _format_counts(counts: Counter[int]) -> str:
    return ", ".join(f"{value}: {count}" for value, count in sorted(counts.items())) or "none"


@dataclass
class GroupStats:
    """What :func:`prepare_groups` saw: record counts and the shape of the groups it kept."""

    records: int = 0
    kept: int = 0
    skipped: int = 0
    group_sizes: Counter[int] = field(default_factory=Counter)
    positives: Counter[int] = field(default_factory=Counter)
    negatives: Counter[int] = field(default_factory=Counter)
    skip_reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A human-readable report, one fact per line; distributions read ``value: groups``."""
        lines = [
            f"records read: {self.records}",
            f"groups kept: {self.kept}",
            f"records skipped: {self.skipped}",
            f"group size K (K: groups): {_format_counts(self.group_sizes)}",
            f"positives per group (|P|: groups): {_format_counts(self.positives)}",
            f"negatives per group (|N|: groups): {_format_counts(self.negatives)}",
        ]
        if self.skip_reasons:
            lines.append(f"skip reasons (first {len(self.skip_reasons)} of {self.skipped}):")
            lines.extend(f"  {reason}" for reason in self.skip_reasons)
        return "\n".join(lines)


def prepare_groups(
    records: Iterable[Mapping[str, Any]],
    *,
    positive_rule: str = "top_bottom",
    skip_invalid: bool = False,
    source: str = "data",
) -> tuple[list[dict[str, Any]], GroupStats]:
    """Normalize every record (:func:`normalize_record`) and count what came out.

    A bad record raises its DataError by default; with ``skip_invalid`` it is skipped and counted,
    and the first few messages are kept in ``GroupStats.skip_reasons``, so that a large, slightly
    dirty data set can still be used knowingly.
    """
    _require_rule(positive_rule)
    groups: list[dict[str, Any]] = []
    stats = GroupStats()
    for index, record in enumerate(records):
        stats.records += 1
        try:
            group = normalize_record(record, index, positive_rule=positive_rule, source=source)
        except DataError as error:
            if not skip_invalid:
                raise
            stats.skipped += 1
            if len(stats.skip_reasons) < MAX_SKIP_REASONS:
                stats.skip_reasons.append(str(error))
            continue
        groups.append(group)
        stats.kept += 1
        stats.group_sizes[len(group["labels"])] += 1
        stats.positives[sum(group["labels"])] += 1
        stats.negatives[len(group["labels"]) - sum(group["labels"])] += 1
    if stats.skipped:
        logger.warning("%s: skipped %d of %d invalid records", source, stats.skipped, stats.records)
    return groups, stats


def _require_dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(value)}")
    return value


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
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
    return records


def _read_json(path: Path, split: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if isinstance(value, dict) and isinstance(value.get(split), list):
        value = value[split]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of objects, or an object whose {split!r} field is one")
    return [_require_dict(item, f"{path}: record {index}") for index, item in enumerate(value)]


def load_records(
    path_or_name: str, *, split: str = "train", config_name: str | None = None
) -> list[dict[str, Any]]:
    """Read records as plain dicts from a local file, a local dataset folder or a Hugging Face dataset.

    - ``.jsonl``: one JSON object per line; blank lines are skipped; a bad line raises DataError naming
      the file and the line (1-based, as editors count).
    - ``.json``: a list of objects, or an object whose ``split`` field holds that list.
    - ``.parquet``: every row.
    - anything else (a folder, or a dataset name): ``datasets.load_dataset(path_or_name, config_name,
      split=split)``.

    JSON is read with the json module rather than Arrow, so records may differ in type from one
    another (a string prompt here, a message list there), which Arrow's schema inference rejects.
    A path with one of the file suffixes that does not exist raises FileNotFoundError.
    """
    path = Path(path_or_name)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        import datasets

        return datasets.load_dataset(path_or_name, config_name, split=split).to_list()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path_or_name}: no such file; expected a local {', '.join(FILE_SUFFIXES)} file"
        )
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path, split)
    import pyarrow.parquet

    return pyarrow.parquet.read_table(path).to_pylist()


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> int:
    """Write records as UTF-8 JSON lines (non-ASCII kept as is), creating parent folders; return the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(dict(record), ensure_ascii=False) + "\n")
            count += 1
    return count


def _convert_each(
    records: Iterable[Any],
    convert: Callable[[Any, int, str], dict[str, Any]],
    *,
    skip_invalid: bool,
    source: str,
) -> list[dict[str, Any]]:
    """Apply ``convert(record, index, source)`` to every record, raising or skipping on DataError."""
    groups = []
    skipped: list[str] = []
    for index, record in enumerate(records):
        try:
            groups.append(convert(record, index, source))
        except DataError as error:
            if not skip_invalid:
                raise
            skipped.append(str(error))
    if skipped:
        logger.warning(
            "%s: skipped %d of %d records that could not be converted (first: %s)",
            source,
            len(skipped),
            len(groups) + len(skipped),
            skipped[0],
        )
    return groups


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _shared_prefix_length(first: list[Any], second: list[Any]) -> int:
    shared = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        shared += 1
    return shared


def _trl_pair(record: Any, index: int, source: str) -> dict[str, Any]:
    record = _require_object(record, index, source)
    for name in ("chosen", "rejected"):
        problem = _content_problem(record.get(name))
        if problem is not None:
            raise _error(source, index, name, problem)
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = record.get("prompt")
    if prompt is None:
        # TRL's implicit-prompt format: full conversations whose shared leading messages are the prompt.
        if not (is_conversational(chosen) and is_conversational(rejected)):
            raise _error(
                source,
                index,
                "prompt",
                f"missing; expected {CONTENT_ACCEPTS}, or 'chosen' and 'rejected' as full conversations "
                "(lists of messages) that start with the same prompt messages",
            )
        shared = _shared_prefix_length(chosen, rejected)
        if shared == 0:
            raise _error(
                source,
                index,
                "prompt",
                "missing, and 'chosen' and 'rejected' share no leading messages to take it from; "
                "expected a 'prompt' field, or conversations that start with the same prompt messages",
            )
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        for name, rest in (("chosen", chosen), ("rejected", rejected)):
            if not rest:
                raise _error(
                    source,
                    index,
                    name,
                    f"nothing remains after the {shared} messages it shares with the other conversation; "
                    "expected the conversation to continue with the response after the shared prompt",
                )
    else:
        problem = _content_problem(prompt)
        if problem is not None:
            raise _error(source, index, "prompt", problem)
    group: dict[str, Any] = {"prompt": prompt, "responses": [chosen, rejected]}
    if record.get("score_chosen") is not None and record.get("score_rejected") is not None:
        for name in ("score_chosen", "score_rejected"):
            problem = _score_problem(record[name])
            if problem is not None:
                raise _error(source, index, name, problem)
        group["scores"] = [float(record["score_chosen"]), float(record["score_rejected"])]
    group["labels"] = [1, 0]
    return group


@dataclass
class _PromptPairs:
    """The pairs of one prompt, accumulated for ``from_trl_pairwise(merge_prompts=True)``."""

    prompt: Any
    responses: dict[str, Any] = field(default_factory=dict)  # canonical JSON -> response, first seen first
    chosen: set[str] = field(default_factory=set)
    rejected: set[str] = field(default_factory=set)
    scores: dict[str, set[float]] = field(default_factory=dict)
    all_scored: bool = True

    def add(self, pair: dict[str, Any]) -> None:
        keys = [_canonical_json(response) for response in pair["responses"]]
        for key, response in zip(keys, pair["responses"], strict=True):
            self.responses.setdefault(key, response)
        self.chosen.add(keys[0])
        self.rejected.add(keys[1])
        if "scores" in pair:
            for key, score in zip(keys, pair["scores"], strict=True):
                self.scores.setdefault(key, set()).add(score)
        else:
            self.all_scored = False

    def contradictory(self) -> set[str]:
        return self.chosen & self.rejected

    def group(self) -> dict[str, Any] | None:
        """The merged group, or None when it lacks a positive or a negative."""
        kept = [key for key in self.responses if key not in self.contradictory()]
        labels = [1 if key in self.chosen else 0 for key in kept]
        if 1 not in labels or 0 not in labels:
            return None
        group: dict[str, Any] = {"prompt": self.prompt, "responses": [self.responses[key] for key in kept]}
        if self.all_scored and all(len(self.scores[key]) == 1 for key in kept):
            group["scores"] = [next(iter(self.scores[key])) for key in kept]
        group["labels"] = labels
        return group


def _merge_by_prompt(pairs: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    by_prompt: dict[str, _PromptPairs] = {}
    for pair in pairs:
        by_prompt.setdefault(_canonical_json(pair["prompt"]), _PromptPairs(pair["prompt"])).add(pair)
    merged = [prompt_pairs.group() for prompt_pairs in by_prompt.values()]
    contradictory = sum(len(prompt_pairs.contradictory()) for prompt_pairs in by_prompt.values())
    empty = merged.count(None)
    if contradictory or empty:
        logger.warning(
            "%s: merging pairs by prompt dropped %d contradictory responses (chosen in one pair, rejected in "
            "another) and %d prompts left without both a positive and a negative",
            source,
            contradictory,
            empty,
        )
    return [group for group in merged if group is not None]


def from_trl_pairwise(
    records: Iterable[Mapping[str, Any]],
    *,
    merge_prompts: bool = False,
    skip_invalid: bool = False,
    source: str = "data",
) -> list[dict[str, Any]]:
    """Convert TRL preference pairs to groups.

    Accepted records: ``prompt``/``chosen``/``rejected`` as plain strings or conversations (a message
    list prompt, assistant message lists as responses), or TRL's implicit-prompt format: no ``prompt``,
    ``chosen`` and ``rejected`` full conversations whose longest shared run of leading messages is the
    prompt and whose remainders are the responses. Each pair becomes the group
    ``{"prompt", "responses": [chosen, rejected], "labels": [1, 0]}``, with ``"scores": [score_chosen,
    score_rejected]`` when the record has both (as HuggingFaceH4/ultrafeedback_binarized does).

    With ``merge_prompts``, the pairs of one prompt (same canonical JSON) become one group, in the
    order prompts are first seen. Responses are deduplicated by canonical JSON, first seen first; one
    chosen in some pair and never rejected is positive, one rejected and never chosen negative, and one
    both chosen and rejected contradicts itself and is dropped (counted in a warning, with prompts left
    without a positive or a negative, which are dropped too). Scores are kept only when every response
    of the merged group has one consistent score. Note that merging changes what is trained: all-pairs
    losses then compare every positive with every negative of the prompt, including pairs that never
    appeared in the data.

    Bad records raise DataError, or with ``skip_invalid`` are skipped and counted in a warning.
    """
    pairs = _convert_each(records, _trl_pair, skip_invalid=skip_invalid, source=source)
    return _merge_by_prompt(pairs, source) if merge_prompts else pairs


def _ultrafeedback_group(row: Any, index: int, source: str) -> dict[str, Any]:
    row = _require_object(row, index, source)
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise _error(
            source, index, "instruction", f"got {_type_name(instruction)}; expected a non-empty string"
        )
    completions = row.get("completions")
    if not isinstance(completions, list):
        raise _error(
            source, index, "completions", f"got {_type_name(completions)}; expected a list of completions"
        )
    usable = [
        (completion["response"], float(completion["overall_score"]))
        for completion in completions
        if isinstance(completion, Mapping)
        and isinstance(completion.get("response"), str)
        and completion["response"].strip()
        and _score_problem(completion.get("overall_score")) is None
    ]
    if len(usable) < 2:
        raise _error(
            source,
            index,
            "completions",
            f"{len(usable)} of {len(completions)} completions are usable; expected at least 2 with a "
            "non-empty 'response' and a numeric 'overall_score'",
        )
    group: dict[str, Any] = {
        "prompt": instruction,
        "responses": [response for response, _ in usable],
        "scores": [score for _, score in usable],
    }
    if "source" in row:
        group["dataset_source"] = row["source"]
    return group


def from_ultrafeedback(
    records: Iterable[Mapping[str, Any]], *, skip_invalid: bool = False, source: str = "data"
) -> list[dict[str, Any]]:
    """Convert raw openbmb/UltraFeedback rows to scored groups (labels come later, from a positive rule).

    ``instruction`` becomes the prompt, ``completions[*].response`` the responses and
    ``completions[*].overall_score`` their scores; the row's ``source`` is kept as ``dataset_source``.
    Completions with an empty response or a missing or non-numeric score are dropped. A row left with
    fewer than 2 completions raises DataError, or with ``skip_invalid`` is skipped and counted in a warning.
    """
    return _convert_each(records, _ultrafeedback_group, skip_invalid=skip_invalid, source=source)


def _from_gdpo_release(records: Iterable[Any], *, skip_invalid: bool = False, source: str = "data") -> list:
    from grouppo.beliefs import from_gdpo_release  # grouppo.beliefs builds on this module

    return from_gdpo_release(records, skip_invalid=skip_invalid, source=source)


CONVERTERS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "gdpo": _from_gdpo_release,
    "trl": from_trl_pairwise,
    "ultrafeedback": from_ultrafeedback,
}


def validate_file(
    path_or_name: str, *, positive_rule: str = "top_bottom", skip_invalid: bool = False, split: str = "train"
) -> GroupStats:
    """Load and normalize a group data set without training on it, and report what it holds."""
    records = load_records(path_or_name, split=split)
    _, stats = prepare_groups(
        records, positive_rule=positive_rule, skip_invalid=skip_invalid, source=path_or_name
    )
    return stats


def convert_file(
    kind: str,
    in_path: str,
    out_path: str,
    *,
    merge_prompts: bool = False,
    skip_invalid: bool = False,
    split: str = "train",
) -> int:
    """Convert a data set of another format (a key of ``CONVERTERS``) to JSON lines; return the count.

    "trl" and "ultrafeedback" write group records; "gdpo" (the GDPO release schema) writes belief
    records (``grouppo.beliefs``).

    ``merge_prompts`` applies to the "trl" converter only (see :func:`from_trl_pairwise`).
    """
    if kind not in CONVERTERS:
        raise ValueError(f"unknown converter {kind!r}; expected one of {', '.join(CONVERTERS)}")
    if merge_prompts and kind != "trl":
        raise ValueError(f"merge_prompts applies only to the 'trl' converter, not {kind!r}")
    options = {"merge_prompts": True} if merge_prompts else {}
    records = load_records(in_path, split=split)
    groups = CONVERTERS[kind](records, skip_invalid=skip_invalid, source=in_path, **options)
    return write_jsonl(groups, out_path)
