"""Converters from other data formats to grouppo's schemas (``grouppo.data``), and format detection.

``detect_format`` tells a record's format from its fields, and ``to_group_records`` reads a whole data
set of group records, TRL pairs or raw UltraFeedback rows as group records, saying in one line what it
did. The converters:

- ``trl``: TRL preference pairs (plain, conversational, implicit prompt; UltraFeedback binarized) to
  group records, one group per pair or, with ``merge_prompts``, one per prompt;
- ``ultrafeedback``: raw openbmb/UltraFeedback rows to scored group records;
- ``gdpo``: the GDPO release schema (BigBinnie/GDPO) to belief records.

Every converter raises DataError naming the source, the record (its line, or 1-based number) and the
field, or with ``skip_invalid`` skips and counts bad records. ``convert_file`` writes a converted data
set; ``validate_file`` checks a data set of any of these formats without training on it.

One concern, reading the formats grouppo does not own, hence the file's size: most of it is TRL's
pair formats (plain, conversational, implicit prompt, merged by prompt), each with the errors a user
can act on.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from grouppo.data import (
    CANONICAL_FIELDS,
    CONTENT_ACCEPTS,
    MAX_SKIP_REASONS,
    BeliefStats,
    DataError,
    GroupStats,
    Records,
    Where,
    common_prefix,
    content_problem,
    format_counts,
    is_conversational,
    is_number,
    location,
    normalize_belief_record,
    prepare_groups,
    record_error,
    record_locations,
    require_object,
    require_rule,
    score_problem,
    type_name,
    validate_each,
)
from grouppo.load import load_records, write_jsonl

logger = logging.getLogger(__name__)


UNCONVERTED = "records that could not be converted"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


TRL_FIELDS = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected")
BOTH_KINDS = (
    "both must be text or both chat messages (write the prompt as messages, e.g. "
    '[{"role": "user", "content": ...}], or the responses as text)'
)


def trl_pair_to_group(record: Any, where: Where, source: str) -> dict[str, Any]:
    """One TRL preference pair as a group of 2 (``grouppo.convert.from_trl_pairwise`` says how)."""
    record = require_object(record, where, source)
    for name in ("chosen", "rejected"):
        problem = content_problem(record.get(name))
        if problem is not None:
            raise record_error(source, where, name, problem)
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = record.get("prompt")
    chat_pair = is_conversational(chosen) and is_conversational(rejected)
    if prompt is None or (isinstance(prompt, str) and chat_pair):
        # TRL's implicit-prompt format: full conversations whose shared leading messages are the prompt;
        # as TRL's maybe_extract_prompt, a plain-text prompt beside conversations (UltraFeedback
        # binarized) gives way to the conversations' own.
        if not chat_pair:
            raise record_error(
                source,
                where,
                "prompt",
                f"missing; expected {CONTENT_ACCEPTS}, or 'chosen' and 'rejected' as full conversations "
                "(lists of messages) that start with the same prompt messages",
            )
        shared = common_prefix(chosen, rejected)
        if shared == 0:
            problem = (
                "missing, and 'chosen' and 'rejected' share no leading messages to take it from; "
                "expected a 'prompt' field, or conversations that start with the same prompt messages"
                if prompt is None
                else "plain text, while 'chosen' and 'rejected' are chat messages that share no leading "
                f"prompt messages to take the prompt from; {BOTH_KINDS}"
            )
            raise record_error(source, where, "prompt", problem)
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        for name, rest in (("chosen", chosen), ("rejected", rejected)):
            if not rest:
                raise record_error(
                    source,
                    where,
                    name,
                    f"nothing remains after the {shared} messages it shares with the other conversation; "
                    "expected the conversation to continue with the response after the shared prompt",
                )
    else:
        problem = content_problem(prompt)
        if problem is not None:
            raise record_error(source, where, "prompt", problem)
        if isinstance(prompt, str):
            for name, response in (("chosen", chosen), ("rejected", rejected)):
                if not isinstance(response, str):
                    raise record_error(
                        source, where, name, f"chat messages, but 'prompt' is plain text; {BOTH_KINDS}"
                    )
    group: dict[str, Any] = {"prompt": prompt, "responses": [chosen, rejected]}
    if record.get("score_chosen") is not None and record.get("score_rejected") is not None:
        for name in ("score_chosen", "score_rejected"):
            problem = score_problem(record[name])
            if problem is not None:
                raise record_error(source, where, name, problem)
        group["scores"] = [float(record["score_chosen"]), float(record["score_rejected"])]
    group["labels"] = [1, 0]
    group.update(
        (key, value) for key, value in record.items() if key not in TRL_FIELDS and key not in CANONICAL_FIELDS
    )
    return group


@dataclass
class PromptPairs:
    """The pairs of one prompt, accumulated for ``merge_pairs_by_prompt``."""

    prompt: Any
    responses: dict[str, Any] = field(default_factory=dict)  # canonical JSON -> response, first seen first
    chosen: set[str] = field(default_factory=set)
    rejected: set[str] = field(default_factory=set)
    scores: dict[str, set[float]] = field(default_factory=dict)
    all_scored: bool = True

    def add(self, pair: dict[str, Any]) -> None:
        keys = [canonical_json(response) for response in pair["responses"]]
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


def merge_pairs_by_prompt(pairs: list[dict[str, Any]], source: str) -> Records:
    """One group per prompt (see ``from_trl_pairwise``), labelled by the location of its first pair."""
    source, locations = record_locations(pairs, source)
    by_prompt: dict[str, PromptPairs] = {}
    first: dict[str, tuple[str, int]] = {}  # prompt -> (location of its first pair, its number of pairs)
    for position, pair in enumerate(pairs):
        key = canonical_json(pair["prompt"])
        by_prompt.setdefault(key, PromptPairs(pair["prompt"])).add(pair)
        label = (
            locations[position] if locations is not None and position < len(locations) else location(position)
        )
        where, count = first.get(key, (label, 0))
        first[key] = (where, count + 1)
    merged = [prompt_pairs.group() for prompt_pairs in by_prompt.values()]
    labels = [
        where if count == 1 else f"{where} (merged with {count - 1} more pairs of its prompt)"
        for where, count in first.values()
    ]
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
    kept = [position for position, group in enumerate(merged) if group is not None]
    return Records([merged[p] for p in kept], source=source, locations=[labels[p] for p in kept])


def ultrafeedback_row_to_group(row: Any, where: Where, source: str) -> dict[str, Any]:
    """One raw UltraFeedback row as a scored group (``grouppo.convert.from_ultrafeedback`` says how)."""
    row = require_object(row, where, source)
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise record_error(
            source, where, "instruction", f"got {type_name(instruction)}; expected a non-empty string"
        )
    completions = row.get("completions")
    if not isinstance(completions, list):
        raise record_error(
            source, where, "completions", f"got {type_name(completions)}; expected a list of completions"
        )
    usable = [
        (completion["response"], float(completion["overall_score"]))
        for completion in completions
        if isinstance(completion, Mapping)
        and isinstance(completion.get("response"), str)
        and completion["response"].strip()
        and score_problem(completion.get("overall_score")) is None
    ]
    if len(usable) < 2:
        raise record_error(
            source,
            where,
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


RELEASE_FIELDS = ("prompt", "accept_choice_id", "accept_response", "reject_response", "probabilities")


def release_to_belief_records(
    records: Iterable[Any], *, skip_invalid: bool, source: str, renormalize_within: float = 0.01
) -> tuple[Records, list[str]]:
    """``grouppo.convert.from_gdpo_release`` (see there), with the messages of the records skipped."""
    if not isinstance(records, list):
        records = list(records)  # read twice: belief labels first, then the records
    labels: dict[str, dict[int, str]] = defaultdict(dict)
    for record in records:  # belief labels seen per question, from every record that has the fields
        if isinstance(record, Mapping) and all(record.get(name) is not None for name in RELEASE_FIELDS):
            for side in ("accept", "reject"):
                choice, text = record.get(f"{side}_choice_id"), record.get(f"{side}_choice")
                if isinstance(choice, int) and isinstance(text, str) and text.strip():
                    labels[_release_prompt(record)].setdefault(choice, text.strip())

    def convert(record: Any, where: Where, source: str) -> dict[str, Any]:
        record = require_object(record, where, source)
        for name in RELEASE_FIELDS:
            if record.get(name) is None:
                raise record_error(source, where, name, "missing; the GDPO release schema needs it")
        return _release_record(record, where, source, labels[_release_prompt(record)], renormalize_within)

    return validate_each(records, convert, skip_invalid=skip_invalid, source=source, what=UNCONVERTED)


def _release_prompt(record: Mapping[str, Any]) -> str:
    context = record.get("context")
    return (
        f"{context.strip()}\n{record['prompt']}"
        if isinstance(context, str) and context.strip()
        else record["prompt"]
    )


def _release_record(
    record: Mapping[str, Any], where: Where, source: str, seen: dict[int, str], within: float
) -> dict[str, Any]:
    probabilities = record["probabilities"]
    if not isinstance(probabilities, list) or not all(is_number(p) and p >= 0 for p in probabilities):
        raise record_error(source, where, "probabilities", "expected a list of numbers >= 0")
    total = math.fsum(probabilities)
    if abs(total - 1.0) > within:
        raise record_error(
            source, where, "probabilities", f"sums to {total:.6g}; expected 1 (within {within:g})"
        )
    k = len(probabilities)
    options = record.get("options")
    if isinstance(options, list) and len(options) == k and all(isinstance(o, str) for o in options):
        beliefs = [o.strip() for o in options]
    else:
        beliefs = [seen.get(i, str(i)) for i in range(k)]
    converted = {
        "prompt": _release_prompt(record),
        "beliefs": beliefs,
        "distribution": [p / total for p in probabilities],
        "belief": record["accept_choice_id"],
        "chosen": record["accept_response"].strip(),
        "rejected": record["reject_response"].strip(),
    }
    used = (*RELEASE_FIELDS, "context", "options", "accept_choice", "reject_choice", "reject_choice_id")
    extra = {key: value for key, value in record.items() if key not in used}
    return normalize_belief_record({**converted, **extra}, where, source)


# ---------------------------------------------------------------------------------------- the formats
@dataclass(frozen=True)
class Format:
    """One data format grouppo reads: the fields that make a record of it (non-null), its names, and how
    its records are converted (``convert``: records -> (converted, messages of the records skipped); None
    for grouppo's own schemas) and under which name ``grouppo data convert --from`` takes it."""

    key: str
    fields: tuple[str, ...]
    name: str  # one record, in words
    description: str
    converter: str | None = None
    convert: Callable[..., tuple[list[dict[str, Any]], list[str]]] | None = None


def _trl(records: Sequence[Any], *, skip_invalid: bool, source: str, merge_prompts: bool = False) -> tuple:
    pairs, skipped = validate_each(records, trl_pair_to_group, skip_invalid=skip_invalid, source=source,
                                   what=UNCONVERTED)  # fmt: skip
    return (merge_pairs_by_prompt(pairs, source) if merge_prompts else pairs), skipped


def _ultrafeedback(records: Sequence[Any], *, skip_invalid: bool, source: str) -> tuple:
    return validate_each(records, ultrafeedback_row_to_group, skip_invalid=skip_invalid, source=source,
                         what=UNCONVERTED)  # fmt: skip


FORMATS: dict[str, Format] = {
    f.key: f
    for f in (
        Format("groups", ("responses",), "group record",
               "group records (prompt, responses, and scores and/or labels)"),
        Format("beliefs", ("beliefs", "distribution", "belief"), "GDPO belief record",
               "GDPO belief records (prompt, beliefs, distribution, belief, chosen, rejected)"),
        Format("gdpo_release", ("accept_response",), "GDPO release record",
               "GDPO release records (prompt, accept_response, reject_response, probabilities, ...)",
               converter="gdpo", convert=release_to_belief_records),
        Format("trl", ("chosen", "rejected"), "TRL pair",
               "TRL preference pairs (chosen and rejected, with or without prompt: plain text, "
               "conversational or implicit prompt; UltraFeedback binarized too)",
               converter="trl", convert=_trl),
        Format("ultrafeedback", ("instruction", "completions"), "raw UltraFeedback row",
               "raw UltraFeedback rows (instruction, completions)", converter="ultrafeedback",
               convert=_ultrafeedback),
    )
}  # fmt: skip
"""Every format grouppo reads, tried in this order to tell a record's format."""


def converter_names() -> list[str]:
    """The names ``grouppo data convert --from`` takes."""
    return [f.converter for f in FORMATS.values() if f.converter]


def format_of(record: Any) -> str | None:
    """The format of ``record`` (a key of ``FORMATS``), or None when it matches none."""
    if not isinstance(record, Mapping):
        return None
    for kind, fmt in FORMATS.items():
        if all(record.get(name) is not None for name in fmt.fields):
            return kind
    return None


def _fields(record: Mapping[str, Any]) -> str:
    present = [str(key) for key, value in record.items() if value is not None]
    null = [str(key) for key, value in record.items() if value is None]
    text = ", ".join(present) if present else "none"
    return text + (f" (null: {', '.join(null)})" if null else "")


def _unknown_format(record: Mapping[str, Any]) -> str:
    hints = []
    for fmt in FORMATS.values():
        if any(record.get(name) is not None for name in fmt.fields):
            missing = [name for name in fmt.fields if record.get(name) is None]
            hints.append(f"as a {fmt.name} it lacks {', '.join(map(repr, missing))}")
    accepted = "; ".join(f"{kind}: {fmt.description}" for kind, fmt in FORMATS.items())
    hint = f" ({'; '.join(hints)})" if hints else ""
    return f"unknown record format; its fields: {_fields(record)}{hint}. Accepted formats: {accepted}"


def detect_format(record: Any, *, where: Where | None = None, source: str = "data") -> str:
    """The format of one record, a key of ``FORMATS``: ``"groups"`` (has ``responses``), ``"beliefs"``
    (``beliefs``, ``distribution`` and ``belief``), ``"gdpo_release"`` (``accept_response``), ``"trl"``
    (``chosen`` and ``rejected``, with or without ``prompt``; UltraFeedback binarized's extra fields are
    kept) or ``"ultrafeedback"`` (``instruction`` and ``completions``); fields that are null count as
    absent. Otherwise DataError naming the record's fields and the accepted formats (and, with
    ``where``, the source and the record)."""
    if not isinstance(record, Mapping):
        problem = f"expected an object (a dict of fields), got {type_name(record)}"
    else:
        kind = format_of(record)
        if kind is not None:
            return kind
        problem = _unknown_format(record)
    if where is None:
        raise DataError(problem)
    raise record_error(source, where, None, problem)


def _labels(records: Sequence[Any], source: str) -> tuple[str, list[Where]]:
    source, locations = record_locations(records, source)
    if locations is None or len(locations) != len(records):
        return source, list(range(len(records)))
    return source, list(locations)


def data_format(records: Sequence[Any], *, skip_invalid: bool = False, source: str = "data") -> str:
    """The format of a data set: that of its first record (with ``skip_invalid``, of its first record of a
    known format). A record of another known format raises DataError naming it and the first record
    (a data set holds one format); records of no known format are left to the converters, which name
    what they lack."""
    source, wheres = _labels(records, source)
    kinds = [format_of(record) for record in records]
    if not records:
        raise DataError(f"{source}: no records")
    first = next((p for p, kind in enumerate(kinds) if kind is not None), None)
    if first is None or (first > 0 and not skip_invalid):
        return detect_format(records[0], where=wheres[0], source=source)  # raises: record 1 has no format
    kind = kinds[first]
    for position, other in enumerate(kinds):
        if other is not None and other != kind:
            raise record_error(
                source,
                wheres[position],
                None,
                f"a {FORMATS[other].name} (fields {_fields(records[position])}), but "
                f"{location(wheres[first])} is a {FORMATS[kind].name}: the records of a data set must share "
                "one format; split the data by format (or convert one part with `grouppo data convert`)",
            )
    return kind


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def read_group_records(
    records: Iterable[Any], *, merge_prompts: bool, skip_invalid: bool, source: str
) -> tuple[Records, str, list[str]]:
    """``to_group_records`` (see there): the groups and the line saying what was done, with the messages
    of the records that could not be converted."""
    source, locations = record_locations(records, source)
    if not isinstance(records, Records):
        items = records if isinstance(records, list) else list(records)
        records = Records(items, source=source, locations=locations)
    if not records:
        return records, f"{source}: no records", []
    kind = data_format(records, skip_invalid=skip_invalid, source=source)
    n = len(records)
    if kind == "groups":
        return records, f"{source}: read {_count(n, 'group record')}", []
    if kind in ("beliefs", "gdpo_release"):
        first = next(p for p, record in enumerate(records) if format_of(record) == kind)
        how = (
            "train on them with `grouppo gdpo` (GDPOTrainer)"
            if kind == "beliefs"
            else "convert them with `grouppo data convert --from gdpo` and train with `grouppo gdpo`"
        )
        raise record_error(
            source,
            records.locations[first] if first < len(records.locations) else first,
            None,
            f"these are {FORMATS[kind].description}: GDPO data, not group records; {how}",
        )
    options = {"merge_prompts": merge_prompts} if kind == "trl" else {}
    groups, skipped = FORMATS[kind].convert(records, skip_invalid=skip_invalid, source=source, **options)
    if kind == "trl" and merge_prompts:
        sizes = format_counts(Counter(len(group["responses"]) for group in groups))
        how = f"(merged by prompt; K: {sizes})"
    else:
        how = "of 2" if kind == "trl" else ""
    noun = "TRL pair" if kind == "trl" else "UltraFeedback row"
    what = "group" if kind == "trl" else "scored group"
    note = f"{source}: read {_count(n, noun)} as {_count(len(groups), what)} {how}".rstrip()
    if skipped:
        note += f" ({len(skipped):,} skipped: could not be converted)"
    return groups, note, skipped


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
    prompt and whose remainders are the responses. As in TRL (``maybe_extract_prompt``), a plain-text
    ``prompt`` beside full conversations gives way to the conversations' shared leading messages
    (HuggingFaceH4/ultrafeedback_binarized: ``prompt`` text, ``chosen``/``rejected`` user + assistant
    messages). A plain-text prompt with message responses otherwise raises DataError: both must be text
    or both chat messages (a message-list prompt takes text responses, as one assistant message each).

    Each pair becomes the group ``{"prompt", "responses": [chosen, rejected], "labels": [1, 0]}``, with
    ``"scores": [score_chosen, score_rejected]`` when the record has both, followed by the record's
    other fields (``messages``, ``prompt_id``, ...), kept as they are.

    With ``merge_prompts``, the pairs of one prompt (same canonical JSON) become one group, in the
    order prompts are first seen. Responses are deduplicated by canonical JSON, first seen first; one
    chosen in some pair and never rejected is positive, one rejected and never chosen negative, and one
    both chosen and rejected contradicts itself and is dropped (counted in a warning, with prompts left
    without a positive or a negative, which are dropped too). Scores are kept only when every response
    of the merged group has one consistent score; the pairs' other fields are not kept. Note that
    merging changes what is trained: all-pairs losses then compare every positive with every negative of
    the prompt, including pairs that never appeared in the data.

    Bad records raise DataError, or with ``skip_invalid`` are skipped and counted in a warning.
    """
    records = records if isinstance(records, list) else list(records)
    return _trl(records, skip_invalid=skip_invalid, source=source, merge_prompts=merge_prompts)[0]


def from_ultrafeedback(
    records: Iterable[Mapping[str, Any]], *, skip_invalid: bool = False, source: str = "data"
) -> list[dict[str, Any]]:
    """Convert raw openbmb/UltraFeedback rows to scored groups (labels come later, from a positive rule).

    ``instruction`` becomes the prompt, ``completions[*].response`` the responses and
    ``completions[*].overall_score`` their scores; the row's ``source`` is kept as ``dataset_source``.
    Completions with an empty response or a missing or non-numeric score are dropped. A row left with
    fewer than 2 completions raises DataError, or with ``skip_invalid`` is skipped and counted in a warning.
    """
    records = records if isinstance(records, list) else list(records)
    return _ultrafeedback(records, skip_invalid=skip_invalid, source=source)[0]


def from_gdpo_release(
    records: Iterable[Any],
    *,
    skip_invalid: bool = False,
    source: str = "data",
    renormalize_within: float = 0.01,
) -> list[dict[str, Any]]:
    """Convert records of the GDPO release schema (BigBinnie/GDPO) to belief records.

    Release fields: ``prompt``, ``accept_choice_id``, ``accept_choice``, ``accept_response``,
    ``reject_choice_id``, ``reject_choice``, ``reject_response``, ``probabilities`` (indexed by choice
    id), optionally ``context`` (put before the question, on its own line), ``options`` and
    ``selections``. Belief labels come from ``options`` when present, else from the choice texts seen for
    each id across the records of the same question; an id never seen keeps its number as label.
    ``rejected`` is ``reject_response``: in the release's GDPO data it keeps the chosen belief, in its DPO
    data it expresses another one; either way it does not express the chosen belief. Survey
    probabilities that sum to 1 only within ``renormalize_within`` (rounding) are renormalized; further
    off raises DataError.
    """
    return release_to_belief_records(
        records, skip_invalid=skip_invalid, source=source, renormalize_within=renormalize_within
    )[0]


def to_group_records(
    records: Iterable[Any], *, merge_prompts: bool = False, skip_invalid: bool = False, source: str = "data"
) -> tuple[list[dict[str, Any]], str]:
    """Read a data set of group records, TRL pairs or raw UltraFeedback rows as group records.

    The format comes from the first record (:func:`data_format`; a data set of mixed formats raises
    DataError naming the first record that differs). Group records pass through untouched (they are
    normalized later, ``grouppo.data.prepare_groups``); TRL pairs become groups of 2 (with
    ``merge_prompts``, one group per prompt: :func:`from_trl_pairwise`); UltraFeedback rows become
    scored groups (:func:`from_ultrafeedback`). Belief records and GDPO release records raise DataError:
    they are GDPO data (``grouppo gdpo``).

    Returns the groups (a ``grouppo.data.Records`` carrying the records' source and locations, so later
    errors still name the line) and one line saying what was done, e.g. ``"data.jsonl: read 1,000 TRL
    pairs as 412 groups (merged by prompt; K: 2: 300, 3: 112)"``. When ``records`` carry their source
    (``load_records``), it is used rather than ``source``. No records give no groups (``"... no records"``).
    """
    groups, note, _ = read_group_records(
        records, merge_prompts=merge_prompts, skip_invalid=skip_invalid, source=source
    )
    return groups, note


def convert_file(
    kind: str,
    in_path: str,
    out_path: str,
    *,
    merge_prompts: bool = False,
    skip_invalid: bool = False,
    split: str = "train",
) -> int:
    """Convert a data set of another format (``kind``: a name of ``converter_names()``) to JSON lines;
    return the count.

    "trl" and "ultrafeedback" write group records; "gdpo" (the GDPO release schema) writes belief
    records. ``merge_prompts`` applies to the "trl" converter only (see :func:`from_trl_pairwise`).

    Data of another format than ``kind`` (by :func:`data_format`) raises DataError naming the format it
    is in; so does a data set left with nothing to write. Nothing is written unless every record was
    converted (or, with ``skip_invalid``, skipped), and the output appears whole (``write_jsonl``).
    """
    formats = {f.converter: f for f in FORMATS.values() if f.converter}
    if kind not in formats:
        raise ValueError(f"unknown converter {kind!r}; expected one of {', '.join(formats)}")
    if merge_prompts and kind != "trl":
        raise ValueError(f"merge_prompts applies only to the 'trl' converter, not {kind!r}")
    options = {"merge_prompts": True} if merge_prompts else {}
    records = load_records(in_path, split=split)
    if not records:
        raise DataError(f"{in_path}: no records to convert")
    found = FORMATS[data_format(records, skip_invalid=skip_invalid, source=in_path)]
    if found is not formats[kind]:
        advice = f"convert it with --from {found.converter}" if found.converter else "it needs no conversion"
        raise DataError(f"{in_path}: holds {found.description}, not {formats[kind].description}; {advice}")
    groups, _ = found.convert(records, skip_invalid=skip_invalid, source=in_path, **options)
    if not groups:
        raise DataError(f"{in_path}: nothing to write: none of its {len(records)} records could be converted")
    return write_jsonl(groups, out_path)


def _belief_stats(records: Records, *, skip_invalid: bool, note: str) -> BeliefStats:
    kept, skipped = validate_each(
        records,
        normalize_belief_record,
        skip_invalid=skip_invalid,
        source=records.source or "data",
        what="invalid belief records",
    )
    questions = {
        json.dumps(r.get("question_id", r["prompt"]), sort_keys=True, ensure_ascii=False) for r in kept
    }
    return BeliefStats(
        records=len(records),
        kept=len(kept),
        skipped=len(skipped),
        questions=len(questions),
        belief_counts=Counter(len(r["beliefs"]) for r in kept),
        populations=Counter(str(r["population"]) for r in kept if r.get("population") is not None),
        skip_reasons=skipped[:MAX_SKIP_REASONS],
        note=note,
    )


def validate_file(
    path_or_name: str,
    *,
    positive_rule: str = "top_bottom",
    skip_invalid: bool = False,
    split: str = "train",
    merge_prompts: bool = False,
    config_name: str | None = None,
) -> GroupStats | BeliefStats:
    """Load and check a data set without training on it, and report what it holds.

    Group data in any format ``grouppo.convert.to_group_records`` reads (group records, TRL pairs,
    UltraFeedback) is converted and normalized: a :class:`GroupStats`, whose ``note`` says how the records
    were read. Belief records (and the GDPO release's records, converted) are validated as GDPO data: a
    :class:`BeliefStats` (count, questions, K, populations). In both, ``kept == 0`` (``usable`` False)
    means nothing can be trained on, and ``summary()`` says so. Bad records raise DataError, or with
    ``skip_invalid`` are counted, their first messages kept.
    """
    require_rule(positive_rule)
    records = load_records(path_or_name, split=split, config_name=config_name)
    source = records.source or path_or_name
    if not records:
        return GroupStats(note=f"{source}: no records")
    kind = data_format(records, skip_invalid=skip_invalid, source=source)
    if kind == "beliefs":
        return _belief_stats(
            records, skip_invalid=skip_invalid, note=f"{source}: {len(records):,} belief records"
        )
    if kind == "gdpo_release":
        converted, release_skipped = release_to_belief_records(
            records, skip_invalid=skip_invalid, source=source
        )
        stats = _belief_stats(
            converted,
            skip_invalid=skip_invalid,
            note=f"{source}: read {len(records):,} GDPO release records as {len(converted):,} belief records",
        )
        stats.records, stats.skipped = len(records), stats.skipped + len(release_skipped)
        stats.skip_reasons = (release_skipped + stats.skip_reasons)[:MAX_SKIP_REASONS]
        return stats
    groups, note, conversion_skipped = read_group_records(
        records, merge_prompts=merge_prompts, skip_invalid=skip_invalid, source=source
    )
    _, stats = prepare_groups(groups, positive_rule=positive_rule, skip_invalid=skip_invalid, source=source)
    reasons = conversion_skipped + stats.skip_reasons
    stats.note = note
    stats.records = len(records)
    stats.skipped += len(conversion_skipped)
    stats.skip_reasons = reasons[:MAX_SKIP_REASONS]
    return stats


