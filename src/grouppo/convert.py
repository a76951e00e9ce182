"""Converters from other data formats to grouppo's schemas (``grouppo.data``).

- ``trl``: TRL preference pairs (plain, conversational, implicit prompt; UltraFeedback binarized) to
  group records, one group per pair or, with ``merge_prompts``, one per prompt;
- ``ultrafeedback``: raw openbmb/UltraFeedback rows to scored group records;
- ``gdpo``: the GDPO release schema (BigBinnie/GDPO) to belief records.

Every converter raises DataError naming the source, the record and the field, or with ``skip_invalid``
skips and counts bad records.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from grouppo.data import (
    CONTENT_ACCEPTS,
    common_prefix,
    content_problem,
    is_conversational,
    is_number,
    load_records,
    normalize_belief_record,
    record_error,
    require_object,
    score_problem,
    type_name,
    validate_each,
    write_jsonl,
)

logger = logging.getLogger(__name__)

UNCONVERTED = "records that could not be converted"


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _trl_pair(record: Any, index: int, source: str) -> dict[str, Any]:
    record = require_object(record, index, source)
    for name in ("chosen", "rejected"):
        problem = content_problem(record.get(name))
        if problem is not None:
            raise record_error(source, index, name, problem)
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = record.get("prompt")
    if prompt is None:
        # TRL's implicit-prompt format: full conversations whose shared leading messages are the prompt.
        if not (is_conversational(chosen) and is_conversational(rejected)):
            raise record_error(
                source,
                index,
                "prompt",
                f"missing; expected {CONTENT_ACCEPTS}, or 'chosen' and 'rejected' as full conversations "
                "(lists of messages) that start with the same prompt messages",
            )
        shared = common_prefix(chosen, rejected)
        if shared == 0:
            raise record_error(
                source,
                index,
                "prompt",
                "missing, and 'chosen' and 'rejected' share no leading messages to take it from; "
                "expected a 'prompt' field, or conversations that start with the same prompt messages",
            )
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        for name, rest in (("chosen", chosen), ("rejected", rejected)):
            if not rest:
                raise record_error(
                    source,
                    index,
                    name,
                    f"nothing remains after the {shared} messages it shares with the other conversation; "
                    "expected the conversation to continue with the response after the shared prompt",
                )
    else:
        problem = content_problem(prompt)
        if problem is not None:
            raise record_error(source, index, "prompt", problem)
    group: dict[str, Any] = {"prompt": prompt, "responses": [chosen, rejected]}
    if record.get("score_chosen") is not None and record.get("score_rejected") is not None:
        for name in ("score_chosen", "score_rejected"):
            problem = score_problem(record[name])
            if problem is not None:
                raise record_error(source, index, name, problem)
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
    pairs, _ = validate_each(records, _trl_pair, skip_invalid=skip_invalid, source=source, what=UNCONVERTED)
    return _merge_by_prompt(pairs, source) if merge_prompts else pairs


def _ultrafeedback_group(row: Any, index: int, source: str) -> dict[str, Any]:
    row = require_object(row, index, source)
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise record_error(
            source, index, "instruction", f"got {type_name(instruction)}; expected a non-empty string"
        )
    completions = row.get("completions")
    if not isinstance(completions, list):
        raise record_error(
            source, index, "completions", f"got {type_name(completions)}; expected a list of completions"
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
    groups, _ = validate_each(
        records, _ultrafeedback_group, skip_invalid=skip_invalid, source=source, what=UNCONVERTED
    )
    return groups


RELEASE_FIELDS = ("prompt", "accept_choice_id", "accept_response", "reject_response", "probabilities")


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
    records = list(records)  # read twice: belief labels first, then the records
    labels: dict[str, dict[int, str]] = defaultdict(dict)
    for record in records:  # belief labels seen per question, from every record that has the fields
        if isinstance(record, Mapping) and all(record.get(name) is not None for name in RELEASE_FIELDS):
            for side in ("accept", "reject"):
                choice, text = record.get(f"{side}_choice_id"), record.get(f"{side}_choice")
                if isinstance(choice, int) and isinstance(text, str) and text.strip():
                    labels[_release_prompt(record)].setdefault(choice, text.strip())

    def convert(record: Any, index: int, source: str) -> dict[str, Any]:
        record = require_object(record, index, source)
        for name in RELEASE_FIELDS:
            if record.get(name) is None:
                raise record_error(source, index, name, "missing; the GDPO release schema needs it")
        return _release_record(record, index, source, labels[_release_prompt(record)], renormalize_within)

    out, _ = validate_each(records, convert, skip_invalid=skip_invalid, source=source, what=UNCONVERTED)
    return out


def _release_prompt(record: Mapping[str, Any]) -> str:
    context = record.get("context")
    return (
        f"{context.strip()}\n{record['prompt']}"
        if isinstance(context, str) and context.strip()
        else record["prompt"]
    )


def _release_record(
    record: Mapping[str, Any], index: int, source: str, seen: dict[int, str], within: float
) -> dict[str, Any]:
    probabilities = record["probabilities"]
    if not isinstance(probabilities, list) or not all(is_number(p) and p >= 0 for p in probabilities):
        raise record_error(source, index, "probabilities", "expected a list of numbers >= 0")
    total = math.fsum(probabilities)
    if abs(total - 1.0) > within:
        raise record_error(
            source, index, "probabilities", f"sums to {total:.6g}; expected 1 (within {within:g})"
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
    return normalize_belief_record({**converted, **extra}, index, source)


CONVERTERS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "gdpo": from_gdpo_release,
    "trl": from_trl_pairwise,
    "ultrafeedback": from_ultrafeedback,
}


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
    records. ``merge_prompts`` applies to the "trl" converter only (see :func:`from_trl_pairwise`).
    """
    if kind not in CONVERTERS:
        raise ValueError(f"unknown converter {kind!r}; expected one of {', '.join(CONVERTERS)}")
    if merge_prompts and kind != "trl":
        raise ValueError(f"merge_prompts applies only to the 'trl' converter, not {kind!r}")
    options = {"merge_prompts": True} if merge_prompts else {}
    records = load_records(in_path, split=split)
    groups = CONVERTERS[kind](records, skip_invalid=skip_invalid, source=in_path, **options)
    return write_jsonl(groups, out_path)
