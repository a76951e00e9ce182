"""Belief records for GDPO: schema, validation, the GDPO release converter and tokenization.

A belief record (one per belief-conditioned preference pair)::

    {"prompt": "...",                       # a string or a list of chat messages
     "beliefs": ["Agree", "Disagree", ...],  # K >= 2 belief labels as text (any number of tokens)
     "distribution": [0.6, 0.3, ...],        # the population's belief distribution, sums to 1
     "belief": 0,                            # index into beliefs: the belief of the pair
     "chosen": "...", "rejected": "..."}     # responses that do / do not express that belief

Other fields (``population``, ``question_id``, ...) are kept. Records sharing a prompt should share
``beliefs`` and ``distribution``; nothing requires it.

The belief is written at the start of the response through ``belief_template`` (``"{belief}"`` is the
label), then the answer follows: ``"[Belief: Agree]\\n" + chosen``. ``tokenize_belief_record`` lays a
record out as one *group* for ``grouppo.logps``: its prompt once, then K belief rows (the prefix of each
belief, for the calibration term), the chosen and the rejected rows (prefix of ``belief`` + answer), and,
in the single-token calibration form, one more row for the belief NLL. A per-token ``score_mask`` says
which response tokens each row's log-prob sums over, so the calibration, preference and belief-NLL
terms all come out of one prompt pass and one decoupled backward. ``pack_belief_rows`` merges the
records of one prompt and population into one group, so the prompt and the K belief rows are scored
once for all of that question's pairs.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from grouppo.collate import common_prefix
from grouppo.data import DataError, _content_problem, _error, _is_number, _require_object, is_conversational
from grouppo.generation import prompt_token_ids

logger = logging.getLogger(__name__)

DEFAULT_BELIEF_TEMPLATE = "[Belief: {belief}]\n"
DISTRIBUTION_TOLERANCE = 1e-6
# Row roles inside a tokenized belief group.
BELIEF_ROW, CHOSEN_ROW, REJECTED_ROW, NLL_ROW = 0, 1, 2, 3
CALIBRATION_FORMS = ("renormalized", "single_token")


def normalize_belief_record(record: Any, index: int, source: str = "data") -> dict[str, Any]:
    """Validate one belief record; return a copy with ``distribution`` as floats and ``belief`` an int.

    Every problem raises DataError naming the source, the record (0-based) and the field.
    """
    record = _require_object(record, index, source)
    for name in ("prompt", "chosen", "rejected"):
        problem = _content_problem(record.get(name))
        if problem is not None:
            raise _error(source, index, name, problem)
    for name in ("chosen", "rejected"):
        if not isinstance(record[name], str):
            raise _error(source, index, name, "expected a string (the answer after the belief prefix)")
    beliefs = record.get("beliefs")
    if not isinstance(beliefs, list) or len(beliefs) < 2:
        got = len(beliefs) if isinstance(beliefs, list) else type(beliefs).__name__
        raise _error(source, index, "beliefs", f"expected a list of at least 2 belief labels, got {got}")
    for position, label in enumerate(beliefs):
        if not isinstance(label, str) or not label.strip():
            raise _error(source, index, "beliefs", f"label {position} is not a non-empty string: {label!r}")
    if len(set(beliefs)) != len(beliefs):
        raise _error(source, index, "beliefs", f"labels repeat: {beliefs}")
    k = len(beliefs)
    distribution = record.get("distribution")
    if not isinstance(distribution, list) or len(distribution) != k:
        got = len(distribution) if isinstance(distribution, list) else type(distribution).__name__
        raise _error(source, index, "distribution", f"expected {k} numbers (one per belief), got {got}")
    for position, value in enumerate(distribution):
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise _error(
                source, index, "distribution", f"entry {position} is {value!r}; expected a number >= 0"
            )
    total = math.fsum(distribution)
    if abs(total - 1.0) > DISTRIBUTION_TOLERANCE:
        raise _error(
            source,
            index,
            "distribution",
            f"sums to {total:.9g}; expected 1 within {DISTRIBUTION_TOLERANCE:g}",
        )
    belief = record.get("belief")
    if not isinstance(belief, int) or isinstance(belief, bool) or not 0 <= belief < k:
        raise _error(
            source, index, "belief", f"got {belief!r}; expected an index into beliefs (0 to {k - 1})"
        )
    return {**record, "distribution": [float(v) for v in distribution], "belief": belief}


def prepare_belief_records(
    records: Iterable[Any], *, skip_invalid: bool = False, source: str = "data"
) -> list[dict[str, Any]]:
    """Validate belief records; bad ones raise DataError, or with ``skip_invalid`` are skipped and counted."""
    out, skipped = [], []
    for index, record in enumerate(records):
        try:
            out.append(normalize_belief_record(record, index, source))
        except DataError as error:
            if not skip_invalid:
                raise
            skipped.append(str(error))
    if skipped:
        logger.warning("%s: skipped %d invalid belief records (first: %s)", source, len(skipped), skipped[0])
    if not out:
        raise DataError(f"{source}: no valid belief record")
    return out


# ---------------------------------------------------------------------------------------------- converter
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
    rows: list[tuple[int, Mapping[str, Any]]] = []
    labels: dict[str, dict[int, str]] = defaultdict(dict)
    for index, record in enumerate(records):
        try:
            record = _require_object(record, index, source)
            for name in RELEASE_FIELDS:
                if record.get(name) is None:
                    raise _error(source, index, name, "missing; the GDPO release schema needs it")
            prompt = _release_prompt(record)
            for side in ("accept", "reject"):
                choice, text = record.get(f"{side}_choice_id"), record.get(f"{side}_choice")
                if isinstance(choice, int) and isinstance(text, str) and text.strip():
                    labels[prompt].setdefault(choice, text.strip())
            rows.append((index, record))
        except DataError:
            if not skip_invalid:
                raise
    out = []
    for index, record in rows:
        try:
            out.append(
                _release_record(record, index, source, labels[_release_prompt(record)], renormalize_within)
            )
        except DataError as error:
            if not skip_invalid:
                raise
            logger.warning("%s", error)
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
    if not isinstance(probabilities, list) or not all(_is_number(p) and p >= 0 for p in probabilities):
        raise _error(source, index, "probabilities", "expected a list of numbers >= 0")
    total = math.fsum(probabilities)
    if abs(total - 1.0) > within:
        raise _error(source, index, "probabilities", f"sums to {total:.6g}; expected 1 (within {within:g})")
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


# ---------------------------------------------------------------------------------------------- tokens
def belief_prefix(template: str, label: str) -> str:
    """The text that opens a response holding belief ``label``."""
    if "{belief}" not in template:
        raise ValueError(f"belief_template must contain '{{belief}}', got {template!r}")
    return template.replace("{belief}", label)


def prefix_ids(tokenizer: PreTrainedTokenizerBase, prompt: Any, text: str, eos: bool) -> list[int]:
    """Token ids of ``prompt`` followed by the response text ``text``; ``eos`` closes the response
    (end of turn for chat prompts, EOS for plain text), else it stays open for more tokens."""
    if is_conversational(prompt):
        messages = [*prompt, {"role": "assistant", "content": text}]
        ids = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, continue_final_message=not eos
        )["input_ids"]
        return list(ids)
    if eos and not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return list(tokenizer(text=prompt + text)["input_ids"])


def belief_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: Any, beliefs: list[str], template: str
) -> tuple[list[int], list[list[int]]]:
    """Token ids of the prompt and of each belief's prefix after it (for calibration and sampling).

    The prompt ends where the tokenized prompt and every prompt + prefix stop agreeing (chat templates
    and BPE merges can change the last prompt tokens), so all K share one prompt.
    """
    prompt_ids = prompt_token_ids(prompt, tokenizer)
    rows = [prefix_ids(tokenizer, prompt, belief_prefix(template, b), eos=False) for b in beliefs]
    cut = min(common_prefix(prompt_ids, row) for row in rows)
    return prompt_ids[:cut], [row[cut:] for row in rows]


def tokenize_belief_record(
    record: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str = DEFAULT_BELIEF_TEMPLATE,
    calibration: str = "renormalized",
    max_length: int | None = None,
) -> dict[str, Any] | None:
    """Lay one validated belief record out as a group for ``grouppo.logps`` (see the module docstring).

    Returns ``prompt_ids``, ``response_ids`` (rows), ``score_mask`` (per row, 1 for the tokens its
    log-prob sums), ``role`` (``BELIEF_ROW``/``CHOSEN_ROW``/``REJECTED_ROW``/``NLL_ROW`` per row),
    ``target`` (the population's probability on belief rows, else 0), ``labels`` (1 on the chosen row)
    and ``scores`` (= ``target``); None when the prompt fills ``max_length``.

    ``calibration="renormalized"``: a belief row scores every token of its prefix, and the belief NLL
    reuses the row of ``belief``. ``"single_token"`` (the reference code's form): a belief row scores
    only the first token where the K prefixes differ (its probability over the whole vocabulary), which
    must tell the K beliefs apart; an extra ``NLL_ROW`` scores the whole prefix of ``belief``.
    """
    if calibration not in CALIBRATION_FORMS:
        raise ValueError(f"calibration={calibration!r}; expected one of {CALIBRATION_FORMS}")
    prompt, beliefs, k = record["prompt"], record["beliefs"], record["belief"]
    prefix = belief_prefix(template, beliefs[k])
    prompt_ids, belief_rows = belief_prompt_ids(tokenizer, prompt, beliefs, template)
    cut = len(prompt_ids)
    answers = []
    for text in (record["chosen"], record["rejected"]):
        full = prefix_ids(tokenizer, prompt, prefix + text, eos=True)
        if common_prefix(full, prompt_ids) < cut:
            raise DataError(f"the prompt {str(prompt)!r:.60} tokenizes differently before one of its answers")
        answers.append(full[cut:])
    # Where the answer starts: the chosen/rejected rows agree with the prefix row up to there.
    starts = [min(common_prefix(row, belief_rows[k]), len(belief_rows[k])) for row in answers]
    rows, masks, roles = [], [], []
    if calibration == "renormalized":
        for row in belief_rows:
            rows.append(row)
            masks.append([1] * len(row))
            roles.append(BELIEF_ROW)
    else:
        split = min(common_prefix(belief_rows[0], row) for row in belief_rows[1:])
        firsts = [row[split] if split < len(row) else None for row in belief_rows]
        if None in firsts or len(set(firsts)) != len(firsts):
            raise DataError(
                f"calibration='single_token' needs the K belief prefixes to differ at one token; with "
                f"template {template!r} the prefixes of {beliefs} do not (use 'renormalized', or labels that "
                "start with distinct single tokens such as '1', '2', ...)"
            )
        for row in belief_rows:
            rows.append(row[: split + 1])
            masks.append([0] * split + [1])
            roles.append(BELIEF_ROW)
    for role, row, start in zip((CHOSEN_ROW, REJECTED_ROW), answers, starts, strict=True):
        if start >= len(row):
            raise DataError(
                f"an answer of the prompt {str(prompt)!r:.60} has no tokens after its belief prefix"
            )
        rows.append(row)
        masks.append([0] * start + [1] * (len(row) - start))
        roles.append(role)
    if calibration == "single_token":
        rows.append(belief_rows[k])
        masks.append([1] * len(belief_rows[k]))
        roles.append(NLL_ROW)
    if max_length is not None:
        room = max_length - cut
        if room <= 0:
            return None
        rows, masks = [r[:room] for r in rows], [m[:room] for m in masks]
        if any(sum(m) == 0 for m in masks):
            raise DataError(
                f"max_length={max_length} leaves a row of {str(prompt)!r:.60} without scored tokens"
            )
    target = [float(p) for p in record["distribution"]] + [0.0] * (len(rows) - len(beliefs))
    labels = [0] * len(rows)
    labels[len(beliefs)] = 1
    # The belief NLL row: the belief's own row (renormalized) or the extra NLL row (single token).
    nll_row = [0] * len(rows)
    nll_row[k if calibration == "renormalized" else len(rows) - 1] = 1
    return {
        "prompt_ids": prompt_ids,
        "response_ids": rows,
        "score_mask": masks,
        "role": roles,
        "target": target,
        "nll_row": nll_row,
        "labels": labels,
        "scores": target,
    }


def pack_belief_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Merge tokenized records (``tokenize_belief_record``) that share a prompt, beliefs and population
    distribution into one group: the prompt and the K belief rows once, then every record's answer rows
    (and single-token NLL rows) in order. Belief NLL flags are merged, so a belief chosen by several of
    the records is counted once.

    Per record, the belief rows are the same for every belief-conditioned pair of a question and a
    population (the GDPO data holds one record per pair); packed, they are scored once per group, and
    the calibration term counts each question once instead of once per pair. Group order follows the
    first record of each.
    """
    packed: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        k = sum(1 for role in row["role"] if role == BELIEF_ROW)
        key = (tuple(row["prompt_ids"]), tuple(map(tuple, row["response_ids"][:k])), tuple(row["target"][:k]))
        group = packed.get(key)
        if group is None:
            packed[key] = {name: list(value) for name, value in row.items()}
            continue
        for name in ("response_ids", "score_mask", "role", "target", "nll_row", "labels", "scores"):
            group[name].extend(row[name][k:])
        group["nll_row"][:k] = [a | b for a, b in zip(group["nll_row"][:k], row["nll_row"][:k], strict=True)]
    return list(packed.values())
