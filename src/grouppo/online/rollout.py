"""Sample K responses per prompt, score them with a reward, and write them as group records.

One path serves both ways of training on self-sampled data: ``grouppo sample`` writes the groups to a
file for offline GroupDPO, and ``OnlineGroupDPOTrainer`` builds them from the current policy at every
step. A prompt record holds ``prompt`` (text or chat messages) and any fields its reward reads (for
instruction following: ``instruction_id_list`` and ``kwargs``); they are passed to the reward as lists
aligned with the completions, TRL's ``reward_funcs`` convention, and carried into the group record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from grouppo.data import is_conversational
from grouppo.environment import progress_bar
from grouppo.generation import Generator
from grouppo.online.rewards import Reward, reward_name, reward_values
from grouppo.tokenize import chat_prompt


@dataclass
class RolloutStats:
    """What a rollout produced: counts of prompts, completions and the groups that were dropped."""

    prompts: int = 0
    completions: int = 0
    empty_completions: int = 0
    equal_reward_groups: int = 0
    nonfinite_reward_groups: int = 0
    too_small_groups: int = 0
    groups: int = 0
    rewards: list[float] = field(default_factory=list)

    def update(self, other: RolloutStats) -> None:
        for name in (
            "prompts",
            "completions",
            "empty_completions",
            "equal_reward_groups",
            "nonfinite_reward_groups",
            "too_small_groups",
            "groups",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.rewards.extend(other.rewards)

    def summary(self) -> str:
        mean = sum(self.rewards) / len(self.rewards) if self.rewards else float("nan")
        return (
            f"{self.prompts} prompts, {self.completions} completions (mean reward {mean:.4f}); "
            f"{self.groups} groups kept, {self.equal_reward_groups} dropped because every response scored "
            f"the same, {self.nonfinite_reward_groups} with a reward that is not a finite number, "
            f"{self.too_small_groups} with fewer than 2 non-empty completions "
            f"({self.empty_completions} empty completions dropped)"
        )


def score(
    reward: Reward,
    records: Sequence[Mapping[str, Any]],
    completions: Sequence[Sequence[str]],
    tokenizer: Any = None,
    **extra: Any,
) -> list[list[float]]:
    """Rewards of ``completions[i][k]`` for prompt record ``records[i]``, in one call of ``reward``, with
    the arguments TRL gives (``grouppo.online.rewards``): ``prompts``, ``completions`` (as one assistant
    message for a conversational prompt), ``completion_ids`` (with ``tokenizer``), every other field of
    the records as a list aligned with the completions, and ``extra`` (``trainer_state``, ...)."""
    flat_records = [r for r, group in zip(records, completions, strict=True) for _ in group]
    flat = [c for group in completions for c in group]
    shaped = [[{"role": "assistant", "content": c}] if is_conversational(r["prompt"]) else c
              for r, c in zip(flat_records, flat, strict=True)]  # fmt: skip
    names = sorted({key for r in records for key in r} - {"prompt"})
    fields = {name: [r.get(name) for r in flat_records] for name in names}
    if tokenizer is not None:
        fields["completion_ids"] = [tokenizer(text=c, add_special_tokens=False)["input_ids"] for c in flat]
    returned = reward(prompts=[r["prompt"] for r in flat_records], completions=shaped, **fields, **extra)
    values = reward_values(reward_name(reward), returned, len(flat))
    out, start = [], 0
    for group in completions:
        out.append(values[start : start + len(group)])
        start += len(group)
    return out


def group_records(
    records: Sequence[Mapping[str, Any]],
    completions: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    tokenizer: Any,
) -> tuple[list[dict[str, Any]], RolloutStats]:
    """Group records (``prompt`` as the model saw it, ``responses``, ``scores`` and the prompt record's
    other fields). Empty completions are dropped (the group schema needs text), and so are groups with
    fewer than two responses left, whose responses all scored the same (they carry no preference) or
    whose reward is not a finite number."""
    stats = RolloutStats(prompts=len(records))
    groups = []
    for record, texts, values in zip(records, completions, scores, strict=True):
        stats.completions += len(texts)
        stats.rewards.extend(values)
        kept = [(t, v) for t, v in zip(texts, values, strict=True) if t.strip()]
        stats.empty_completions += len(texts) - len(kept)
        if len(kept) < 2:
            stats.too_small_groups += 1
            continue
        if not all(math.isfinite(v) for _, v in kept):
            stats.nonfinite_reward_groups += 1
            continue
        if len({v for _, v in kept}) == 1:
            stats.equal_reward_groups += 1
            continue
        group = {key: value for key, value in record.items() if key != "prompt"}
        group["prompt"] = chat_prompt(record["prompt"], tokenizer)
        group["responses"] = [t for t, _ in kept]
        group["scores"] = [v for _, v in kept]
        groups.append(group)
    stats.groups = len(groups)
    return groups, stats


def rollout(
    generator: Generator,
    reward: Reward,
    records: Sequence[Mapping[str, Any]],
    num_generations: int,
    tokenizer: Any,
    **extra: Any,
) -> tuple[list[dict[str, Any]], RolloutStats]:
    """Sample ``num_generations`` completions per prompt record, score them (``extra``: what the reward
    gets beside TRL's arguments, e.g. ``trainer_state``), and make group records."""
    completions = generator.generate([chat_prompt(r["prompt"], tokenizer) for r in records], num_generations)
    return group_records(
        records, completions, score(reward, records, completions, tokenizer, **extra), tokenizer
    )


def rollout_dataset(
    generator: Generator,
    reward: Reward,
    records: Sequence[Mapping[str, Any]],
    num_generations: int,
    tokenizer: Any,
    prompts_per_call: int = 4,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], RolloutStats]:
    """:func:`rollout` over a whole prompt set, ``prompts_per_call`` prompts at a time.

    ``progress`` shows a bar of the prompts sampled (tqdm, on stderr: rate, ETA, groups kept so far).
    """
    groups, stats = [], RolloutStats()
    with progress_bar(len(records), "sampling", "prompt", progress) as bar:
        for start in range(0, len(records), prompts_per_call):
            part_records = records[start : start + prompts_per_call]
            part, part_stats = rollout(generator, reward, part_records, num_generations, tokenizer)
            groups.extend(part)
            stats.update(part_stats)
            bar.update(len(part_records))
            bar.set_postfix(groups=stats.groups, refresh=False)
    return groups, stats
