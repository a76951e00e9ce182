"""From group records to token ids, and from token ids to padded batches.

Tokenization follows TRL's DPOTrainer (1.16) exactly, so a K = 2 group yields TRL's tokens:

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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from grouppo.data import is_conversational


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _ids(tokenizer: PreTrainedTokenizerBase, value: str | list, **chat_kwargs: Any) -> list[int]:
    if isinstance(value, list):
        return list(
            tokenizer.apply_chat_template(value, tokenize=True, return_dict=True, **chat_kwargs)["input_ids"]
        )
    return list(tokenizer(text=value)["input_ids"])


def tokenize_group(
    record: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> dict[str, Any] | None:
    """Token ids of one normalized group record (see ``grouppo.data.normalize_record``).

    Returns ``prompt_ids``, ``response_ids`` (K lists), ``labels`` and ``scores`` (the record's
    scores, or its labels as 1.0/0.0 where it has none), or None when the prompt fills ``max_length``.
    """
    prompt, responses = record["prompt"], record["responses"]
    if is_conversational(prompt):
        turns = [r if isinstance(r, list) else [{"role": "assistant", "content": r}] for r in responses]
        prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
        full_ids = [_ids(tokenizer, prompt + turn) for turn in turns]
    else:
        eos = tokenizer.eos_token
        texts = [r if r.endswith(eos) else r + eos for r in responses]
        prompt_ids = _ids(tokenizer, prompt)
        full_ids = [_ids(tokenizer, prompt + text) for text in texts]
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


def _pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


@dataclass
class GroupCollator:
    """Pads a list of tokenized groups into one batch (see ``grouppo.logps`` for the layout).

    ``per_device_train_batch_size`` counts groups: a group is one feature and is never split.
    Outputs ``prompt_ids``/``prompt_mask`` ``[G, P]``; ``response_ids``/``response_mask`` ``[N, R]``;
    per response: ``group_index``, ``slot`` (position in its group), ``labels``, ``scores``, and
    ``ref_logps`` when the features carry precomputed reference log-probs; belief groups
    (``grouppo.beliefs.tokenize_belief_record``) add ``score_mask`` ``[N, R]``, ``role``, ``nll_row`` and
    ``target``.
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompt_ids, prompt_mask = _pad([f["prompt_ids"] for f in features], self.pad_token_id)
        responses = [r for f in features for r in f["response_ids"]]
        response_ids, response_mask = _pad(responses, self.pad_token_id)
        sizes = [len(f["response_ids"]) for f in features]
        batch = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "response_ids": response_ids,
            "response_mask": response_mask,
            "group_index": torch.repeat_interleave(torch.arange(len(features)), torch.tensor(sizes)),
            "slot": torch.cat([torch.arange(k) for k in sizes]),
            "labels": torch.tensor([x for f in features for x in f["labels"]], dtype=torch.long),
            "scores": torch.tensor([x for f in features for x in f["scores"]], dtype=torch.float32),
        }
        if "score_mask" in features[0]:  # belief groups (grouppo.beliefs): which tokens each row sums
            mask, _ = _pad([m for f in features for m in f["score_mask"]], 0)
            batch["score_mask"] = mask[:, : response_ids.shape[1]] * response_mask
        for key, dtype in (("role", torch.long), ("nll_row", torch.long), ("target", torch.float32)):
            if key in features[0]:
                batch[key] = torch.tensor([x for f in features for x in f[key]], dtype=dtype)
        if all(f.get("ref_logps") is not None for f in features):
            batch["ref_logps"] = torch.tensor(
                [x for f in features for x in f["ref_logps"]], dtype=torch.float32
            )
        return batch
