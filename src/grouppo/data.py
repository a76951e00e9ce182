"""Records: grouppo's data schemas and their validation.

A group record holds one prompt and K >= 2 responses to it::

    {"prompt": "...", "responses": ["...", "...", ...], "scores": [7.5, 3.0, ...], "labels": [1, 0, ...]}

- ``prompt``: a non-empty string, or a non-empty list of chat messages ``{"role": ..., "content": ...}``.
- ``responses``: K >= 2 items, each a non-empty string or a non-empty list of messages
  (``[{"role": "assistant", "content": "..."}]``). K may differ between records.
- ``scores``: optional, K finite numbers (a reward per response).
- ``labels``: optional, K values 1 (positive) or 0 (negative); true/false are accepted too.

At least one of ``scores`` and ``labels`` is required: labels given are used as they are, otherwise a
positive rule (:func:`labels_from_scores`) reads them from the scores. Other fields are carried along.

Belief records, GDPO's data (one belief-conditioned preference pair each), are validated here too
(:func:`normalize_belief_record`); see that function for their schema.

Records read from files (``grouppo.load``) are :class:`Records` that remember where each record came
from, so that every error reads ``"{file}: line 7: field 'scores': ..."``. Other formats (TRL pairs,
UltraFeedback, the GDPO release) are detected and converted to these schemas in ``grouppo.convert``.

One concern, what a valid record is, hence the file's size: three schemas (groups, beliefs, prompts),
the positive rules, and the counts and messages of what validation kept and skipped.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

POSITIVE_RULES: tuple[str, ...] = ("top_bottom", "best_vs_rest", "above_mean", "best_vs_worst")

CANONICAL_FIELDS: tuple[str, ...] = ("prompt", "responses", "scores", "labels")

MAX_SKIP_REASONS = 10

FLOAT32_MAX = 3.4028234663852886e38

CONTENT_ACCEPTS = (
    "a non-empty string or a non-empty list of messages, each a dict with string 'role' and 'content'"
)


class DataError(ValueError):
    """Bad input data; the message names the source, the record (its line or 1-based number) and the field."""


class Records(list):
    """Records as plain dicts, with where they came from: ``source`` (the path or name as given) and
    ``locations``, one label per record (``"line 7"`` for JSON lines, ``"record 3"`` otherwise, 1-based).

    :func:`validate_each` (so every validator and converter) names records by these labels.
    """

    def __init__(
        self, items: Iterable[Any] = (), *, source: str | None = None, locations: Iterable[str] | None = None
    ) -> None:
        super().__init__(items)
        self.source = source
        self.locations = (
            [f"record {position + 1}" for position in range(len(self))]
            if locations is None
            else list(locations)
        )


Where = int | str
"""Which record a problem is in: a 0-based position (printed ``record N``, 1-based) or a location label."""


def location(where: Where) -> str:
    """The label of a record: a location string as it is, a 0-based position as ``"record N"`` (1-based)."""
    return where if isinstance(where, str) else f"record {where + 1}"


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def record_error(source: str, where: Where, field_name: str | None, problem: str) -> DataError:
    """``"{source}: {location}: field '{field_name}': {problem}"`` (``where``: see :func:`location`)."""
    text = f"{source}: {location(where)}"
    if field_name is not None:
        text += f": field {field_name!r}"
    return DataError(f"{text}: {problem}")


def require_object(record: Any, where: Where, source: str) -> Mapping[str, Any]:
    if not isinstance(record, Mapping):
        raise record_error(
            source, where, None, f"expected an object (a dict of fields), got {type_name(record)}"
        )
    return record


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def score_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable score, or None when it is one."""
    if not is_number(value):
        return f"got {type_name(value)}; expected a finite number"
    if not math.isfinite(value):
        return f"got {value}; expected a finite number"
    if abs(value) > FLOAT32_MAX:  # training reads scores as float32: larger ones become infinite there
        return f"got {value}; expected a finite number within float32's range (|x| <= {FLOAT32_MAX:.4g})"
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


def content_problem(value: Any) -> str | None:
    """Why ``value`` is neither a non-empty string nor a list of messages, or None when it is one of them."""
    if value is None:
        return f"missing or null; expected {CONTENT_ACCEPTS}"
    if isinstance(value, str):
        return None if value.strip() else f"got an empty string; expected {CONTENT_ACCEPTS}"
    if not isinstance(value, list):
        return f"got {type_name(value)}; expected {CONTENT_ACCEPTS}"
    if not value:
        return f"got an empty list; expected {CONTENT_ACCEPTS}"
    for position, message in enumerate(value):
        if not isinstance(message, Mapping):
            return f"message {position} is a {type_name(message)}; expected {CONTENT_ACCEPTS}"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                return f"message {position} has no string {key!r}; expected {CONTENT_ACCEPTS}"
    return None


def require_rule(rule: str) -> None:
    if rule not in POSITIVE_RULES:
        raise ValueError(f"unknown positive rule {rule!r}; expected one of {', '.join(POSITIVE_RULES)}")


def labels_from_scores(scores: Sequence[float], rule: str) -> list[int | None]:
    """Label the responses of one group from their scores: 1 = positive, 0 = negative, None = dropped.

    Rules (``POSITIVE_RULES``):

    - ``top_bottom`` (GroupDPO's offline rule, the default): rank the responses by score, highest first.
      The top floor(K/2) are positive and the bottom floor(K/2) negative; for odd K the single
      middle-ranked response is dropped. Where a positive would score the same as a negative (a tie
      across the cut, common with rewards of few values), the halves would contrast equally scored
      responses; the cut moves instead to the score boundary nearest the middle, so that every
      positive scores above every negative. When the two nearest boundaries are equally far, the
      tied run between them is dropped. Examples: ``[1, 1, 1, 1, 1, 0, 0, 0]`` gives five positives
      and three negatives, not a 1 labelled negative; ``[1, .5, .5, .5, .5, .5, .5, 0]`` one and one.
    - ``best_vs_rest``: every response whose score equals the maximum is positive, all others negative.
    - ``above_mean``: a score strictly above the group's mean is positive, any other negative.
    - ``best_vs_worst``: the first response with the maximal score is positive, the first with the
      minimal score negative, all others dropped (the classic best-vs-worst DPO pair).

    When all scores are equal (or there are none) no preference can be read from them, under any rule:
    every response is None. Otherwise every rule gives at least one positive and one negative.

    Raises ValueError for a rule not in ``POSITIVE_RULES``.
    """
    require_rule(rule)
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
    order = sorted(range(len(values)), key=lambda position: -values[position])
    ranked = [values[position] for position in order]
    k, half = len(values), len(values) // 2
    if ranked[half - 1] > ranked[k - half]:  # the paper's halves: no tie across the cut
        for position in order[:half]:
            labels[position] = 1
        for position in order[k - half :]:
            labels[position] = 0
        return labels
    # The middle falls inside a run of tied scores. Cut instead at the score boundary nearest the
    # middle (one exists, since not all scores are equal); cut c makes the first c ranked positive.
    cuts = [c for c in range(1, k) if ranked[c - 1] > ranked[c]]
    nearest = min(abs(c - k / 2) for c in cuts)
    chosen = [c for c in cuts if abs(c - k / 2) == nearest]  # two when equally far: drop the run between
    positive_floor, negative_ceiling = ranked[min(chosen) - 1], ranked[max(chosen)]
    return [1 if score >= positive_floor else 0 if score <= negative_ceiling else None for score in values]


def _check_scores(value: Any, k: int, where: Where, source: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != k:
        got = len(value) if isinstance(value, (list, tuple)) else type_name(value)
        raise record_error(source, where, "scores", f"expected {k} numbers (one per response), got {got}")
    for position, score in enumerate(value):
        problem = score_problem(score)
        if problem is not None:
            raise record_error(source, where, "scores", f"score {position}: {problem}")
    return [float(score) for score in value]


def _check_labels(value: Any, k: int, where: Where, source: str) -> list[int]:
    accepts = "1 (positive) or 0 (negative), or true/false"
    if not isinstance(value, (list, tuple)) or len(value) != k:
        got = len(value) if isinstance(value, (list, tuple)) else type_name(value)
        raise record_error(
            source, where, "labels", f"expected {k} labels (one per response, each {accepts}), got {got}"
        )
    for position, label in enumerate(value):
        if not (isinstance(label, numbers.Integral) and label in (0, 1)):
            raise record_error(source, where, "labels", f"label {position} is {label!r}; expected {accepts}")
    return [int(label) for label in value]


def normalize_record(
    record: Mapping[str, Any], index: Where, *, positive_rule: str = "top_bottom", source: str = "data"
) -> dict[str, Any]:
    """Validate one group record and return it in canonical form, as a new dict.

    The result has ``prompt``, ``responses``, ``scores`` (floats, or None when the record has none) and
    ``labels`` (ints 1/0), followed by the record's other fields, untouched. Labels given are used as
    they are (scores given beside them are kept, for score-based losses). Without labels they come from
    ``labels_from_scores(scores, positive_rule)``, and the responses it drops leave with their scores.

    The prompt and the responses must be of one kind: with a plain-text prompt every response is text
    (tokenization appends a text response to the prompt's text); with a chat prompt (a message list) a
    response is a message list, or text, taken as one assistant message.

    ``index`` (a 0-based position, printed 1-based as ``record N``, or a location label such as
    ``"line 7"``) and ``source`` (a file or dataset name) only serve the error messages: every problem
    raises DataError naming the source, the record, the field and what would be accepted.
    """
    where = index
    require_rule(positive_rule)
    record = require_object(record, where, source)
    problem = content_problem(record.get("prompt"))
    if problem is not None:
        raise record_error(source, where, "prompt", problem)
    responses = record.get("responses")
    if not isinstance(responses, (list, tuple)) or len(responses) < 2:
        got = f"{len(responses)}" if isinstance(responses, (list, tuple)) else type_name(responses)
        raise record_error(source, where, "responses", f"expected a list of at least 2 responses, got {got}")
    for position, response in enumerate(responses):
        problem = content_problem(response)
        if problem is not None:
            raise record_error(source, where, "responses", f"response {position}: {problem}")
    if isinstance(record["prompt"], str):
        for position, response in enumerate(responses):
            if not isinstance(response, str):
                raise record_error(
                    source,
                    where,
                    "responses",
                    f"response {position} is a list of chat messages but 'prompt' is plain text; both must "
                    "be text or both chat messages (write the prompt as messages, e.g. "
                    '[{"role": "user", "content": ...}], or each response as text)',
                )
    k = len(responses)
    scores = None if record.get("scores") is None else _check_scores(record["scores"], k, where, source)
    if record.get("labels") is not None:
        labels: list[int | None] = [*_check_labels(record["labels"], k, where, source)]
    elif scores is not None:
        labels = labels_from_scores(scores, positive_rule)
        if all(label is None for label in labels):
            raise record_error(
                source,
                where,
                "scores",
                f"all {k} scores are equal ({scores[0]:g}), so they express no preference; "
                "expected at least two different scores, or 'labels'",
            )
    else:
        raise record_error(
            source,
            where,
            "labels",
            "both 'labels' and 'scores' are missing; expected 'labels' (1 or 0 per response), "
            "'scores' (one number per response), or both",
        )
    kept = [position for position, label in enumerate(labels) if label is not None]
    positives = sum(1 for position in kept if labels[position] == 1)
    negatives = len(kept) - positives
    if positives == 0 or negatives == 0:
        raise record_error(
            source,
            where,
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


def format_counts(counts: Counter[Any]) -> str:
    return ", ".join(f"{value}: {count}" for value, count in sorted(counts.items())) or "none"


@dataclass
class DataStats:
    """What a check of a data set saw: record counts, the first skip reasons, and how it was read
    (``note``, e.g. converted from TRL pairs). ``kept == 0`` means nothing can be trained on, and
    ``summary()`` then says so on its last line."""

    records: int = 0
    kept: int = 0
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def usable(self) -> bool:
        """Whether at least one record can be trained on."""
        return self.kept > 0

    def facts(self) -> list[str]:
        """The report's lines between the note and the skip reasons."""
        return [f"records read: {self.records}", f"kept: {self.kept}", f"records skipped: {self.skipped}"]

    def summary(self) -> str:
        """A human-readable report, one fact per line; distributions read ``value: count``."""
        lines = ([self.note] if self.note else []) + self.facts()
        if self.skip_reasons:
            lines.append(f"skip reasons (first {len(self.skip_reasons)} of {self.skipped}):")
            lines.extend(f"  {reason}" for reason in self.skip_reasons)
        if not self.kept and (self.records or self.note):
            lines.append(
                "nothing usable: the data holds no records"
                if self.records == 0
                else f"nothing usable: none of the {self.records} records is valid (see the skip reasons)"
            )
        return "\n".join(lines)


@dataclass
class GroupStats(DataStats):
    """What :func:`prepare_groups` saw: record counts and the shape of the groups it kept."""

    group_sizes: Counter[int] = field(default_factory=Counter)
    positives: Counter[int] = field(default_factory=Counter)
    negatives: Counter[int] = field(default_factory=Counter)

    def facts(self) -> list[str]:
        return [
            f"records read: {self.records}",
            f"groups kept: {self.kept}",
            f"records skipped: {self.skipped}",
            f"group size K (K: groups): {format_counts(self.group_sizes)}",
            f"positives per group (|P|: groups): {format_counts(self.positives)}",
            f"negatives per group (|N|: groups): {format_counts(self.negatives)}",
        ]


@dataclass
class BeliefStats(DataStats):
    """What ``grouppo.convert.validate_file`` saw in belief records (GDPO's data).

    ``questions`` counts distinct ``question_id`` values (distinct prompts where records have none);
    ``belief_counts`` is K (the number of beliefs) per record, ``populations`` the records per
    ``population`` field value.
    """

    questions: int = 0
    belief_counts: Counter[int] = field(default_factory=Counter)
    populations: Counter[str] = field(default_factory=Counter)

    def facts(self) -> list[str]:
        populations = (
            f"{len(self.populations)} ({format_counts(self.populations)})"
            if self.populations
            else "none named (no 'population' field)"
        )
        return [
            f"belief records read: {self.records}",
            f"belief records kept: {self.kept}",
            f"records skipped: {self.skipped}",
            f"questions: {self.questions}",
            f"beliefs per record K (K: records): {format_counts(self.belief_counts)}",
            f"populations (population: records): {populations}",
        ]


def record_locations(records: Any, source: str) -> tuple[str, list[str] | None]:
    """The source and location labels ``records`` carry (a :class:`Records`), else ``source`` and None."""
    carried = getattr(records, "source", None)
    locations = getattr(records, "locations", None)
    if not isinstance(locations, list) or not all(isinstance(label, str) for label in locations):
        locations = None
    return (carried if isinstance(carried, str) and carried else source), locations


def validate_each(
    records: Iterable[Any],
    check: Callable[[Any, Where, str], dict[str, Any]],
    *,
    skip_invalid: bool,
    source: str,
    what: str = "invalid records",
) -> tuple[Records, list[str]]:
    """``check(record, where, source)`` on every record: the results, and the messages of those skipped.

    When ``records`` carry their source and locations (:class:`Records`, as :func:`load_records` returns
    them), ``where`` is the record's label (``"line 7"``) and ``source`` theirs; otherwise ``source`` is
    the argument and ``where`` the 0-based position (printed ``record N``, 1-based). The results come as
    :class:`Records` holding the labels of the records they came from.

    A DataError raises at once by default; with ``skip_invalid`` the record is skipped, its message kept,
    and one warning counts them all (``"{source}: skipped N of M {what} (first: ...)"``).
    """
    source, locations = record_locations(records, source)
    kept: list[dict[str, Any]] = []
    kept_locations: list[str] = []
    skipped: list[str] = []
    for position, record in enumerate(records):
        where: Where = (
            locations[position] if locations is not None and position < len(locations) else position
        )
        try:
            kept.append(check(record, where, source))
        except DataError as error:
            if not skip_invalid:
                raise
            skipped.append(str(error))
        else:
            kept_locations.append(location(where))
    if skipped:
        logger.warning(
            "%s: skipped %d of %d %s (first: %s)",
            source,
            len(skipped),
            len(kept) + len(skipped),
            what,
            skipped[0],
        )
    return Records(kept, source=source, locations=kept_locations), skipped


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
    require_rule(positive_rule)

    def check(record: Any, where: Where, source: str) -> dict[str, Any]:
        return normalize_record(record, where, positive_rule=positive_rule, source=source)

    groups, skipped = validate_each(records, check, skip_invalid=skip_invalid, source=source)
    stats = GroupStats(
        records=len(groups) + len(skipped),
        kept=len(groups),
        skipped=len(skipped),
        skip_reasons=skipped[:MAX_SKIP_REASONS],
    )
    for group in groups:
        stats.group_sizes[len(group["labels"])] += 1
        stats.positives[sum(group["labels"])] += 1
        stats.negatives[len(group["labels"]) - sum(group["labels"])] += 1
    return groups, stats


# ---------------------------------------------------------------------------------------------- beliefs
DISTRIBUTION_TOLERANCE = 1e-6


def normalize_belief_record(record: Any, index: Where, source: str = "data") -> dict[str, Any]:
    """Validate one belief record; return a copy with ``distribution`` as floats and ``belief`` an int.

    A belief record (GDPO's data, one per belief-conditioned preference pair)::

        {"prompt": "...",                       # a string or a list of chat messages
         "beliefs": ["Agree", "Disagree", ...],  # K >= 2 belief labels as text (any number of tokens)
         "distribution": [0.6, 0.3, ...],        # the population's belief distribution, sums to 1
         "belief": 0,                            # index into beliefs: the belief of the pair
         "chosen": "...", "rejected": "..."}     # answers that do / do not express that belief

    Other fields (``population``, ``question_id``, ...) are kept. Records sharing a prompt should share
    ``beliefs`` and ``distribution``; nothing requires it. Every problem raises DataError naming the
    source, the record (0-based) and the field.
    """
    record = require_object(record, index, source)
    for name in ("prompt", "chosen", "rejected"):
        problem = content_problem(record.get(name))
        if problem is not None:
            raise record_error(source, index, name, problem)
    for name in ("chosen", "rejected"):
        if not isinstance(record[name], str):
            raise record_error(source, index, name, "expected a string (the answer after the belief prefix)")
    beliefs = record.get("beliefs")
    if not isinstance(beliefs, list) or len(beliefs) < 2:
        got = len(beliefs) if isinstance(beliefs, list) else type(beliefs).__name__
        raise record_error(
            source, index, "beliefs", f"expected a list of at least 2 belief labels, got {got}"
        )
    for position, label in enumerate(beliefs):
        if not isinstance(label, str) or not label.strip():
            raise record_error(
                source, index, "beliefs", f"label {position} is not a non-empty string: {label!r}"
            )
    if len(set(beliefs)) != len(beliefs):
        raise record_error(source, index, "beliefs", f"labels repeat: {beliefs}")
    k = len(beliefs)
    distribution = record.get("distribution")
    if not isinstance(distribution, list) or len(distribution) != k:
        got = len(distribution) if isinstance(distribution, list) else type(distribution).__name__
        raise record_error(source, index, "distribution", f"expected {k} numbers (one per belief), got {got}")
    for position, value in enumerate(distribution):
        if not is_number(value) or not math.isfinite(value) or value < 0:
            raise record_error(
                source, index, "distribution", f"entry {position} is {value!r}; expected a number >= 0"
            )
    total = math.fsum(distribution)
    if abs(total - 1.0) > DISTRIBUTION_TOLERANCE:
        raise record_error(
            source,
            index,
            "distribution",
            f"sums to {total:.9g}; expected 1 within {DISTRIBUTION_TOLERANCE:g}",
        )
    belief = record.get("belief")
    if not isinstance(belief, int) or isinstance(belief, bool) or not 0 <= belief < k:
        raise record_error(
            source, index, "belief", f"got {belief!r}; expected an index into beliefs (0 to {k - 1})"
        )
    return {**record, "distribution": [float(v) for v in distribution], "belief": belief}


def prepare_belief_records(
    records: Iterable[Any], *, skip_invalid: bool = False, source: str = "data"
) -> list[dict[str, Any]]:
    """Validate belief records; bad ones raise DataError, or with ``skip_invalid`` are skipped and counted."""
    out, _ = validate_each(
        records,
        normalize_belief_record,
        skip_invalid=skip_invalid,
        source=source,
        what="invalid belief records",
    )
    if not out:
        raise DataError(f"{source}: no valid belief record")
    return out


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items ``a`` and ``b`` share (token ids, or the messages of two conversations)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prepare_prompt_records(
    records: Sequence[Any], source: str = "prompts", limit: int | None = None
) -> list[dict[str, Any]]:
    """The first ``limit`` prompt records (online training, ``grouppo sample``), checked: each is an
    object with a ``prompt`` (non-empty text or chat messages); a DataError names the record (its line in
    a JSON lines file). The other fields (what the rewards read) are kept as they are."""
    source, locations = record_locations(records, source)
    if not records:
        raise DataError(f"{source}: no prompt records")
    kept = records if limit is None else records[:limit]
    for index, record in enumerate(kept):
        where = locations[index] if locations else index
        record = require_object(record, where, source)
        prompt = record.get("prompt")
        if not prompt or not isinstance(prompt, str | list):
            raise record_error(
                source, where, "prompt", f"expected non-empty text or chat messages, got {prompt!r:.80}"
            )
    return [dict(record) for record in kept]
