"""GroupDPO: ``GroupDPOConfig`` and ``GroupDPOTrainer``, a causal LM trained on groups of K scored or
labelled responses per prompt with a group loss of ``grouppo.losses`` (all pairs between positives and
negatives by default, DPO's loss at K = 2), plus an NLL term on the positives.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from grouppo.base import PreferenceConfig, PreferenceTrainer, count_or_none, in_range
from grouppo.convert import to_group_records
from grouppo.data import POSITIVE_RULES, prepare_groups
from grouppo.losses import LOSSES, FlatGroupBatch, group_dpo_loss, loss_function
from grouppo.tokenize import tokenize_group

logger = logging.getLogger(__name__)


@dataclass
class GroupDPOConfig(PreferenceConfig):
    """Configuration of ``GroupDPOTrainer``; every ``TrainingArguments`` field applies as usual.

    ``per_device_train_batch_size`` counts groups (prompts with their K responses), not responses.
    """

    loss_type: str = field(
        default="all_pairs",
        metadata={
            "help": f"Group loss, one of {sorted(LOSSES)}; TRL's 'sigmoid' is accepted and means all_pairs "
            "(equal to DPO on pairs).",
            "choices": [*sorted(LOSSES), "sigmoid"],
        },
    )
    nll_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight (>= 0) of the NLL on positives (per-token mean per response, then mean over "
            "positives)."
        },
    )
    score_temperature: float = field(
        default=1.0,
        metadata={"help": "Temperature (> 0) of the soft labels softmax(scores / T) of infonca and nca."},
    )
    max_completion_length: int | None = field(
        default=None,
        metadata={"help": "Maximum response tokens (TRL's option); responses are cut at the end."},
    )
    merge_prompts: bool = field(
        default=False,
        metadata={
            "help": "Pairwise data (TRL's prompt/chosen/rejected): make one group of all the pairs that "
            "share a prompt, instead of one group per pair."
        },
    )
    positive_rule: str = field(
        default="top_bottom",
        metadata={
            "help": "How labels are made from scores when records have none.",
            "choices": list(POSITIVE_RULES),
        },
    )
    skip_invalid_groups: bool = field(
        default=False,
        metadata={"help": "Skip and count groups without a positive and a negative instead of raising."},
    )

    def _bounds(self) -> list[tuple[str, bool, str]]:
        return [
            *super()._bounds(),
            ("nll_weight", in_range(self.nll_weight, strict=False), "a finite number >= 0"),
            ("score_temperature", in_range(self.score_temperature), "a finite number > 0"),
            ("max_completion_length", count_or_none(self.max_completion_length), "an integer >= 1, or None"),
        ]

    def __post_init__(self) -> None:
        if self.loss_type == "sigmoid":
            self.loss_type = "all_pairs"  # TRL's name: -log sigmoid of the reward margin, on every pair
        loss_function(self.loss_type)
        if self.positive_rule not in POSITIVE_RULES:
            raise ValueError(f"positive_rule={self.positive_rule!r}; expected one of {list(POSITIVE_RULES)}")
        super().__post_init__()


class GroupDPOTrainer(PreferenceTrainer):
    """Train a causal LM on groups of K scored or labelled responses per prompt (``grouppo.data``'s
    group records), with a GroupDPO loss (``grouppo.losses``)."""

    config_class = GroupDPOConfig
    args: GroupDPOConfig
    card_method = "GroupDPO"
    card_settings = ("loss_type", "nll_weight", "positive_rule", *PreferenceTrainer.card_settings)
    run_settings = (
        "loss_type", "nll_weight", "positive_rule", "score_temperature", "merge_prompts",
        "max_completion_length", *PreferenceTrainer.run_settings,
    )  # fmt: skip

    def read_records(self, dataset: Iterable[Mapping[str, Any]], source: str) -> list[dict[str, Any]]:
        """Any format ``grouppo.convert.to_group_records`` knows (group records, TRL pairs, UltraFeedback),
        as group records, normalized and labelled (``prepare_groups``: a bad record raises DataError
        naming its line, or with ``skip_invalid_groups`` is counted)."""
        args = self.args
        records, note = to_group_records(
            dataset if isinstance(dataset, list) else list(dataset),
            merge_prompts=args.merge_prompts,
            skip_invalid=args.skip_invalid_groups,
            source=source,
        )
        groups, stats = prepare_groups(
            records, positive_rule=args.positive_rule, skip_invalid=args.skip_invalid_groups, source=source
        )
        if args.should_log:
            print(note, flush=True)
        if stats.skipped:
            logger.warning("%s: %d of %d groups skipped as invalid", source, stats.skipped, stats.records)
        return groups

    def tokenize_records(self, records: Iterable[Mapping[str, Any]], source: str) -> list[dict[str, Any]]:
        """Tokenize labelled group records (``tokenize_group``), responses cut at ``max_completion_length``
        tokens; groups whose prompt fills ``max_length`` are dropped and counted."""
        args = self.args
        if source != "rollout":
            self.warn_special_tokens(records, ("prompt", "responses"), source)
        rows, too_long = [], 0
        for group in records:
            row = tokenize_group(
                group,
                self.processing_class,
                max_length=args.max_length,
                max_prompt_length=args.max_prompt_length,
                special_tokens_in_text=args.special_tokens_in_text,
            )
            if row is None:
                too_long += 1
                continue
            if args.max_completion_length is not None:
                row["response_ids"] = [ids[: args.max_completion_length] for ids in row["response_ids"]]
            rows.append(row)
        if too_long:
            logger.warning(
                "%s: %d groups dropped because the prompt fills max_length=%s",
                source,
                too_long,
                args.max_length,
            )
        return rows

    def objective(
        self, logps: torch.Tensor, ref_logps: torch.Tensor, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return group_dpo_loss(
            FlatGroupBatch(
                logps=logps,
                ref_logps=ref_logps,
                lengths=inputs["response_mask"].sum(-1),
                labels=inputs["labels"],
                scores=inputs["scores"],
                group_index=inputs["group_index"],
                slot=inputs["slot"],
            ),
            beta=self.args.beta,
            loss_type=self.args.loss_type,
            nll_weight=self.args.nll_weight,
            score_temperature=self.args.score_temperature,
        )
