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

    loss_type: list[str] = field(
        default_factory=lambda: ["all_pairs"],
        metadata={
            "help": f"Group loss, one of {sorted(LOSSES)}; TRL's 'sigmoid' is accepted and means all_pairs "
            "(equal to DPO on pairs). TRL's list form is accepted too: 'sigmoid sft' (with loss_weights) is "
            "all_pairs plus the NLL on positives weighted by the second weight.",
        },
    )
    loss_weights: list[float] | None = field(
        default=None,
        metadata={"help": "TRL's weights of a loss_type list: the preference loss's, then the sft term's."},
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "Conservative DPO (TRL's label_smoothing, in [0, 0.5)): each pair's label is taken as "
            "right with probability 1 - label_smoothing; the all_pairs loss only."
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
            ("label_smoothing", in_range(self.label_smoothing, strict=False) and self.label_smoothing < 0.5,
             "a number in [0, 0.5)"),
        ]  # fmt: skip

    def __post_init__(self) -> None:
        self.loss_type, self.preference_weight = self._one_loss(self.loss_type, self.loss_weights)
        loss_function(self.loss_type)
        if self.label_smoothing and self.loss_type != "all_pairs":
            raise ValueError(f"label_smoothing applies to the pairwise loss all_pairs (TRL's sigmoid), not "
                             f"{self.loss_type!r}")  # fmt: skip
        if self.positive_rule not in POSITIVE_RULES:
            raise ValueError(f"positive_rule={self.positive_rule!r}; expected one of {list(POSITIVE_RULES)}")
        super().__post_init__()

    def _one_loss(self, loss_type: str | list[str], weights: list[float] | None) -> tuple[str, float]:
        """The loss name and the preference term's weight of ``loss_type`` (a name, or TRL's list form),
        the NLL weight set from an ``sft`` entry."""
        names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        names = ["all_pairs" if name == "sigmoid" else name for name in names]  # TRL's name for DPO's loss
        if weights is not None and len(weights) != len(names):
            raise ValueError(f"loss_weights={weights}: one weight per loss_type entry ({names})")
        weights = list(weights) if weights is not None else [1.0] * len(names)
        if "sft" in names:
            if len(names) != 2 or names[1] != "sft" or names[0] == "sft":
                raise ValueError(
                    f"loss_type={names}: grouppo takes one group loss, optionally followed by 'sft' (the NLL "
                    "on positives, as nll_weight); other combinations of TRL's losses are not supported"
                )
            if self.nll_weight and self.nll_weight != weights[1]:
                raise ValueError(
                    f"loss_type 'sft' with weight {weights[1]} and nll_weight={self.nll_weight}: give one"
                )
            self.nll_weight = weights[1]
        elif len(names) != 1:
            raise ValueError(f"loss_type={names}: grouppo takes one group loss (and optionally 'sft')")
        return names[0], weights[0]


class GroupDPOTrainer(PreferenceTrainer):
    """Train a causal LM on groups of K scored or labelled responses per prompt (``grouppo.data``'s
    group records), with a GroupDPO loss (``grouppo.losses``)."""

    config_class = GroupDPOConfig
    args: GroupDPOConfig
    card_method = "GroupDPO"
    card_settings = ("loss_type", "nll_weight", "positive_rule", *PreferenceTrainer.card_settings)
    run_settings = (
        "loss_type", "nll_weight", "label_smoothing", "preference_weight", "positive_rule",
        "score_temperature", "merge_prompts", "max_completion_length", *PreferenceTrainer.run_settings,
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
            label_smoothing=self.args.label_smoothing,
            preference_weight=self.args.preference_weight,
            score_temperature=self.args.score_temperature,
        )
