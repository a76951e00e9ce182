"""``GroupDPOConfig`` and ``GroupDPOTrainer``: group-wise DPO on transformers' Trainer, in TRL's conventions.

The trainer only wires components together: ``grouppo.data`` normalizes and labels records,
``grouppo.collate`` tokenizes and pads them, ``grouppo.decoupled.group_logps`` scores the responses
(prompt shared, decoupled backward), ``grouppo.losses.group_dpo_loss`` computes loss and metrics.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Trainer, TrainingArguments

from grouppo import refcache
from grouppo.collate import GroupCollator, tokenize_group
from grouppo.data import POSITIVE_RULES, prepare_groups
from grouppo.decoupled import group_logps
from grouppo.logps import DEFAULT_LOGITS_CHUNK_SIZE
from grouppo.losses import LOSSES, GroupBatch, group_dpo_loss

logger = logging.getLogger(__name__)

TOKENIZED_COLUMNS = ("prompt_ids", "response_ids", "labels", "scores")


@dataclass
class PreferenceConfig(TrainingArguments):
    """What every grouppo trainer shares: the implicit reward's beta, the scoring path (prompt sharing,
    decoupled backward, chunked LM head), truncation and the reference. ``GroupDPOConfig`` and
    ``grouppo.gdpo.GDPOConfig`` add their objectives."""

    beta: float = field(default=0.1, metadata={"help": "Inverse temperature of the implicit reward."})
    group_chunk_size: int | None = field(
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
            "keep no activations, so bigger chunks run faster for little memory. None: 4 x group_chunk_size."
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

    def __post_init__(self) -> None:
        if self.group_chunk_size is not None and self.group_chunk_size < 1:
            raise ValueError(f"group_chunk_size must be >= 1 or None, got {self.group_chunk_size}")
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
        if self.loss_type not in LOSSES:
            raise ValueError(f"loss_type={self.loss_type!r}; expected one of {sorted(LOSSES)}")
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


class GroupDPOTrainer(Trainer):
    """Train a causal LM on groups of K scored or labelled responses per prompt.

    ``model`` and ``ref_model`` may be Hub names, local paths or modules. The reference is, in order:
    ``ref_model``; with ``peft_config`` and no ``ref_model``, the base model with the adapter disabled;
    with ``precompute_ref_logps``, the initial policy (scored once, before training); otherwise a frozen
    copy of the initial policy. Datasets hold group records (see ``grouppo.data``) or already
    tokenized groups.
    """

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: str | PreTrainedModel | None = None,
        args: GroupDPOConfig | None = None,
        train_dataset: Dataset | Iterable[Mapping[str, Any]] | None = None,
        eval_dataset: Dataset | Iterable[Mapping[str, Any]] | None = None,
        processing_class: Any = None,
        peft_config: Any = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
    ) -> None:
        args = args or GroupDPOConfig(output_dir="grouppo-output")
        name = model if isinstance(model, str) else model.config._name_or_path
        model = _load_model(model, args.model_init_kwargs)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(name)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if ref_model is not None:
            ref_model = _load_model(ref_model, args.model_init_kwargs)
        elif peft_config is None and not args.precompute_ref_logps:
            ref_model = copy.deepcopy(model)
        if args.disable_dropout:
            for m in (model, ref_model):
                if m is not None:
                    _disable_dropout(m)
        self._tokenizer = processing_class
        train_dataset = self._prepare_dataset(train_dataset, "train", args)
        if isinstance(eval_dataset, Mapping):
            eval_dataset = {k: self._prepare_dataset(v, f"eval/{k}", args) for k, v in eval_dataset.items()}
        else:
            eval_dataset = self._prepare_dataset(eval_dataset, "eval", args)
        super().__init__(
            model=model,
            args=args,
            data_collator=GroupCollator(pad_token_id=processing_class.pad_token_id),
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
        self.ref_model = None
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        if args.precompute_ref_logps:
            self.train_dataset = self._with_ref_logps(self.train_dataset)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._with_ref_logps(v) for k, v in self.eval_dataset.items()}
            else:
                self.eval_dataset = self._with_ref_logps(self.eval_dataset)

    # ------------------------------------------------------------------ data
    def _prepare_dataset(
        self, dataset: Dataset | Iterable[Mapping[str, Any]] | None, name: str, args: GroupDPOConfig
    ) -> Dataset | None:
        """Normalize, label and tokenize group records (already tokenized datasets pass through)."""
        if dataset is None:
            return None
        if isinstance(dataset, Dataset) and set(TOKENIZED_COLUMNS) <= set(dataset.column_names):
            return dataset
        rows = self._tokenize_records(dataset, name, args)
        if not rows:
            raise ValueError(f"{name}: no trainable group left")
        return Dataset.from_list(rows)

    def _tokenize_records(
        self, dataset: Iterable[Mapping[str, Any]], name: str, args: GroupDPOConfig
    ) -> list[dict[str, Any]]:
        """Normalize, label and tokenize group records: one row per trainable group."""
        records, stats = prepare_groups(
            dataset, positive_rule=args.positive_rule, skip_invalid=args.skip_invalid_groups, source=name
        )
        rows, too_long = [], 0
        for record in records:
            row = tokenize_group(
                record, self._tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length
            )
            if row is None:
                too_long += 1
            else:
                rows.append(row)
        if stats.skipped or too_long:
            logger.warning(
                "%s: %d of %d groups skipped as invalid, %d dropped because the prompt fills max_length=%s",
                name, stats.skipped, stats.records, too_long, args.max_length,
            )  # fmt: skip
        return rows

    def _with_ref_logps(self, dataset: Dataset | None) -> Dataset | None:
        """Add a ``ref_logps`` column (one float per response), computed once with the reference, or read
        from the on-disk cache. The main process computes first; the others then find its cache file."""
        if dataset is None or "ref_logps" in dataset.column_names:
            return dataset
        path = None
        if self.args.ref_logps_cache:
            reference = self.accelerator.unwrap_model(self.ref_model or self.model)
            cache_dir = self.args.ref_logps_cache_dir or refcache.default_cache_dir()
            path = refcache.cache_path(cache_dir, reference, dataset)
        with self.accelerator.main_process_first():
            values = refcache.load(path, dataset) if path else None
            if values is not None:
                logger.info("reference log-probs of %d groups read from %s", len(values), path)
            else:
                values = self._compute_ref_logps(dataset)
                if path and self.accelerator.is_main_process:
                    refcache.save(path, values)
        return dataset.add_column("ref_logps", values)

    def _compute_ref_logps(self, dataset: Dataset) -> list[list[float]]:
        loader = DataLoader(
            dataset,
            batch_size=self.args.per_device_eval_batch_size,
            collate_fn=self.data_collator,
            shuffle=False,
        )
        values: list[list[float]] = []
        for batch in loader:
            batch = self._prepare_inputs(batch)
            logps = self._reference_logps(batch, initial_policy=True).cpu()
            sizes = torch.bincount(batch["group_index"].cpu()).tolist()
            values.extend(part.tolist() for part in logps.split(sizes))
        return values

    # ------------------------------------------------------------------ scoring
    def _logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # accelerate applies mixed precision by wrapping ``model.forward``, which scoring replaces
        # (``call_as_forward``), so the autocast of ``bf16``/``fp16`` is entered here instead.
        args = self.args
        chunk = args.group_chunk_size
        if not torch.is_grad_enabled():
            chunk = args.no_grad_chunk_size or (4 * chunk if chunk else None)
        with self.accelerator.autocast():
            return group_logps(
                model,
                batch,
                group_chunk_size=chunk,
                share_prompt=args.share_prompt,
                logits_chunk_size=args.logits_chunk_size,
            )

    @torch.no_grad()
    def _reference_logps(self, batch: dict[str, torch.Tensor], initial_policy: bool = False) -> torch.Tensor:
        """Reference log-probs: ``ref_model``, else the PEFT base with the adapter off, else (only while
        precomputing, before any step) the policy itself, which is then still the initial model."""
        if self.ref_model is not None:
            return self._logps(self.ref_model, batch)
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "disable_adapter"):
            reference = model.disable_adapter()
        elif initial_policy:
            reference = nullcontext()
        else:
            raise ValueError(
                "This batch has no precomputed `ref_logps` and the trainer keeps no reference model "
                "(precompute_ref_logps=True): pass datasets to the trainer's constructor so their reference "
                "log-probs are computed before training."
            )
        was_training = model.training
        model.eval()
        try:
            with reference:
                return self._logps(model, batch)
        finally:
            model.train(was_training)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
        mode = "train" if model.training else "eval"
        ref_logps = inputs["ref_logps"] if "ref_logps" in inputs else self._reference_logps(inputs)
        logps = self._logps(model, inputs)
        loss, metrics = self._loss(logps, ref_logps.to(logps.dtype), inputs)
        values = torch.tensor(list(metrics.values()), device=logps.device)
        values = self.accelerator.reduce(values, reduction="mean")
        for key, value in zip(metrics, values.tolist(), strict=True):
            self._metrics[mode][key].append(value)
        return (loss, metrics) if return_outputs else loss

    def _loss(
        self, logps: torch.Tensor, ref_logps: torch.Tensor, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective from the batch's per-response log-probs: loss and detached metrics."""
        return group_dpo_loss(
            GroupBatch(
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
