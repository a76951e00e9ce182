"""Token ids: every place where text or chat messages become tokens, for training and for sampling.

Group records (``tokenize_group``) follow TRL's DPOTrainer (1.16) exactly, so a K = 2 group yields
TRL's tokens:

* plain text: each response gets the tokenizer's EOS appended (unless it already ends with it); the
  prompt and each ``prompt + response`` are tokenized as whole strings;
* conversational: the prompt goes through the chat template with the generation prompt, each
  ``prompt + response`` conversation through the chat template (a string response becomes one
  assistant message);
* the response starts where the tokenized prompt and ``prompt + response`` stop agreeing, taking the
  minimum over the group's responses (chat templates and BPE merges can change the prompt's last
  tokens), so all K share one prompt.

Truncation: ``max_prompt_length`` keeps the prompt's last tokens; ``max_length`` then cuts each
response so that prompt + response fits (TRL's ``keep_start``). A group whose prompt alone fills
``max_length`` cannot be trained on and is dropped (``tokenize_group`` returns None).

Size limits: no text is tokenized whole when only its start (or end) can be kept. One token covers at
most ``c`` characters, the length of the tokenizer's longest vocabulary entry (``max_token_chars``), so
the first ``max_length * c`` characters of a text hold at least ``max_length`` tokens: each response is
cut there before tokenizing, and a prompt with ``max_prompt_length`` to its last
``(max_prompt_length + PROMPT_SLACK_TOKENS) * c`` characters, which leaves the token ids kept unchanged.
Without ``max_prompt_length``, a prompt longer than ``(max_length + PROMPT_SLACK_TOKENS) * c``
characters cannot fit, and its group is dropped without tokenizing. (The slack covers the few prompt
tokens that the prompt/response boundary can merge away.) Belief records are cut the same way.

Sampling (``prompt_token_ids``) tokenizes a prompt exactly as training does, so the trainer scores a
completion after the very prompt tokens it was sampled from.

Belief records (GDPO, ``tokenize_belief_record``) open each response with its belief, written through
``belief_template`` (``"{belief}"`` is the label): ``"[Belief: Agree]\n" + chosen``. A record is laid
out as one *group* for ``grouppo.logps``: its prompt once, then K belief rows (the prefix of each
belief, for the calibration term), the chosen and the rejected rows (prefix of ``belief`` + answer),
and, in the single-token calibration form, one more row for the belief NLL. A per-token ``score_mask``
says which response tokens each row's log-prob sums over, so the calibration, preference and
belief-NLL terms all come out of one prompt pass and one decoupled backward. ``pack_belief_rows``
merges the records of one prompt and population into one group, so the prompt and the K belief rows
are scored once for all of that question's pairs.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from grouppo.data import DataError, common_prefix, is_conversational
from grouppo.losses import check_calibration

Prompt = str | list[dict[str, Any]]

DEFAULT_BELIEF_TEMPLATE = "[Belief: {belief}]\n"
# Row roles inside a tokenized belief group.
BELIEF_ROW, CHOSEN_ROW, REJECTED_ROW, NLL_ROW = 0, 1, 2, 3

DEFAULT_TOKEN_CHARS = 64
"""Characters per token assumed when the tokenizer's vocabulary cannot be read."""
PROMPT_SLACK_TOKENS = 16
"""Tokens of margin on a prompt's character budget (see the module docstring)."""

_TOKEN_CHARS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def max_token_chars(tokenizer: Any) -> int:
    """``c``: the most characters one token of ``tokenizer`` can cover, the length of its longest vocabulary
    entry (byte-level and SentencePiece entries are at least as long as the text they stand for);
    ``DEFAULT_TOKEN_CHARS`` when the vocabulary cannot be read. Computed once per tokenizer."""
    try:
        return _TOKEN_CHARS[tokenizer]
    except (KeyError, TypeError):
        pass
    try:
        chars = max((len(entry) for entry in tokenizer.get_vocab()), default=0)
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        chars = 0
    chars = chars if chars > 0 else DEFAULT_TOKEN_CHARS
    try:
        _TOKEN_CHARS[tokenizer] = chars
    except TypeError:  # not weak-referenceable: computed again next time
        pass
    return chars


def text_chars(value: Any) -> int:
    """Characters of text in a string, or in the contents of a list of chat messages."""
    if isinstance(value, str):
        return len(value)
    return sum(
        len(m["content"]) for m in value if isinstance(m, Mapping) and isinstance(m.get("content"), str)
    )


def keep_start(value: Any, limit: int) -> Any:
    """``value`` (text or messages) cut to its first ``limit`` characters of text; later messages go."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit]
    if text_chars(value) <= limit:
        return value
    out, left = [], limit
    for message in value:
        content = message["content"]
        out.append({**message, "content": content[:left]})
        left -= len(out[-1]["content"])
        if left <= 0:
            break
    return out


def keep_end(value: Any, limit: int) -> Any:
    """``value`` (text or messages) cut to its last ``limit`` characters of text; earlier messages stay, their
    contents emptied (so the chat template renders the same turns)."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[len(value) - limit :]
    if text_chars(value) <= limit:
        return value
    out, left = [], limit
    for message in reversed(value):
        content = message["content"]
        kept = content[len(content) - left :] if 0 < left < len(content) else (content if left > 0 else "")
        out.append({**message, "content": kept})
        left -= len(kept)
    return out[::-1]


def special_strings(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The strings ``tokenizer`` turns into control tokens: its special tokens, added ones included."""
    names = set(tokenizer.all_special_tokens)
    names.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    return tuple(sorted(name for name in names if name))


def spells_special_tokens(value: Any, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether a text, or any message of a conversation, spells one of the tokenizer's special tokens."""
    texts = [m.get("content", "") for m in value] if isinstance(value, list) else [value]
    specials = special_strings(tokenizer)
    return any(isinstance(t, str) and any(s in t for s in specials) for t in texts)


_MARK = re.compile("\ue000(\\d+)\ue001")


def _ids(
    tokenizer: PreTrainedTokenizerBase,
    value: str | list,
    special_tokens_in_text: bool = False,
    **chat_kwargs: Any,
) -> list[int]:
    """Token ids of a plain text or a conversation (through the chat template). Text is text: a special
    token's string inside a text or a message's content (``"<|im_end|>"`` in a response) is tokenized as
    the characters it is, never as the control token, unless ``special_tokens_in_text``. The template's
    own special tokens, and the EOS that closes a plain-text response, stay control tokens."""
    if isinstance(value, list) and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "chat messages need a tokenizer with a chat template, and this one has none: give plain-text "
            "prompts and responses, or set tokenizer.chat_template"
        )
    protect = not special_tokens_in_text and spells_special_tokens(value, tokenizer)
    if isinstance(value, list) and not protect:
        return list(
            tokenizer.apply_chat_template(value, tokenize=True, return_dict=True, **chat_kwargs)["input_ids"]
        )
    if not protect:
        return list(tokenizer(text=value)["input_ids"])
    as_text = {"add_special_tokens": False, "split_special_tokens": True}
    if isinstance(value, str):
        eos = tokenizer.eos_token
        core = value[: -len(eos)] if eos and value.endswith(eos) else value
        closing = [tokenizer.eos_token_id] if core is not value else []
        return list(tokenizer(text=core, split_special_tokens=True)["input_ids"]) + closing
    # A conversation: the template rendered around markers, each message's content tokenized as text.
    marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(value)]
    rendered = tokenizer.apply_chat_template(marked, tokenize=False, **chat_kwargs)
    ids, pieces = [], _MARK.split(rendered)
    for index, piece in enumerate(pieces):
        if index % 2:  # a marker: the content of message int(piece)
            ids += tokenizer(text=value[int(piece)]["content"], **as_text)["input_ids"]
        elif piece:
            ids += tokenizer(text=piece, add_special_tokens=False)["input_ids"]
    return ids


def chat_prompt(prompt: Prompt, tokenizer: PreTrainedTokenizerBase) -> Prompt:
    """A plain-text prompt as one user message when the tokenizer has a chat template; a message list, or
    plain text for a tokenizer without a template, unchanged."""
    if isinstance(prompt, str) and getattr(tokenizer, "chat_template", None):
        return [{"role": "user", "content": prompt}]
    return prompt


def prompt_token_ids(
    prompt: Prompt, tokenizer: PreTrainedTokenizerBase, special_tokens_in_text: bool = False
) -> list[int]:
    """The prompt's token ids: chat messages through the chat template with the generation prompt,
    plain text as it is (text is text: see ``_ids``)."""
    if is_conversational(prompt):
        return _ids(tokenizer, prompt, special_tokens_in_text, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise TypeError(
            f"a prompt is a string or a list of chat messages (role, content), got {prompt!r:.80}"
        )
    return _ids(tokenizer, prompt, special_tokens_in_text)


def tokenize_group(
    record: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    special_tokens_in_text: bool = False,
) -> dict[str, Any] | None:
    """Token ids of one normalized group record (``grouppo.data.normalize_record``); text is text unless
    ``special_tokens_in_text`` (see ``_ids``).

    Returns ``prompt_ids``, ``response_ids`` (K lists), ``labels`` and ``scores`` (the record's
    scores, or its labels as 1.0/0.0 where it has none), or None when the prompt fills ``max_length``.
    Long texts are cut before tokenizing, leaving the ids kept unchanged (see the module docstring).
    """
    prompt, responses = record["prompt"], record["responses"]
    if max_length is not None or max_prompt_length is not None:
        c = max_token_chars(tokenizer)
        if max_prompt_length is not None:
            prompt = keep_end(prompt, (max(max_prompt_length, 0) + PROMPT_SLACK_TOKENS) * c)
        elif text_chars(prompt) > (max_length + PROMPT_SLACK_TOKENS) * c:
            return None  # more than max_length tokens: the prompt cannot fit
        if max_length is not None:
            responses = [keep_start(response, max(max_length, 0) * c) for response in responses]
    prompt_ids = prompt_token_ids(prompt, tokenizer, special_tokens_in_text)
    if is_conversational(prompt):
        turns = [r if isinstance(r, list) else [{"role": "assistant", "content": r}] for r in responses]
        full_ids = [_ids(tokenizer, prompt + turn, special_tokens_in_text) for turn in turns]
    else:
        eos = tokenizer.eos_token
        texts = [r if r.endswith(eos) else r + eos for r in responses]
        full_ids = [_ids(tokenizer, prompt + text, special_tokens_in_text) for text in texts]
    prompt_len = min(common_prefix(prompt_ids, ids) for ids in full_ids)
    response_ids = [ids[prompt_len:] for ids in full_ids]
    prompt_ids = prompt_ids[:prompt_len]
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[-max_prompt_length:] if max_prompt_length > 0 else []
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room <= 0:
            return None
        response_ids = [ids[:room] for ids in response_ids]
    if any(len(ids) == 0 for ids in response_ids):
        raise ValueError(f"a response of the group with prompt {prompt!r:.80} has no tokens")
    scores = record.get("scores") or [float(label) for label in record["labels"]]
    return {
        "prompt_ids": prompt_ids,
        "response_ids": response_ids,
        "labels": [int(label) for label in record["labels"]],
        "scores": [float(score) for score in scores],
    }


# ---------------------------------------------------------------------------------------------- beliefs
def check_belief_template(template: str) -> None:
    """ValueError unless ``template`` holds the ``{belief}`` placeholder."""
    if "{belief}" not in template:
        raise ValueError(f"belief_template must contain '{{belief}}', got {template!r}")


def belief_prefix(template: str, label: str) -> str:
    """The text that opens a response holding belief ``label``."""
    check_belief_template(template)
    return template.replace("{belief}", label)


def prefix_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Any,
    text: str,
    eos: bool,
    special_tokens_in_text: bool = False,
) -> list[int]:
    """Token ids of ``prompt`` followed by the response text ``text``; ``eos`` closes the response
    (end of turn for chat prompts, EOS for plain text), else it stays open for more tokens."""
    if is_conversational(prompt):
        messages = [*prompt, {"role": "assistant", "content": text}]
        return _ids(tokenizer, messages, special_tokens_in_text, continue_final_message=not eos)
    if eos and not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return _ids(tokenizer, prompt + text, special_tokens_in_text)


def belief_prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Any,
    beliefs: list[str],
    template: str,
    special_tokens_in_text: bool = False,
) -> tuple[list[int], list[list[int]]]:
    """Token ids of the prompt and of each belief's prefix after it (for calibration and sampling).

    The prompt ends where the tokenized prompt and every prompt + prefix stop agreeing (chat templates
    and BPE merges can change the last prompt tokens), so all K share one prompt.
    """
    prompt_ids = prompt_token_ids(prompt, tokenizer, special_tokens_in_text)
    rows = [
        prefix_ids(tokenizer, prompt, belief_prefix(template, b), False, special_tokens_in_text)
        for b in beliefs
    ]
    cut = min(common_prefix(prompt_ids, row) for row in rows)
    return prompt_ids[:cut], [row[cut:] for row in rows]


def tokenize_belief_record(
    record: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str = DEFAULT_BELIEF_TEMPLATE,
    calibration: str = "renormalized",
    max_length: int | None = None,
    special_tokens_in_text: bool = False,
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
    check_calibration(calibration)
    prompt, beliefs, k = record["prompt"], record["beliefs"], record["belief"]
    answer_texts = [record["chosen"], record["rejected"]]
    if max_length is not None:  # long texts cut before tokenizing (see the module docstring)
        c = max_token_chars(tokenizer)
        if text_chars(prompt) > (max_length + PROMPT_SLACK_TOKENS) * c:
            return None  # more than max_length tokens: the prompt cannot fit
        budget = max(max_length, 0) * c
        beliefs = [keep_start(label, budget) for label in beliefs]
        answer_texts = [keep_start(text, budget) for text in answer_texts]
    prefix = belief_prefix(template, beliefs[k])
    prompt_ids, belief_rows = belief_prompt_ids(tokenizer, prompt, beliefs, template, special_tokens_in_text)
    cut = len(prompt_ids)
    answers = []
    for text in answer_texts:
        full = prefix_ids(tokenizer, prompt, prefix + text, True, special_tokens_in_text)
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


def answer_rows(batch: Mapping[str, Any]) -> Any:
    """The rows of a batch of belief groups that hold answers (chosen or rejected), as a bool mask: the
    rows a reference scores (the belief prefixes have no reference term)."""
    return (batch["role"] == CHOSEN_ROW) | (batch["role"] == REJECTED_ROW)


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
