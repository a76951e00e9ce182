"""Online GroupDPO: sample K responses per prompt from the current policy, score, train on the group.

Each training step takes a batch of prompt records, samples ``num_generations`` completions per prompt
with the policy as it is now, scores them with the reward, labels positives and negatives with
``positive_rule``, and takes GroupDPOTrainer's group-loss step (the decoupled backward when
``response_chunk_size`` is set). Groups whose responses all scored the same carry no preference: they
are dropped and their share logged (``frac_reward_zero_std``, as TRL names it). The reference is the initial
model, optionally re-synced to the policy every ``ref_sync_steps`` steps.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset as TorchDataset

from grouppo.base import count_or_none, in_range
from grouppo.collate import GroupCollator, placeholder_batch
from grouppo.data import prepare_groups, prepare_prompt_records
from grouppo.engines import load_whole, save_whole
from grouppo.generation import DTYPES, SamplingConfig, make_generator, sampling_field
from grouppo.groupdpo import GroupDPOConfig, GroupDPOTrainer
from grouppo.online.rewards import RewardError, RewardTimeout, load_rewards, reward_name
from grouppo.online.rollout import RolloutStats, rollout

logger = logging.getLogger(__name__)

ONLINE_STATE = "online_state"  # per process, in each checkpoint: online_state_{rank}.json
REFERENCE_WEIGHTS = "reference.safetensors"


@dataclass
class OnlineGroupDPOConfig(GroupDPOConfig):
    """Configuration of ``OnlineGroupDPOTrainer``: GroupDPOConfig's fields plus sampling and rewards.

    ``per_device_train_batch_size`` counts prompts; each becomes a group of ``num_generations``.
    """

    max_completion_length: int | None = field(
        default=256, metadata={"help": "Maximum tokens of a sampled response (generation stops there)."}
    )
    num_generations: int = field(default=4, metadata={"help": "Responses sampled per prompt (K)."})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Another name of max_completion_length (transformers' name)."}
    )
    temperature: float = sampling_field("temperature")
    top_p: float = sampling_field("top_p")
    top_k: int = sampling_field("top_k")
    min_p: float | None = sampling_field("min_p")
    repetition_penalty: float = sampling_field("repetition_penalty")
    generation_batch_size: int = field(
        default=64,
        metadata={"help": "Sequences generated per generate call on each process (prompts x generations); "
                  "a memory knob: every step samples fresh groups for its own prompts."},
    )  # fmt: skip
    generation_dtype: str = field(
        default="auto",
        metadata={
            "help": "auto: bfloat16 where the hardware computes it natively (the samples are then "
            "slightly off-policy, as an inference engine's are), else the model's dtype; bfloat16, "
            "float32 or model force one.",
            "choices": list(DTYPES),
        },
    )
    generation_backend: str = field(
        default="transformers",
        metadata={"help": "transformers (model.generate) or vllm (optional extra, CUDA only).",
                  "choices": ["transformers", "vllm"]},
    )  # fmt: skip
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": "Rewards: built-in names (ifeval, ifeval_strict), module:function import paths, or "
                  "reward model names/paths. Used when the trainer is given no reward_funcs."},
    )  # fmt: skip
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward (default: all 1)."}
    )
    reward_timeout: float | None = field(
        default=600.0,
        metadata={"help": "Seconds one reward call may take before the run stops with an error naming it "
                  "(None: no limit)."},
    )  # fmt: skip
    max_reward_failures: int = field(
        default=3,
        metadata={"help": "Steps in a row whose rewards all failed (raised, returned the wrong number of "
                  "values or non-numbers, or no finite value for any group) before the run stops with an "
                  "error; such steps are skipped and counted (online/reward_failures)."},
    )  # fmt: skip
    ref_sync_steps: int | None = field(
        default=None,
        metadata={"help": "Copy the policy's weights into the reference every N optimizer steps (None: the "
                  "reference stays the initial model)."},
    )  # fmt: skip

    def _bounds(self) -> list[tuple[str, bool, str]]:
        return [
            *super()._bounds(),
            ("num_generations", count_or_none(self.num_generations, low=2, none=False),
             "an integer >= 2 (a group needs two responses)"),
            ("max_completion_length", count_or_none(self.max_completion_length, none=False),
             "an integer >= 1"),
            ("max_new_tokens", count_or_none(self.max_new_tokens), "an integer >= 1, or None"),
            ("temperature", in_range(self.temperature, strict=False), "a finite number >= 0 (0: greedy)"),
            ("top_p", in_range(self.top_p) and self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", count_or_none(self.top_k, low=0, none=False), "an integer >= 0 (0: all tokens)"),
            ("min_p", self.min_p is None or (in_range(self.min_p, strict=False) and self.min_p <= 1),
             "a number in [0, 1], or None"),
            ("repetition_penalty", in_range(self.repetition_penalty), "a number > 0 (1: none)"),
            ("generation_batch_size", count_or_none(self.generation_batch_size, none=False),
             "an integer >= 1"),
            ("ref_sync_steps", count_or_none(self.ref_sync_steps), "an integer >= 1, or None"),
            ("reward_timeout", self.reward_timeout is None or in_range(self.reward_timeout),
             "a number > 0, or None"),
            ("max_reward_failures", count_or_none(self.max_reward_failures, none=False), "an integer >= 1"),
        ]  # fmt: skip

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None:  # the alias: one length, under both names
            if self.max_completion_length not in (256, None, self.max_new_tokens):
                raise ValueError(
                    f"max_new_tokens={self.max_new_tokens} and max_completion_length="
                    f"{self.max_completion_length} are two names of one option; give one"
                )
            self.max_completion_length = self.max_new_tokens
        super().__post_init__()
        self.max_new_tokens = self.max_completion_length
        if self.precompute_ref_logps:
            raise ValueError(
                "precompute_ref_logps does not apply online: responses are sampled during training"
            )

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_completion_length,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            batch_size=self.generation_batch_size,
            seed=self.seed,
            dtype=self.generation_dtype,
        )


def sampling_metrics(parts: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """TRL's online metrics from each process's rollout (``rewards``, ``components``, ``lengths``,
    ``clipped``, ``prompts``, ``equal``, ``nonfinite``); NaN rewards (a reward's None) are left out."""

    def mean_std(values: list[float]) -> tuple[float, float]:
        finite = torch.tensor([v for v in values if math.isfinite(v)], dtype=torch.float64)
        if not len(finite):
            return float("nan"), float("nan")
        return finite.mean().item(), (finite.std().item() if len(finite) > 1 else 0.0)

    metrics: dict[str, float] = {}
    rewards = [v for p in parts for v in p["rewards"]]
    if rewards:
        metrics["reward"], metrics["reward_std"] = mean_std(rewards)
        for name in dict.fromkeys(n for p in parts for n in p["components"]):
            values = [v for p in parts for v in p["components"].get(name, [])]
            metrics[f"rewards/{name}/mean"], metrics[f"rewards/{name}/std"] = mean_std(values)
    prompts = sum(p["prompts"] for p in parts)
    if prompts:
        metrics["frac_reward_zero_std"] = sum(p["equal"] for p in parts) / prompts
    metrics["online/nonfinite_reward_groups"] = float(sum(p["nonfinite"] for p in parts))
    lengths = [n for p in parts for n in p["lengths"]]
    if lengths:
        clipped = [c for p in parts for c in p["clipped"]]
        ended = [n for n, c in zip(lengths, clipped, strict=True) if not c] or [0]
        metrics.update({
            "completions/mean_length": sum(lengths) / len(lengths),
            "completions/min_length": float(min(lengths)),
            "completions/max_length": float(max(lengths)),
            "completions/clipped_ratio": sum(clipped) / len(clipped),
            "completions/mean_terminated_length": sum(ended) / len(ended),
        })  # fmt: skip
    return metrics


class PromptDataset(TorchDataset):
    """Prompt records kept as Python objects (Arrow would merge the varied ``kwargs`` dicts)."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[index]


class OnlineGroupDPOTrainer(GroupDPOTrainer):
    """GroupDPO on groups sampled from the current policy at every step.

    ``train_dataset`` holds prompt records (``prompt`` plus the fields the rewards read). ``reward_funcs``
    is a reward callable ``(prompts, completions, **fields) -> list[float]``, a spec string or a list of
    them (see ``grouppo.online.rewards.load_rewards``), weighted by ``args.reward_weights``. ``eval_dataset``,
    when given, holds group records and is evaluated as in GroupDPOTrainer.
    """

    config_class = OnlineGroupDPOConfig
    args: OnlineGroupDPOConfig
    card_method = "online GroupDPO"
    run_settings = (
        "num_generations", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "ref_sync_steps",
        "reward_weights", *GroupDPOTrainer.run_settings,
    )  # fmt: skip
    card_settings = ("num_generations", "reward_funcs", "temperature", "max_completion_length",
                     *GroupDPOTrainer.card_settings)  # fmt: skip

    def __init__(
        self,
        model: Any,
        reward_funcs: Callable[..., list[float]]
        | str
        | Sequence[Callable[..., list[float]] | str]
        | None = None,
        ref_model: Any = None,
        args: OnlineGroupDPOConfig | None = None,
        train_dataset: Iterable[Mapping[str, Any]] | None = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        callbacks: list[Any] | None = None,
        generator: Any = None,
    ) -> None:
        args = args or self.config_class(output_dir="grouppo-online")
        if peft_config is not None and args.ref_sync_steps:
            raise ValueError(
                "ref_sync_steps needs a reference model of its own; with peft_config the reference is the "
                "base model with the adapter disabled, which never changes"
            )
        reward_funcs = reward_funcs if reward_funcs is not None else args.reward_funcs
        if not reward_funcs:
            raise ValueError("OnlineGroupDPOTrainer needs reward_funcs (a callable, a spec string or a list)")
        if callable(reward_funcs) or isinstance(reward_funcs, str):
            reward_funcs = [reward_funcs]
        self.reward = load_rewards(list(reward_funcs), args.reward_weights, timeout=args.reward_timeout)
        self.reward_failures = 0  # steps in a row
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            callbacks=callbacks,
        )
        self.generator = generator or make_generator(
            args.generation_backend,
            self.accelerator.unwrap_model(self.model),
            self.processing_class,
            args.sampling(),
            model_name_or_path=model if isinstance(model, str) else None,
        )
        self.rollout_stats = RolloutStats()
        self.ref_synced_at = 0

    # ------------------------------------------------------------------ data
    def read_records(self, dataset: Iterable[Mapping[str, Any]], source: str) -> list[dict[str, Any]]:
        """Training data: prompt records (``prepare_prompt_records``); evaluation data: group records."""
        if source == "train":
            return prepare_prompt_records(dataset if isinstance(dataset, list) else list(dataset), source)
        return super().read_records(dataset, source)

    def prepare_dataset(self, records: Any, source: str) -> Any:
        """Training data: the prompt records, sampled from at each step; evaluation data as usual."""
        if source == "train" and records is not None:
            return PromptDataset(records)
        return super().prepare_dataset(records, source)

    def make_collator(self) -> GroupCollator:
        """Training batches are lists of prompt records, sampled from at each step; evaluation batches and
        the groups a step samples are padded as usual."""
        return GroupCollator(pad_token_id=self.processing_class.pad_token_id, prompt_records=True)

    # ------------------------------------------------------------------ resuming
    # A checkpoint of an online run also holds what the next steps depend on beyond the weights, the
    # optimizer and the data order: how many sampling calls were made (the sampler's seeds follow from
    # that count), the rollout counts, and the reference when it has been re-synced to the policy. They
    # are JSON and safetensors, never pickles: loading a checkpoint runs no code from it.
    def save_checkpoint_extras(self, folder: Path) -> None:
        self.save_online_state(folder)

    def save_online_state(self, folder: str | Path) -> None:
        """Write this process's online state into the checkpoint ``folder`` (every process calls it)."""
        state = {
            "generator": self.generator.state_dict() if hasattr(self.generator, "state_dict") else None,
            "ref_synced_at": self.ref_synced_at,
            "rollout_stats": asdict(self.rollout_stats),
        }
        path = Path(folder) / f"{ONLINE_STATE}_{self.args.process_index}.json"
        path.write_text(json.dumps(state), encoding="utf-8")
        if self.ref_synced_at and self.ref_model is not None:  # gathered by every process
            save_whole(
                self.reference.module, str(Path(folder) / REFERENCE_WEIGHTS), write=self.args.should_save
            )

    def load_online_state(self, folder: str | Path) -> None:
        """Read back what ``save_online_state`` wrote into the checkpoint ``folder``."""
        path = Path(folder) / f"{ONLINE_STATE}_{self.args.process_index}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: {folder} was not written by an online GroupDPO run, which saves its "
                "sampler state there"
            )
        state = json.loads(path.read_text(encoding="utf-8"))
        if state["generator"] is not None and hasattr(self.generator, "load_state_dict"):
            self.generator.load_state_dict(state["generator"])
        self.rollout_stats = RolloutStats(**state["rollout_stats"])
        self.ref_synced_at = int(state["ref_synced_at"])
        if self.ref_synced_at and self.ref_model is not None:
            load_whole(self.reference.module, str(Path(folder) / REFERENCE_WEIGHTS))

    def run_record(self) -> dict[str, Any]:
        """GroupDPO's record of the run, and the reward functions by name."""
        return {
            **super().run_record(),
            "rewards": list(getattr(self.reward, "names", [reward_name(self.reward)])),
        }

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """``PreferenceTrainer.train``; a resumed run first reads its online state from the checkpoint."""
        checkpoint = self.resolve_checkpoint(resume_from_checkpoint)
        if checkpoint is not None:
            self.load_online_state(checkpoint)
        return super().train(resume_from_checkpoint=checkpoint, **kwargs)

    # ------------------------------------------------------------------ the step
    def training_step(
        self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        self._maybe_sync_reference()
        batch = self._rollout_batch(inputs)
        if batch is None:
            # Nothing to contrast here: the same calls as the other processes, with weight 0, so that no
            # collective (DDP's all-reduce, FSDP2's and ZeRO-3's gathers) is left waiting.
            batch = placeholder_batch(self.processing_class.pad_token_id)
        return super().training_step(model, batch, num_items_in_batch)

    def _rollout_batch(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor] | None:
        if hasattr(self.generator, "sync_weights"):
            self.generator.sync_weights(self.accelerator.unwrap_model(self.model))
        failure = None
        try:
            groups, stats = rollout(
                self.generator, self.reward, records, self.args.num_generations, self.processing_class,
                trainer_state=self.state, log_metric=self.log_metric,
            )  # fmt: skip
        except RewardTimeout:
            raise
        except RewardError as error:
            groups, stats, failure = [], RolloutStats(prompts=len(records)), str(error)
        if failure is None and stats.prompts and stats.nonfinite_reward_groups == stats.prompts:
            shown = ", ".join(f"{v:g}" for v in stats.rewards[:4])
            name = getattr(self.reward, "__name__", "reward")
            failure = f"reward {name!r} gave no finite value to any group (e.g. {shown})"
        self._log_rollout(stats, failed=failure is not None)  # on every process: it gathers
        if failure is not None:
            self._reward_failed(failure)
            return None
        self.reward_failures = 0
        self.log_metric("online/reward_failures", 0.0)
        self.rollout_stats.update(stats)
        # The rollout's groups are group records already: labelled and tokenized, not read again.
        labelled, _ = prepare_groups(
            groups, positive_rule=self.args.positive_rule, skip_invalid=self.args.skip_invalid_groups
        )
        rows = self.tokenize_records(labelled, "rollout")
        return self.data_collator(rows) if rows else None

    def _log_rollout(self, stats: RolloutStats, failed: bool) -> None:
        """The step's sampling metrics under TRL's names (over every process's prompts): ``reward``,
        ``reward_std``, ``rewards/<name>/mean`` and ``/std``, ``frac_reward_zero_std`` and
        ``completions/*`` lengths; grouppo's ``online/nonfinite_reward_groups`` beside them."""
        local = {
            "rewards": [] if failed else list(stats.rewards),
            "components": {} if failed else dict(getattr(self.reward, "last_components", {})),
            "lengths": list(getattr(self.generator, "last_lengths", None) or []),
            "clipped": list(getattr(self.generator, "last_clipped", None) or []),
            "prompts": stats.prompts,
            "equal": stats.equal_reward_groups,
            "nonfinite": stats.nonfinite_reward_groups,
        }
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object([local])
        else:
            parts = [local]
        for key, value in sampling_metrics(parts).items():
            self.log_metric(key, value)
    def _reward_failed(self, message: str) -> None:
        """A step whose rewards are unusable: skipped and counted; ``max_reward_failures`` in a row stop."""
        self.reward_failures += 1
        self.log_metric("online/reward_failures", 1.0)
        limit = self.args.max_reward_failures
        if self.reward_failures >= limit:
            raise RewardError(
                f"{self.reward_failures} steps in a row without a usable reward "
                f"(max_reward_failures={limit}); the last: {message}"
            )
        logger.warning("step %d skipped: %s", self.state.global_step + 1, message)

    def _maybe_sync_reference(self) -> None:
        """Every ``ref_sync_steps`` optimizer steps, copy the policy's weights into the reference."""
        every, step = self.args.ref_sync_steps, self.state.global_step
        if not every or step == 0 or step % every or step == self.ref_synced_at or self.ref_model is None:
            return
        self.reference.sync(self.accelerator.unwrap_model(self.model))
        self.ref_synced_at = step
        logger.info("reference re-synced to the policy at step %d", step)
