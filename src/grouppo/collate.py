"""From tokenized groups to padded batches (the layout ``grouppo.logps`` scores)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


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
    (``grouppo.tokenize.tokenize_belief_record``) add ``score_mask`` ``[N, R]``, ``role``, ``nll_row`` and
    ``target``.
    """

    pad_token_id: int
    prompt_records: bool = False  # online training: untokenized prompt records pass through as a list

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor] | list[dict[str, Any]]:
        if self.prompt_records and "prompt_ids" not in features[0]:
            return features
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
        if "score_mask" in features[0]:  # belief groups (grouppo.tokenize): which tokens each row sums
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


# The batch keys with one row per group (the prompt); every other key has one row per response.
GROUP_KEYS = frozenset({"prompt_ids", "prompt_mask", "placeholder"})


def select_rows(batch: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """``batch`` with only the responses where ``keep`` (a bool mask over responses) is true; the
    prompts stay whole, so ``group_index`` still points at them."""
    return {key: value if key in GROUP_KEYS else value[keep] for key, value in batch.items()}


def select_groups(batch: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """``batch`` with only its first ``count`` groups (their prompts and responses)."""
    keep = batch["group_index"] < count
    return {key: value[:count] if key in GROUP_KEYS else value[keep] for key, value in batch.items()}


def sequence_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per response ``[N]``: its prompt's tokens plus its own, the sequence a pairwise trainer reads (TRL's
    ``num_tokens`` counts these; prompt sharing computes each prompt once per group all the same)."""
    prompt = batch["prompt_mask"].sum(-1)[batch["group_index"]]
    return prompt + batch["response_mask"].sum(-1)


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """``batch`` with its tensors on ``device`` (other values as they are)."""
    return {
        key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()
    }


def placeholder_batch(pad_token_id: int) -> dict[str, torch.Tensor]:
    """A batch of one group of two one-token responses, marked ``placeholder``: what a process with
    nothing to train on scores, with weight 0, so that it makes the same collective calls as the others
    (DDP's gradient all-reduce, FSDP2's and ZeRO-3's parameter gathers) instead of leaving them waiting."""
    batch = GroupCollator(pad_token_id=pad_token_id)(
        [
            {
                "prompt_ids": [pad_token_id],
                "response_ids": [[pad_token_id], [pad_token_id]],
                "labels": [1, 0],
                "scores": [1.0, 0.0],
            }
        ]  # fmt: skip
    )
    batch["placeholder"] = torch.ones(1, dtype=torch.long)
    return batch
