"""The trainers' shared base (``PreferenceConfig``, ``PreferenceTrainer``) and GroupDPO (``GroupDPOConfig``,
``GroupDPOTrainer``).

Every grouppo trainer is a ``PreferenceTrainer``: it loads the model, tokenizer and PEFT adapter, turns
its datasets into tokenized groups, keeps the reference (``grouppo.reference.Reference``), scores the
responses of each batch (``grouppo.decoupled.group_logps``: prompt shared, decoupled backward),
computes the loss, and logs metrics the way TRL does. A trainer differs only by three hooks:

* ``_tokenize_records(records, source)``: how data records become tokenized groups (``grouppo.tokenize``);
* ``_reference_rows(batch)``: which rows the reference scores (default: all);
* ``_loss(logps, ref_logps, batch)``: the objective, a pure function in ``grouppo.losses``.

``GroupDPOTrainer`` fills them with group records and the GroupDPO losses; ``grouppo.gdpo.GDPOTrainer``
with belief records and the GDPO objective; ``grouppo.online.OnlineGroupDPOTrainer`` samples its groups
from the policy and hands them to the same hooks.
"""

from __future__ import annotations

import logging
import warnings
from abc import ABCMeta, abstractmethod
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Trainer, TrainingArguments

from grouppo.collate import GroupCollator
from grouppo.data import POSITIVE_RULES, prepare_groups
from grouppo.decoupled import group_logps
from grouppo.logps import DEFAULT_LOGITS_CHUNK_SIZE
from grouppo.losses import LOSSES, FlatGroupBatch, group_dpo_loss, loss_function
from grouppo.reference import Reference
from grouppo.tokenize import tokenize_group

logger = logging.getLogger(__name__)

TOKENIZED_COLUMNS = ("prompt_ids", "response_ids", "labels", "scores")
UNSET = -1  # default of deprecated integer options that accept None


@dataclass
class PreferenceConfig(TrainingArguments):
    """What every grouppo trainer shares: the implicit reward's beta, the scoring path (prompt sharing,
    decoupled backward, chunked LM head), truncation and the reference. ``GroupDPOConfig`` and
    ``grouppo.gdpo.GDPOConfig`` add their objectives."""

    beta: float = field(default=0.1, metadata={"help": "Inverse temperature of the implicit reward."})
    response_chunk_size: int | None = field(
        default=4,
        metadata={
            "help": "Responses scored and backpropagated at a time (decoupled backward, exact gradient, "
            "memory flat in K). None: coupled, all responses of the micro-batch at once."
        },
    )
    no_grad_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Responses scored at a time in passes without gradients (reference, evaluation). They "
            "keep no activations, so bigger chunks run faster for little memory. "
            "None: 4 x response_chunk_size."
        },
    )
    share_prompt: bool = field(
        default=True,
        metadata={"help": "Run each group's prompt once and share its KV cache across responses."},
    )
    logits_chunk_size: int = field(
        default=DEFAULT_LOGITS_CHUNK_SIZE,
        metadata={
            "help": "Tokens projected through the LM head at a time (float32 logits exist for this many)."
        },
    )
    max_length: int | None = field(
        default=1024, metadata={"help": "Maximum prompt + response tokens; responses are cut at the end."}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Maximum prompt tokens; longer prompts keep their last tokens."}
    )
    precompute_ref_logps: bool = field(
        default=False,
        metadata={
            "help": "Compute reference log-probs once before training (no reference model kept in memory)."
        },
    )
    ref_logps_cache: bool = field(
        default=True,
        metadata={
            "help": "With precompute_ref_logps: keep the values on disk, keyed by the reference's weights "
            "and the tokenized data, and reuse them in later runs."
        },
    )
    ref_logps_cache_dir: str | None = field(
        default=None, metadata={"help": "Where the cache lives (default $GROUPPO_CACHE or ~/.cache/grouppo)."}
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Set dropout to 0 in the policy and reference."}
    )
    model_init_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Keyword arguments of from_pretrained when `model` is a name or path."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator needs the tokenized group columns."}
    )
    group_chunk_size: int | None = field(
        default=UNSET,
        metadata={
            "help": f"Deprecated name of response_chunk_size (it counts responses); {UNSET}: unset."
        },
    )

    def __post_init__(self) -> None:
        if self.group_chunk_size != UNSET:
            warnings.warn(
                "group_chunk_size is deprecated and will be removed: it counts responses, so it is now "
                "called response_chunk_size",
                FutureWarning,
                stacklevel=3,
            )
            self.response_chunk_size, self.group_chunk_size = self.group_chunk_size, UNSET
        if self.response_chunk_size is not None and self.response_chunk_size < 1:
            raise ValueError(f"response_chunk_size must be >= 1 or None, got {self.response_chunk_size}")
        super().__post_init__()


@dataclass
class GroupDPOConfig(PreferenceConfig):
    """Configuration of ``GroupDPOTrainer``; every ``TrainingArguments`` field applies as usual.

    ``per_device_train_batch_size`` counts groups (prompts with their K responses), not responses.
    """

    loss_type: str = field(
        default="all_pairs",
        metadata={"help": f"Group loss, one of {sorted(LOSSES)}.", "choices": sorted(LOSSES)},
    )
    nll_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the NLL on positives (per-token mean per response, then mean over positives)."
        },
    )
    score_temperature: float = field(
        default=1.0,
        metadata={"help": "Temperature of the soft labels softmax(scores / T) of infonca and nca."},
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

    def __post_init__(self) -> None:
        loss_function(self.loss_type)
        if self.positive_rule not in POSITIVE_RULES:
            raise ValueError(f"positive_rule={self.positive_rule!r}; expected one of {list(POSITIVE_RULES)}")
        super().__post_init__()


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _load_model(model: str | PreTrainedModel, init_kwargs: dict[str, Any] | None) -> PreTrainedModel:
    if isinstance(model, str):
        return AutoModelForCausalLM.from_pretrained(model, **(init_kwargs or {}))
    return model


class PreferenceTrainer(Trainer, metaclass=ABCMeta):
    """What every grouppo trainer shares (see the module docstring); subclasses fill in the three hooks.

    ``model`` and ``ref_model`` may be Hub names, local paths or modules. The reference is, in order:
    ``ref_model``; with ``peft_config`` and no ``ref_model``, the base model with the adapter disabled;
    with ``precompute_ref_logps``, the initial policy (scored once, before training); otherwise a frozen
    copy of the initial policy. Datasets hold records (each trainer's schema) or already tokenized groups.
    """

    config_class: type[PreferenceConfig] = PreferenceConfig
    args: PreferenceConfig

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: str | PreTrainedModel | None = None,
        args: PreferenceConfig | None = None,
        train_dataset: Dataset | Iterable[Mapping[str, Any]] | None = None,
        eval_dataset: Dataset | Iterable[Mapping[str, Any]] | Mapping[str, Any] | None = None,
        processing_class: Any = None,
        peft_config: Any = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
    ) -> None:
        args = args or self.config_class(output_dir=f"grouppo-{type(self).__name__.lower()}")
        name = model if isinstance(model, str) else model.config._name_or_path
        model = _load_model(model, args.model_init_kwargs)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(name)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        reference = Reference(
            model,
            None if ref_model is None else _load_model(ref_model, args.model_init_kwargs),
            adapter=peft_config is not None,
            precompute=args.precompute_ref_logps,
        )
        if args.disable_dropout:
            for m in (model, reference.model):
                if m is not None:
                    _disable_dropout(m)
        self._tokenizer = processing_class
        self.args = args  # the data hooks read it; Trainer.__init__ sets it again
        train_dataset = self._prepare_dataset(train_dataset, "train")
        if isinstance(eval_dataset, Mapping):
            eval_dataset = {k: self._prepare_dataset(v, f"eval/{k}") for k, v in eval_dataset.items()}
        else:
            eval_dataset = self._prepare_dataset(eval_dataset, "eval")
        super().__init__(
            model=model,
            args=args,
            data_collator=self._make_collator(processing_class),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        # compute_loss returns a per-micro-batch mean: let Trainer scale it for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self.reference = reference
        reference.prepare(self)
        if args.precompute_ref_logps:
            self.train_dataset = reference.precompute(self.train_dataset)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: reference.precompute(v) for k, v in self.eval_dataset.items()}
            else:
                self.eval_dataset = reference.precompute(self.eval_dataset)

    @property
    def ref_model(self) -> torch.nn.Module | None:
        """The reference model, when the reference keeps one (TRL's attribute)."""
        return self.reference.model

    # ------------------------------------------------------------------ hooks
    @abstractmethod
    def _tokenize_records(self, records: Iterable[Mapping[str, Any]], source: str) -> list[dict[str, Any]]:
        """Validate records of this trainer's schema and tokenize them: one row per trainable group."""

    def _reference_rows(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Which rows of ``batch`` the reference scores (a bool mask), or None for all; the others get 0."""
        return None

    @abstractmethod
    def _loss(
        self, logps: torch.Tensor, ref_logps: torch.Tensor, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective from the batch's per-row log-probs: loss and detached metrics."""

    # ------------------------------------------------------------------ data
    def _make_collator(self, tokenizer: Any) -> GroupCollator:
        return GroupCollator(pad_token_id=tokenizer.pad_token_id)

    def _prepare_dataset(
        self, dataset: Dataset | Iterable[Mapping[str, Any]] | None, source: str
    ) -> Dataset | None:
        """Tokenized groups of ``dataset`` (already tokenized datasets pass through)."""
        if dataset is None:
            return None
        if isinstance(dataset, Dataset) and set(TOKENIZED_COLUMNS) <= set(dataset.column_names):
            return dataset
        rows = self._tokenize_records(dataset, source)
        if not rows:
            raise ValueError(f"{source}: no trainable group left")
        return Dataset.from_list(rows)

    # ------------------------------------------------------------------ the step
    def _logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-row log-probs of ``batch`` under ``model`` (policy or reference), in chunks."""
        # accelerate applies mixed precision by wrapping ``model.forward``, which scoring replaces
        # (``call_as_forward``), so the autocast of ``bf16``/``fp16`` is entered here instead.
        args = self.args
        chunk = args.response_chunk_size
        if not torch.is_grad_enabled():
            chunk = args.no_grad_chunk_size or (4 * chunk if chunk else None)
        with self.accelerator.autocast():
            return group_logps(
                model,
                batch,
                response_chunk_size=chunk,
                share_prompt=args.share_prompt,
                logits_chunk_size=args.logits_chunk_size,
            )

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
        mode = "train" if model.training else "eval"
        ref_logps = self.reference.logps(inputs)
        logps = self._logps(model, inputs)
        loss, metrics = self._loss(logps, ref_logps.to(logps.dtype), inputs)
        values = torch.tensor(list(metrics.values()), device=logps.device)
        values = self.accelerator.reduce(values, reduction="mean")
        for key, value in zip(metrics, values.tolist(), strict=True):
            self._metrics[mode][key].append(value)
        return (loss, metrics) if return_outputs else loss

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: Any = None,
    ) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(v) / len(v) for key, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()


class GroupDPOTrainer(PreferenceTrainer):
    """Train a causal LM on groups of K scored or labelled responses per prompt (``grouppo.data``'s
    group records), with a GroupDPO loss (``grouppo.losses``)."""

    config_class = GroupDPOConfig
    args: GroupDPOConfig

    def _tokenize_records(self, records: Iterable[Mapping[str, Any]], source: str) -> list[dict[str, Any]]:
        """Normalize and label group records (``prepare_groups``), then tokenize each (``tokenize_group``)."""
        args = self.args
        groups, stats = prepare_groups(
            records, positive_rule=args.positive_rule, skip_invalid=args.skip_invalid_groups, source=source
        )
        rows, too_long = [], 0
        for group in groups:
            row = tokenize_group(
                group, self._tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length
            )
            if row is None:
                too_long += 1
            else:
                rows.append(row)
        if stats.skipped or too_long:
            logger.warning(
                "%s: %d of %d groups skipped as invalid, %d dropped because the prompt fills max_length=%s",
                source, stats.skipped, stats.records, too_long, args.max_length,
            )  # fmt: skip
        return rows

    def _loss(
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
