"""The base every grouppo trainer shares: ``PreferenceConfig`` and ``PreferenceTrainer``.

A ``PreferenceTrainer`` loads the model, tokenizer and PEFT adapter, turns its datasets into tokenized
groups, keeps the reference (``grouppo.reference.Reference``), scores the responses of each batch
(``grouppo.decoupled.group_logps``: prompt shared, decoupled backward), computes the loss, logs metrics the
way TRL does, refuses to save non-finite weights and writes a model card. A trainer is made by filling in
its public extension points, and nothing else:

* ``read_records(dataset, source)``: data in any format the trainer reads, as validated records of its
  schema (a bad record raises ``DataError`` naming its file and line); it runs before the tokenizer
  and the model load;
* ``tokenize_records(records, source)``: such records as tokenized groups (``grouppo.tokenize``);
* ``prepare_dataset(records, source)``: what the trainer iterates (default: the tokenized groups, as a
  ``datasets.Dataset``);
* ``make_collator()``: the data collator (default: ``grouppo.collate.GroupCollator``);
* ``reference_rows``: a function of a batch giving the rows the reference scores (default None: all);
* ``objective(logps, ref_logps, batch)``: the loss and its metrics, a pure function of ``grouppo.losses``;
* ``card_method`` and ``card_settings``: the method's name and the settings its model card lists.

``log_metric(key, value)`` adds a value to the next logged averages, and ``score(model, batch)`` gives
the per-row log-probs with the run's chunking and precision. ``grouppo.groupdpo.GroupDPOTrainer``,
``grouppo.gdpo.GDPOTrainer`` and ``grouppo.online.OnlineGroupDPOTrainer`` are built so.

One concern, the machinery every trainer shares, hence the file's size: the config and its checks, the
trainer and its step, the guard against non-finite steps and saving.
"""

from __future__ import annotations

import atexit
import logging
import math
import numbers
import os
import shutil
import signal
import tempfile
from abc import ABCMeta, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from grouppo.card import model_card
from grouppo.collate import GroupCollator, select_groups, sequence_tokens, to_device
from grouppo.data import DataError
from grouppo.decoupled import Scorer
from grouppo.engines import describe_engine, sharding_engine
from grouppo.environment import interactive, quiet_start
from grouppo.logps import DEFAULT_LOGITS_CHUNK_SIZE
from grouppo.losses import token_metrics
from grouppo.models import ensure_pad_token, load_model, load_tokenizer
from grouppo.reference import Reference, data_digest, default_cache_dir
from grouppo.runs import (
    MarkCheckpoint,
    RunLock,
    StopOnSignal,
    TrainingInterrupted,
    check_same_run,
    digest,
    latest_complete_checkpoint,
    tied_weights_resume,
)

logger = logging.getLogger(__name__)

TOKENIZED_COLUMNS = ("prompt_ids", "response_ids", "labels", "scores")


@dataclass
class PreferenceConfig(TrainingArguments):
    """What every grouppo trainer shares: the implicit reward's beta, the scoring path (prompt sharing,
    decoupled backward, chunked LM head), truncation and the reference. ``GroupDPOConfig`` and
    ``grouppo.gdpo.GDPOConfig`` add their objectives."""

    learning_rate: float = field(
        default=1e-6,
        metadata={
            "help": "Initial learning rate, as TRL's DPOConfig (transformers' default is 5e-5, 50x more: far "
            "too much for a preference objective on a pretrained model)."
        },
    )
    logging_steps: float = field(
        default=10,
        metadata={"help": "Log every N optimizer steps, as TRL's DPOConfig (transformers' default is 500)."},
    )
    beta: float = field(default=0.1, metadata={"help": "Inverse temperature of the implicit reward (> 0)."})
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
    resume_with_changes: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint even when the run differs from the one that wrote it (another "
            "model, data, objective or hyper-parameter); the differences are logged. Default: refused."
        },
    )
    special_tokens_in_text: bool = field(
        default=False,
        metadata={
            "help": "Tokenize a special token's string inside a prompt or response (e.g. '<|im_end|>' in a "
            "user message) as that control token. Default: text is text; records that spell one are "
            "counted in a warning."
        },
    )
    precompute_ref_logps: bool = field(
        default=False,
        metadata={
            "help": "Compute reference log-probs once before training (no reference model kept in memory)."
        },
    )
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "TRL's name of precompute_ref_logps (an alias: either works)."}
    )
    pad_token: str | None = field(
        default=None,
        metadata={"help": "The tokenizer's pad token (TRL's option; default: its own, else EOS)."},
    )
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={"help": "Groups per batch of the reference precompute (TRL's option; default: "
                  "per_device_eval_batch_size)."},
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
    max_nonfinite_steps: int = field(
        default=5,
        metadata={
            "help": "A step whose loss or gradient is not finite is skipped (no update) and counted "
            "(nonfinite_skipped_steps in the logs); this many in a row stop training with an error."
        },
    )

    def _bounds(self) -> list[tuple[str, bool, str]]:
        """(field, whether its value is acceptable, what is accepted) for every checked field."""
        return [
            ("beta", in_range(self.beta), "a finite number > 0 (<= 0 inverts or zeroes the objective)"),
            ("response_chunk_size", count_or_none(self.response_chunk_size), "an integer >= 1, or None"),
            ("no_grad_chunk_size", count_or_none(self.no_grad_chunk_size), "an integer >= 1, or None"),
            ("logits_chunk_size", count_or_none(self.logits_chunk_size, none=False), "an integer >= 1"),
            ("max_length", count_or_none(self.max_length), "an integer >= 1, or None"),
            ("max_prompt_length", count_or_none(self.max_prompt_length, low=0), "an integer >= 0, or None"),
            ("max_nonfinite_steps", count_or_none(self.max_nonfinite_steps, none=False), "an integer >= 1"),
        ]

    def __post_init__(self) -> None:
        if fsdp_version(self) == 1:
            raise ValueError(
                "FSDP version 1 is not supported: grouppo's sharded paths (the same calls on every "
                "process whatever its groups hold, the sharded reference, copying weights between sharded "
                "models) are built and tested for FSDP2 and DeepSpeed ZeRO-3, and do not handle FSDP1's "
                "flat parameters. Use FSDP2: fsdp_version: 2 in the accelerate config (accelerate takes "
                "version 1 when the key is missing), or fsdp_config={'version': 2}."
            )
        self.precompute_ref_logps = self.precompute_ref_logps or self.precompute_ref_log_probs
        if not torch.accelerator.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for; torch would warn at every loader
            # transformers refuses bf16 without a GPU unless told the run is on the CPU: it is (one process
            # or DDP; FSDP and DeepSpeed need an accelerator), and a CPU with native bfloat16 (AVX-512
            # BF16, AMX) runs bf16 autocast well.
            if not (self.fsdp or self.deepspeed):
                self.use_cpu = self.use_cpu or self.bf16 or self.bf16_full_eval
        for name, ok, accepted in self._bounds():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected {accepted}")
        super().__post_init__()


def fsdp_version(args: TrainingArguments) -> int | None:
    """The FSDP version a run will use, or None without FSDP: transformers' ``fsdp``/``fsdp_config``
    (version 2 unless set), else what ``accelerate launch`` puts in the environment for an FSDP config
    (``FSDP_VERSION``, which accelerate reads as 1 when absent)."""
    if args.fsdp:
        config = args.fsdp_config if isinstance(args.fsdp_config, dict) else {}
        return int(config.get("version", config.get("fsdp_version", 2)))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def in_range(value: Any, low: float = 0.0, strict: bool = True) -> bool:
    """A real number (not a bool), finite, and > low (>= low when not strict): config checks."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        return False
    return value > low if strict else value >= low


def count_or_none(value: Any, low: int = 1, none: bool = True) -> bool:
    """An integer (not a bool) >= low, or None where allowed."""
    if value is None:
        return none
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


def require_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` if needed and check a file can be written in it, before any work is done there."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".grouppo-write-check-"):
            pass
    except OSError as error:
        raise PermissionError(
            f"output_dir {str(path)!r} cannot be written ({error.strerror or error}); "
            "choose another output_dir"
        ) from error
    return folder


class NonFiniteGuard(TrainerCallback):
    """Skips the optimizer step when a micro-batch's loss or any gradient is not finite, counts it, and
    stops training after ``max_nonfinite_steps`` bad steps in a row.

    Under DDP the gradients are the all-reduced ones and the decision is agreed across processes, so every
    process skips the same steps. Skipping drops the gradients (the optimizer leaves every parameter and its
    state as they are); the learning-rate schedule moves on, as with mixed precision's skipped steps. Under
    DeepSpeed the engine owns the step: the bad steps are counted and stop the run, but not skipped here.
    """

    def __init__(self, trainer: PreferenceTrainer) -> None:
        self.trainer = trainer
        self.skipped = 0
        self.in_a_row = 0
        self.skipped_at_last_log = 0
        self.step_at_last_log = 0
        self._bad_loss = False

    def see_loss(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            self._bad_loss = True

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        local = self._bad_loss or not all(bool(torch.isfinite(_local(g)).all()) for g in grads)
        self._bad_loss = False
        flag = torch.tensor(float(local), device=trainer.accelerator.device)
        if trainer.accelerator.reduce(flag, reduction="sum").item() == 0:
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        for p in trainer.model.parameters():
            p.grad = None
        logger.warning(
            "step %d: the loss or a gradient is not finite; the update is skipped (%d in a row, %d in all)",
            state.global_step + 1,
            self.in_a_row,
            self.skipped,
        )
        if self.in_a_row >= args.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self.in_a_row} steps in a row had a non-finite loss or gradient (max_nonfinite_steps="
                f"{args.max_nonfinite_steps}); training stopped at step {state.global_step}. Usual causes: a "
                "learning rate too high, NaN or infinite weights in the input model, scores or reference "
                "log-probs that are not finite. Nothing was saved after the last good step."
            )


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) gradient's local shard, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _is_tokenized(dataset: Any) -> bool:
    return isinstance(dataset, Dataset) and set(TOKENIZED_COLUMNS) <= set(dataset.column_names)


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class PreferenceTrainer(Trainer, metaclass=ABCMeta):
    """What every grouppo trainer shares (see the module docstring); a trainer fills in the extension points.

    ``model`` and ``ref_model`` may be Hub names, local paths or modules. The reference is, in order:
    ``ref_model``; with ``peft_config`` and no ``ref_model``, the base model with the adapter disabled;
    with ``precompute_ref_logps``, the initial policy (scored once, before training); otherwise a frozen
    copy of the initial policy. Datasets hold records (each trainer's schema) or already tokenized groups.
    """

    config_class: type[PreferenceConfig] = PreferenceConfig
    args: PreferenceConfig
    card_method: str = "preference optimization"
    run_settings: tuple[str, ...] = (
        "beta", "learning_rate", "lr_scheduler_type", "weight_decay", "per_device_train_batch_size",
        "gradient_accumulation_steps", "max_length", "max_prompt_length", "seed", "special_tokens_in_text",
    )  # fmt: skip
    """The settings that define a run: resuming with any of them changed is refused (``grouppo.runs``)."""
    card_settings: tuple[str, ...] = (
        "beta",
        "learning_rate",
        "num_train_epochs",
        "max_steps",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "response_chunk_size",
        "max_length",
        "precompute_ref_logps",
        "seed",
    )

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
        quiet_start()
        args = args or self.config_class(output_dir=f"grouppo-{type(self).__name__.lower()}")
        require_writable_dir(args.output_dir)
        # One run per output_dir, from before anything loads to the end of the process (grouppo.runs).
        self.run_lock = RunLock(args.output_dir)
        if args.process_index == 0:
            self.run_lock.acquire()
            atexit.register(self.run_lock.release)
        name = model if isinstance(model, str) else model.config._name_or_path
        self.args = args  # the extension points read it; Trainer.__init__ sets it again
        self.base_model_name = name
        # The data is read and checked first, then the tokenizer loads and tokenizes it, then the model
        # loads: a data error comes before anything is loaded.
        origin = getattr(train_dataset, "source", None) or "a dataset given in Python"
        self.data_sources = {"train": origin, "eval": getattr(eval_dataset, "source", None) or "eval"}
        train_records = self._read(train_dataset, "train")
        if isinstance(eval_dataset, Mapping):
            eval_records = {k: self._read(v, f"eval/{k}") for k, v in eval_dataset.items()}
        else:
            eval_records = self._read(eval_dataset, "eval")
        processing_class = processing_class or load_tokenizer(name)
        if args.pad_token is not None:
            processing_class.pad_token = args.pad_token
        self.processing_class = ensure_pad_token(processing_class)
        train_dataset = self.prepare_dataset(train_records, "train")
        if isinstance(eval_records, Mapping):
            eval_dataset = {k: self.prepare_dataset(v, f"eval/{k}") for k, v in eval_records.items()}
        else:
            eval_dataset = self.prepare_dataset(eval_records, "eval")
        if train_dataset is not None:
            unit = "groups" if isinstance(train_dataset, Dataset) else "records"
            self.data_description = f"{len(train_dataset)} training {unit} from {origin}"
        model = load_model(model, **(args.model_init_kwargs or {}))
        if peft_config is not None:
            from peft import get_peft_model

            set_seed(args.seed)  # the adapter's random initialisation, before Trainer seeds the run
            model = get_peft_model(model, peft_config)
        reference = Reference(
            model,
            None if ref_model is None else load_model(ref_model, **(args.model_init_kwargs or {})),
            adapter=peft_config is not None,
            precompute=args.precompute_ref_logps,
        )
        if args.disable_dropout:
            for m in (model, reference.model):
                if m is not None:
                    _disable_dropout(m)
        super().__init__(
            model=model,
            args=args,
            data_collator=self.make_collator(),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=self.processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        # compute_loss returns a per-micro-batch mean: let Trainer scale it for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        # The values of each key to average into the next log (TRL's ``_metrics`` shape), and their weights.
        Store = dict[str, dict[str, list[float]]]
        self.logged: Store = {mode: defaultdict(list) for mode in ("train", "eval")}
        self.logged_weights: Store = {mode: defaultdict(list) for mode in ("train", "eval")}
        if not args.disable_tqdm and not interactive():
            # A log file gets one line per log, not a carriage-return bar.
            self.remove_callback(ProgressCallback)
            self.add_callback(PrinterCallback)
        self.nonfinite = NonFiniteGuard(self)
        self.add_callback(self.nonfinite)
        self.stop = StopOnSignal(agree=self._agreed_max if self.accelerator.num_processes > 1 else None)
        self.add_callback(self.stop)
        self.mark = MarkCheckpoint(extras=self.save_checkpoint_extras)
        self.add_callback(self.mark)
        self.reference = reference
        self.scorer = Scorer(
            response_chunk_size=args.response_chunk_size, no_grad_chunk_size=args.no_grad_chunk_size,
            share_prompt=args.share_prompt, logits_chunk_size=args.logits_chunk_size,
            precision=self.accelerator.autocast,
        )  # fmt: skip
        reference.prepare(self.accelerator, score=self.scorer, rows=self.reference_rows)
        if args.precompute_ref_logps:
            cache = (args.ref_logps_cache_dir or default_cache_dir()) if args.ref_logps_cache else None

            def precompute(dataset: Dataset | None) -> Dataset | None:
                return reference.precompute(
                    dataset,
                    collator=self.data_collator,
                    batch_size=args.precompute_ref_batch_size or args.per_device_eval_batch_size,
                    cache_dir=cache,
                    progress=not args.disable_tqdm,
                )

            with reference.precomputing():
                self.train_dataset = precompute(self.train_dataset)
                if isinstance(self.eval_dataset, dict):
                    self.eval_dataset = {k: precompute(v) for k, v in self.eval_dataset.items()}
                else:
                    self.eval_dataset = precompute(self.eval_dataset)

    def describe_setup(self) -> str:
        """The engine, the processes and the reference, and how it is held, in words (the CLI prints it)."""
        reference = self.reference.describe()
        if self.reference.model is not None:
            held = "sharded like the policy" if sharding_engine(self.accelerator) else "a replica per process"
            reference = f"{reference}, {held}"
        return f"{describe_engine(self.accelerator)}; reference: {reference}"

    @property
    def ref_model(self) -> torch.nn.Module | None:
        """The reference model, when the reference keeps one (TRL's attribute)."""
        return self.reference.model

    # ------------------------------------------------------------------ extension points
    def read_records(self, dataset: Iterable[Mapping[str, Any]], source: str) -> list[Mapping[str, Any]]:
        """Data as records of this trainer's schema (default: as given; a trainer that reads other
        formats converts them here)."""
        return dataset if isinstance(dataset, list) else list(dataset)

    @abstractmethod
    def tokenize_records(self, records: Iterable[Mapping[str, Any]], source: str) -> list[dict[str, Any]]:
        """Validate records of this trainer's schema and tokenize them: one row per trainable group."""

    def prepare_dataset(self, records: Any, source: str) -> Any:
        """What the trainer iterates for the records ``read_records`` returned: tokenized, as a ``Dataset``
        (an already tokenized ``Dataset`` passes through)."""
        if records is None or _is_tokenized(records):
            return records
        rows = self.tokenize_records(records, source)
        if not rows:
            where = getattr(self, "data_sources", {}).get(source, source)
            raise DataError(
                f"{where}: no trainable group left: every prompt fills max_length={self.args.max_length} "
                "tokens; raise max_length, or set max_prompt_length to cut prompts"
            )
        return Dataset.from_list(rows)

    def _read(self, dataset: Any, source: str) -> Any:
        if dataset is None or _is_tokenized(dataset):
            return dataset
        # Records read from a file carry its name, which their errors give rather than ``source``.
        records = self.read_records(dataset, source)
        if not records:
            raise DataError(f"{getattr(dataset, 'source', None) or source}: no records to train on")
        return records

    def warn_special_tokens(self, records: list[Any], fields: tuple[str, ...], source: str) -> None:
        """Count the records whose ``fields`` spell one of the tokenizer's special tokens, and say how they
        are tokenized (as text by default; ``special_tokens_in_text``: as control tokens)."""
        from grouppo.tokenize import special_strings, spells_special_tokens

        tokenizer = self.processing_class

        def spelled(record: Any) -> bool:
            values = [record.get(f) for f in fields]
            texts = [t for v in values for t in (v if isinstance(v, list) and v and not isinstance(v[0], dict)
                                                 else [v]) if t]  # fmt: skip
            return any(spells_special_tokens(t, tokenizer) for t in texts)

        holding = sum(spelled(r) for r in records)
        if holding:
            how = (
                "as control tokens (special_tokens_in_text=True)"
                if self.args.special_tokens_in_text
                else "as plain text; set special_tokens_in_text=True to read them as control tokens"
            )
            logger.warning(
                "%s: %d of %d records spell special tokens of the tokenizer (%s) in their text; tokenized %s",
                source, holding, len(records), ", ".join(special_strings(tokenizer)[:4]), how,
            )  # fmt: skip

    def make_collator(self) -> Any:
        """The data collator of the training and evaluation batches."""
        return GroupCollator(pad_token_id=self.processing_class.pad_token_id)

    reference_rows: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
    """Which rows of a batch the reference scores: a function of the batch giving a bool mask (its rows
    left out get 0), or None for all. A function of the batch layout, not of the trainer."""

    @abstractmethod
    def objective(
        self, logps: torch.Tensor, ref_logps: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective from the batch's per-row log-probs: loss and detached metrics."""

    def log_metric(self, key: str, value: float, mode: str = "train", weight: float = 1.0) -> None:
        """Add ``value`` to the values of ``key`` averaged into the next log (``mode``: train or eval),
        with ``weight`` in that average (evaluation: the batch's groups)."""
        self.logged[mode][key].append(float(value))
        self.logged_weights[mode][key].append(float(weight))

    # ------------------------------------------------------------------ the step
    def score(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        stat_sums: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Per-row log-probs of ``batch`` under ``model`` (policy or reference), in the run's chunks and
        precision (``grouppo.decoupled.Scorer``); ``stat_sums`` receives each row's summed token statistics
        (``grouppo.logps.TOKEN_STATS``)."""
        return self.scorer(model, batch, stat_sums)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
        mode = "train" if model.training else "eval"
        # A placeholder batch (a process with nothing to train on this step) runs every call with weight 0.
        weight = 0.0 if "placeholder" in inputs else 1.0
        # Training metrics are the mean over processes of each one's batch figures; evaluation ones weigh
        # each batch by its groups, so that they do not depend on how the groups are batched.
        share = weight * (inputs["prompt_ids"].shape[0] if mode == "eval" else 1.0)
        ref_logps = self.reference.logps(inputs)
        stat_sums: list[torch.Tensor] = []
        logps = self.score(model, inputs, stat_sums)
        loss, metrics = self.objective(logps, ref_logps.to(logps.dtype), inputs)
        metrics.update(token_metrics(inputs, stat_sums[0] if stat_sums else None))
        loss = loss * weight
        # One reduce per step on every process: the metrics' weighted sums, the batch's tokens and the
        # weights' sum (training: the processes that had a batch; evaluation: their groups).
        tokens = float(sequence_tokens(inputs).sum())
        values = [*(value * share for value in metrics.values()), tokens * weight, share]
        values = self.accelerator.reduce(torch.tensor(values, device=logps.device), reduction="sum")
        if mode == "train":
            self.state.num_input_tokens_seen += int(values[-2].item())
        if values[-1] > 0:
            across = float(values[-1]) if mode == "eval" else 1.0  # evaluation: the batch's groups
            for key, value in zip(metrics, (values[:-2] / values[-1]).tolist(), strict=True):
                self.log_metric(key, value, mode, weight=across)
        return (loss, metrics) if return_outputs else loss

    def training_step(
        self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite.see_loss(loss)
        return loss

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: Any = None,
    ) -> tuple[torch.Tensor, None, None]:
        inputs = to_device(inputs, self.args.device)
        groups = inputs["prompt_ids"].shape[0]
        unrepeated = self.unrepeated_groups(groups)
        if unrepeated < groups:  # the rest repeat groups to even out the processes' last batches
            inputs = select_groups(inputs, max(1, unrepeated))
            if unrepeated == 0:  # all repeats: run the same calls as the other processes, at weight 0
                inputs["placeholder"] = torch.ones(1, dtype=torch.long, device=self.args.device)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def unrepeated_groups(self, groups: int) -> int:
        """How many of this process's ``groups`` evaluation groups are not repeats. accelerate gives every
        process a full last batch, repeating groups from the start of the set, and ``gather_for_metrics``
        keeps the first ``remainder`` groups of the processes' batches in process order; the same groups
        are kept here, so that each evaluation group counts once (``eval_loss`` too: transformers gathers
        it per group with ``gather_for_metrics``, except under accelerate's ``split_batches``, where it
        repeats each process's loss by the whole batch's size). Without ``even_batches`` nothing repeats."""
        state = self.accelerator.gradient_state
        if not state.end_of_dataloader or state.remainder <= 0 or not self.accelerator.even_batches:
            return groups
        return min(groups, max(0, state.remainder - self.accelerator.process_index * groups))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {}
        for key, values in self.logged[mode].items():
            weights = self.logged_weights[mode][key]
            if values and sum(weights) > 0:
                metrics[key] = sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        if mode == "train":
            metrics["num_tokens"] = float(self.state.num_input_tokens_seen)
            metrics["nonfinite_skipped_steps"] = self.nonfinite.skipped
            if "loss" in logs:  # a step log: say which of its steps were skipped, never show them as loss 0
                skipped = self.nonfinite.skipped - self.nonfinite.skipped_at_last_log
                steps = self.state.global_step - self.nonfinite.step_at_last_log
                self.nonfinite.skipped_at_last_log = self.nonfinite.skipped
                self.nonfinite.step_at_last_log = self.state.global_step
                metrics["skipped_steps"] = skipped
                if skipped and skipped >= steps:
                    logs["loss"] = float("nan")  # no step of this window was taken
        logs.update(metrics)
        super().log(logs, start_time)
        self.logged[mode].clear()
        self.logged_weights[mode].clear()

    # ------------------------------------------------------------------ a run
    def run_record(self) -> dict[str, Any]:
        """What defines this run (``grouppo.runs``): compared with a checkpoint's record on resume."""
        data = self.train_dataset
        if isinstance(data, Dataset):
            fingerprint = digest([data_digest(data), data["labels"]])
        else:
            fingerprint = digest(getattr(data, "records", None) or [])
        settings = {name: getattr(self.args, name, None) for name in self.run_settings}
        return {
            "trainer": type(self).__name__,
            "model": self.base_model_name,
            "reference": self.reference.describe(),
            "data": fingerprint,
            **settings,
        }

    def resolve_checkpoint(self, value: str | bool | None) -> str | None:
        """The checkpoint ``resume_from_checkpoint`` names: None, the newest complete ``checkpoint-N`` of
        output_dir (``True``; incomplete ones, cut short by a kill or a full disk, are skipped and said), or
        the folder given, which must be a complete checkpoint."""
        if value is None or value is False:
            return None
        if value is True:
            found, skipped = latest_complete_checkpoint(self.args.output_dir)
            if skipped:
                logger.warning(
                    "skipping incomplete checkpoints (their save was cut short): %s", ", ".join(skipped)
                )
            if found is None:
                raise ValueError(
                    f"no complete checkpoint to resume from in output_dir {self.args.output_dir!r}"
                )
            if self.args.should_log:
                print(f"resuming from {found}, the newest complete checkpoint", flush=True)
            return found
        return str(value)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """``Trainer.train``, as one run (its output_dir locked against a second run since the trainer was
        made): a resumed checkpoint checked to be complete and of the same run, SIGINT and SIGTERM turned
        into "save, then stop" (``TrainingInterrupted``), each checkpoint marked complete (grouppo.runs)."""
        checkpoint = self.resolve_checkpoint(resume_from_checkpoint)
        record = self.run_record()
        if checkpoint is not None:
            check_same_run(checkpoint, record, self.args.resume_with_changes)
        self.mark.record = record
        with self.stop.installed(), tied_weights_resume(self.model):
            result = super().train(resume_from_checkpoint=checkpoint, **kwargs)
        if self.stop.signum is not None:
            name = signal.Signals(self.stop.signum).name
            saved = f"{self.args.output_dir}/{PREFIX_CHECKPOINT_DIR}-{self.stop.stopped_at}"
            raise TrainingInterrupted(
                f"training stopped by {name} at step {self.stop.stopped_at}; checkpoint saved to {saved}; "
                "resume with the same command and --resume_from_checkpoint true",
                self.stop.signum, saved,
            )  # fmt: skip
        return result

    def save_checkpoint_extras(self, folder: Path) -> None:
        """What this trainer saves into a checkpoint beside transformers' files (every process calls it;
        default: nothing). The checkpoint is marked complete after it."""

    def _agreed_max(self, flag: int) -> int:
        value = torch.tensor([flag], device=self.accelerator.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return int(value.item())

    # ------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as transformers does, refusing a model with non-finite weights, and write a model card.
        Under FSDP with a sharded state dict the weights are gathered and written whole (transformers
        would write none)."""
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p.detach()).all()]
        if bad:
            raise FloatingPointError(
                f"not saving to {output_dir or self.args.output_dir}: {len(bad)} parameter tensors hold NaN "
                f"or infinite values (first: {bad[0]}); lower learning_rate, check the input model and data"
            )
        if _internal_call:  # a checkpoint: grouppo marks it complete once transformers has written it
            super().save_model(output_dir, _internal_call)
            return
        # The final model goes to a staging folder first, then into output_dir file by file (a rename
        # each): a save cut short (a full disk) leaves output_dir as it was, never a config without weights.
        target = Path(output_dir or self.args.output_dir)
        staging = target / ".grouppo-saving"
        try:
            plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
            if plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
                # With a sharded state dict transformers writes no weights here (its checkpoints hold them
                # as shards): gather them, so that what save_model saved loads with from_pretrained.
                self._save(str(staging), state_dict=self.accelerator.get_state_dict(self.model))
            else:
                super().save_model(str(staging), _internal_call)
            if self.args.should_save:
                for path in staging.iterdir():
                    os.replace(path, target / path.name)
                staging.rmdir()
        except OSError as error:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            last, _ = latest_complete_checkpoint(self.args.output_dir)
            kept = f"; the last complete checkpoint is {last}" if last else ""
            raise OSError(
                f"saving the model to {target} failed ({error.strerror or error}); nothing was written "
                f"there{kept}"
            ) from error
        if self.args.should_save:
            self.create_model_card(output_dir=output_dir)

    def create_model_card(self, output_dir: str | None = None, **kwargs: Any) -> None:
        """Write ``README.md`` (base model, data, method, key settings, final metrics) into ``output_dir``
        (default: the run's); ``push_to_hub`` calls it before uploading, as TRL's trainers do."""
        path = Path(output_dir or self.args.output_dir) / "README.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(model_card(self, model_name=kwargs.get("model_name")), encoding="utf-8")
