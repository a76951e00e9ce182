"""``GDPOConfig`` and ``GDPOTrainer``: group distributional preference optimization (Yao et al., ICLR 2025).

A population holds a distribution of beliefs on a question; GDPO calibrates the model's belief
distribution to it and trains responses consistent with each belief. Each training record is one
belief-conditioned pair (``grouppo.data.normalize_belief_record``); the trainer lays the records of
one prompt and population out as one group of rows (the K belief prefixes once, then each pair's chosen
and rejected answer) that share one prompt pass and one decoupled backward (``grouppo.decoupled``); the
reference scores the answer rows only. ``grouppo.losses.gdpo_loss`` adds the three terms:

* calibration: ``KL(p* || q_theta)`` over the K beliefs, each belief's probability being its prefix's
  summed token log-prob, renormalized over the K (default), or the reference code's single token over
  the whole vocabulary (``calibration="single_token"``);
* preference: DPO on the answer tokens only, chosen and rejected sharing the belief prefix;
* belief NLL: minus the mean per-token log-prob of the chosen belief's prefix.

``GDPOTrainer`` is a sibling of ``GroupDPOTrainer`` on ``grouppo.base.PreferenceTrainer``: another data
layout and objective, the same reference (``ref_model``, PEFT's disabled adapter, precomputed, or a
frozen copy), scoring path, evaluation, saving and CLI.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from grouppo.base import PreferenceConfig, PreferenceTrainer, in_range
from grouppo.data import prepare_belief_records
from grouppo.losses import CALIBRATION_FORMS, FlatBeliefBatch, check_calibration, gdpo_loss
from grouppo.tokenize import (
    DEFAULT_BELIEF_TEMPLATE,
    answer_rows,
    check_belief_template,
    pack_belief_rows,
    tokenize_belief_record,
)

logger = logging.getLogger(__name__)


@dataclass
class GDPOConfig(PreferenceConfig):
    """Configuration of ``GDPOTrainer``; every ``TrainingArguments`` field applies as usual.

    ``per_device_train_batch_size`` counts groups: with ``pack_records`` (the default) one group per
    prompt and population (all its belief-conditioned pairs), else one per record.
    """

    belief_template: str = field(
        default=DEFAULT_BELIEF_TEMPLATE,
        metadata={"help": "How a response opens with its belief; '{belief}' is replaced by the label."},
    )
    calibration: str = field(
        default="renormalized",
        metadata={
            "help": "renormalized: softmax over the K beliefs of each prefix's summed log-prob. "
            "single_token: the reference code's probability of one token over the whole vocabulary "
            "(not renormalized).",
            "choices": list(CALIBRATION_FORMS),
        },
    )
    calibration_weight: float = field(default=1.0, metadata={"help": "Weight of KL(p* || q_theta)."})
    preference_weight: float = field(
        default=1.0, metadata={"help": "Weight of the belief-conditioned DPO term on answer tokens."}
    )
    belief_nll_weight: float = field(
        default=1.0, metadata={"help": "Weight of the NLL of the chosen belief's prefix tokens."}
    )
    pack_records: bool = field(
        default=True,
        metadata={
            "help": "Score the records that share a prompt, beliefs and distribution as one group: prompt "
            "and belief prefixes once, every pair's answers after them (tokenize.pack_belief_rows). False: "
            "one group per record, its belief rows repeated."
        },
    )
    skip_invalid_records: bool = field(
        default=False, metadata={"help": "Skip and count invalid belief records instead of raising."}
    )
    response_chunk_size: int | None = field(
        default=8,
        metadata={
            "help": "Rows (K belief prefixes + chosen + rejected) scored and backpropagated at a time; the "
            "rows are short, so one chunk usually holds a whole record. None: all rows at once."
        },
    )

    def _bounds(self) -> list[tuple[str, bool, str]]:
        weights = ("calibration_weight", "preference_weight", "belief_nll_weight")
        return [
            *super()._bounds(),
            *((w, in_range(getattr(self, w), strict=False), "a finite number >= 0") for w in weights),
        ]

    def __post_init__(self) -> None:
        check_calibration(self.calibration)
        check_belief_template(self.belief_template)
        super().__post_init__()


class GDPOTrainer(PreferenceTrainer):
    """Train a causal LM with GDPO on belief records (``grouppo.data.normalize_belief_record``).

    Same arguments as ``GroupDPOTrainer``, with a ``GDPOConfig``.
    """

    config_class = GDPOConfig
    args: GDPOConfig
    card_method = "GDPO"
    run_settings = (
        "calibration", "calibration_weight", "preference_weight", "belief_nll_weight", "pack_records",
        "belief_template", *PreferenceTrainer.run_settings,
    )  # fmt: skip
    reference_rows = staticmethod(answer_rows)  # the belief prefixes have no reference term
    card_settings = (
        "calibration", "calibration_weight", "preference_weight", "belief_nll_weight", "pack_records",
        *PreferenceTrainer.card_settings,
    )  # fmt: skip

    def read_records(self, dataset: Iterable[Mapping[str, Any]], source: str) -> list[dict[str, Any]]:
        """Belief records, validated (``prepare_belief_records``)."""
        return prepare_belief_records(dataset, skip_invalid=self.args.skip_invalid_records, source=source)

    def tokenize_records(self, records: Iterable[Mapping[str, Any]], source: str) -> list[dict[str, Any]]:
        """Lay each belief record out as one group of rows (``tokenize_belief_record``), packed by prompt
        with ``pack_records``."""
        args = self.args
        self.warn_special_tokens(records, ("prompt", "beliefs", "chosen", "rejected"), source)
        rows = []
        for record in records:
            row = tokenize_belief_record(
                record,
                self.processing_class,
                template=args.belief_template,
                calibration=args.calibration,
                max_length=args.max_length,
                special_tokens_in_text=args.special_tokens_in_text,
            )
            if row is not None:
                rows.append(row)
        if len(rows) < len(records):
            logger.warning(
                "%s: %d records dropped because the prompt fills max_length=%s",
                source, len(records) - len(rows), args.max_length,
            )  # fmt: skip
        return pack_belief_rows(rows) if args.pack_records else rows

    def objective(
        self, logps: torch.Tensor, ref_logps: torch.Tensor, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return gdpo_loss(
            FlatBeliefBatch(
                logps=logps,
                ref_logps=ref_logps,
                lengths=inputs["score_mask"].sum(-1),
                role=inputs["role"],
                target=inputs["target"],
                nll_row=inputs["nll_row"],
                group_index=inputs["group_index"],
                slot=inputs["slot"],
            ),
            beta=self.args.beta,
            calibration=self.args.calibration,
            calibration_weight=self.args.calibration_weight,
            preference_weight=self.args.preference_weight,
            belief_nll_weight=self.args.belief_nll_weight,
        )
