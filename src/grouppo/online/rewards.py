"""Rewards for online training, called exactly as TRL's ``GRPOTrainer`` calls its ``reward_funcs``.

A reward is a callable (or an ``async`` one) taking keyword arguments and returning one float per
completion (``None`` for a completion it does not apply to: read as NaN)::

    def reward(prompts, completions, completion_ids, trainer_state, log_metric, **columns) -> list[float]

- ``prompts``: the prompt of each completion, as the data holds it (a string, or a list of chat messages);
- ``completions``: strings, or for a conversational prompt a list with one message,
  ``[{"role": "assistant", "content": text}]`` (``completion[0]["content"]``), as TRL passes them;
- ``completion_ids``: the completion's token ids;
- ``trainer_state``: the trainer's ``TrainerState`` (None outside training), ``log_metric(name, value)``
  adds a value to the next log (online training);
- every other column of the prompt records, as a list aligned with the completions.

A reward takes the arguments it names and ``**kwargs`` for the rest, so TRL's documented rewards
(``def reward_len(completions, **kwargs)``, a format reward reading ``completion[0]["content"]``, an
accuracy reward reading a ``ground_truth`` column) run unchanged.

- Built-ins (:data:`BUILTIN_REWARDS`): ``ifeval`` (:func:`ifeval_reward`) and ``ifeval_strict``
  (:func:`ifeval_strict_reward`), which read the ``instruction_id_list`` and ``kwargs`` columns that
  :func:`grouppo.embedded.instructions.make_if_prompts` writes.
- :class:`RewardModel`: a sequence-classification reward model's logit.
- :class:`CombinedReward`: a weighted sum that keeps each component's values for logging.
- :func:`load_reward` / :func:`load_rewards`: build rewards from command-line specs.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import math
import numbers
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from grouppo.embedded.instructions import InstructionResult, check_response

logger = logging.getLogger(__name__)

Reward = Callable[..., list[float]]

IFEVAL_FIELDS: tuple[str, ...] = ("instruction_id_list", "kwargs")
# What a Hub model id can look like ("name" or "owner/name"); anything else is not tried on the Hub.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _prompt_text(prompt: Any, index: int) -> str:
    """A prompt's text: the string itself, or the content of the last user message of a chat list."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        users = [
            message for message in prompt if isinstance(message, Mapping) and message.get("role") == "user"
        ]
        if users and isinstance(users[-1].get("content"), str):
            return users[-1]["content"]
    raise TypeError(
        f"prompt {index}: expected a string or chat messages with a user message, got {prompt!r:.80}"
    )


def _completion_text(completion: Any, index: int) -> str:
    """A completion's text: the string itself, or the content of the last message of a chat list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], Mapping):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
    raise TypeError(
        f"completion {index}: expected a string or [{{'role': 'assistant', 'content': ...}}], "
        f"got {completion!r:.80}"
    )


def _instruction_results(
    prompts: Sequence[Any], completions: Sequence[Any], record_fields: Mapping[str, Any]
) -> list[list[InstructionResult]]:
    missing = [name for name in IFEVAL_FIELDS if name not in record_fields]
    if missing:
        raise ValueError(
            f"the ifeval rewards need the record fields {', '.join(IFEVAL_FIELDS)} (one entry per "
            f"completion, as make_if_prompts writes them); missing {', '.join(missing)}; "
            f"got {sorted(record_fields)}"
        )
    id_lists, kwargs = record_fields["instruction_id_list"], record_fields["kwargs"]
    if not len(prompts) == len(completions) == len(id_lists) == len(kwargs):
        raise ValueError(
            f"{len(completions)} completions but {len(prompts)} prompts, {len(id_lists)} instruction_id_list "
            f"and {len(kwargs)} kwargs entries; expected one of each per completion"
        )
    return [
        check_response(_completion_text(completion, i), ids, args, _prompt_text(prompt, i))
        for i, (prompt, completion, ids, args) in enumerate(
            zip(prompts, completions, id_lists, kwargs, strict=True)
        )
    ]


def _instruction_scores(
    results_per_completion: list[list[InstructionResult]], all_or_nothing: bool
) -> list[float]:
    """Each completion's strict score over its scored instructions; 0.0 and a warning when none is scored."""
    scores, unscored = [], 0
    for results in results_per_completion:
        passed = [result.strict for result in results if result.scored]
        if not passed:
            unscored += 1
            scores.append(0.0)
        elif all_or_nothing:
            scores.append(float(all(passed)))
        else:
            scores.append(sum(passed) / len(passed))
    if unscored:
        logger.warning(
            "%d of %d completions had no instruction that can be checked here; they get reward 0.0",
            unscored,
            len(scores),
        )
    return scores


def ifeval_reward(prompts: Sequence[Any], completions: Sequence[Any], **record_fields: Any) -> list[float]:
    """The fraction of its prompt's instructions each completion follows (IFEval's strict check).

    Instructions that cannot be checked here (see :func:`grouppo.embedded.instructions.check_response`) count
    neither way; a completion whose instructions are all unchecked gets 0.0 and is counted in a warning.
    """
    return _instruction_scores(
        _instruction_results(prompts, completions, record_fields), all_or_nothing=False
    )


def ifeval_strict_reward(
    prompts: Sequence[Any], completions: Sequence[Any], **record_fields: Any
) -> list[float]:
    """1.0 when a completion follows all its prompt's (checkable) instructions, strictly, else 0.0."""
    return _instruction_scores(_instruction_results(prompts, completions, record_fields), all_or_nothing=True)


BUILTIN_REWARDS: dict[str, Reward] = {"ifeval": ifeval_reward, "ifeval_strict": ifeval_strict_reward}


class RewardModel:
    """A reward model (``AutoModelForSequenceClassification`` with one label) as a reward callable.

    Each prompt + completion is written with the tokenizer's chat template when it has one (a string
    prompt becomes one user message), else concatenated, and scored in batches of ``batch_size``; the
    reward is the model's logit. A tokenizer without a pad token pads with its end-of-sequence token,
    and the model's ``pad_token_id`` is set to match: the model reads its logit at the last non-pad token.
    """

    def __init__(
        self, name_or_path: str, device: str | None = None, batch_size: int = 8, dtype: Any = None
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name_or_path = str(name_or_path)
        self.__name__ = Path(self.name_or_path.rstrip("/")).name  # TRL names a reward by its __name__
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
        options = {} if dtype is None else {"dtype": dtype}
        self.model = AutoModelForSequenceClassification.from_pretrained(self.name_or_path, **options)
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"{self.name_or_path}: a reward model has one output (num_labels=1); "
                f"this one has {self.model.config.num_labels}"
            )
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"{self.name_or_path}: the tokenizer has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()

    def text(self, prompt: Any, completion: Any) -> str:
        """The text the model scores for one prompt and completion."""
        if not self.tokenizer.chat_template:
            return _prompt_text(prompt, 0) + _completion_text(completion, 0)
        messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if isinstance(completion, list):
            messages += completion
        else:
            messages.append({"role": "assistant", "content": completion})
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **record_fields: Any
    ) -> list[float]:
        import torch

        texts = [
            self.text(prompt, completion) for prompt, completion in zip(prompts, completions, strict=True)
        ]
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    return_tensors="pt",
                    # A chat template writes its own special tokens.
                    add_special_tokens=not self.tokenizer.chat_template,
                )
                logits = self.model(
                    input_ids=batch["input_ids"].to(self.device),
                    attention_mask=batch["attention_mask"].to(self.device),
                ).logits
                scores.extend(logits[:, 0].float().tolist())
        return scores


def reward_name(reward: Any) -> str:
    """A name to log a reward under: its ``__name__`` (a partial's function's), else its class name."""
    for candidate in (reward, getattr(reward, "func", None)):
        name = getattr(candidate, "__name__", None)
        if isinstance(name, str):
            return name
    return type(reward).__name__


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique


class RewardError(ValueError):
    """A reward function failed or returned something that is not one number per completion; the message
    names the function and what it returned."""


class RewardTimeout(RewardError):
    """A reward function did not return within the time allowed (``reward_timeout``)."""


def _call_with_timeout(function: Any, timeout: float | None, name: str, *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)``; with ``timeout``, in a daemon thread given that many seconds."""
    if timeout is None:
        return function(*args, **kwargs)
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = function(*args, **kwargs)
        except BaseException as error:  # handed to the caller
            result["error"] = error

    thread = threading.Thread(target=target, name=f"reward {name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RewardTimeout(f"reward {name!r} did not return within {timeout:g} s (reward_timeout)")
    if "error" in result:
        raise result["error"]
    return result["value"]


class CombinedReward:
    """The weighted sum of rewards; ``last_components`` maps each reward's name to its last values.

    Weights default to 1.0 each. The result is named after its components (``"a+b"``), for TRL's logs.
    Each reward is called as TRL calls it (the module docstring). A reward that raises, returns another
    number of values than completions, or a value that is not a number raises ``RewardError`` naming it
    and what it returned; one that does not return within ``timeout`` seconds raises ``RewardTimeout``.
    Values that are numbers but not finite (NaN, inf, ``None``) are returned as NaN: the rollout drops
    their groups and counts them.
    """

    def __init__(
        self, rewards: Sequence[Reward], weights: Sequence[float] | None = None, timeout: float | None = None
    ) -> None:
        self.rewards = list(rewards)
        if not self.rewards:
            raise ValueError("CombinedReward needs at least one reward")
        self.weights = [1.0] * len(self.rewards) if weights is None else [float(w) for w in weights]
        _check_weights(self.weights, len(self.rewards))
        self.names = _unique([reward_name(reward) for reward in self.rewards])
        self.__name__ = "+".join(self.names)
        self.timeout = timeout
        self.last_components: dict[str, list[float]] = {}

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        components = {}
        for name, reward in zip(self.names, self.rewards, strict=True):
            try:
                returned = _call_with_timeout(_call, self.timeout, name, reward, prompts, completions, kwargs)
            except RewardError:
                raise
            except Exception as error:
                raise RewardError(f"reward {name!r} raised {type(error).__name__}: {error}") from error
            components[name] = reward_values(name, returned, len(completions))
        self.last_components = components
        return [
            sum(weight * values[i] for weight, values in zip(self.weights, components.values(), strict=True))
            for i in range(len(completions))
        ]


def _call(reward: Reward, prompts: Sequence[Any], completions: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``reward`` called as TRL calls it, keyword arguments only; an ``async`` one run to completion."""
    result = reward(prompts=prompts, completions=completions, **kwargs)
    if inspect.isawaitable(result):
        result = asyncio.run(_awaited(result))  # in the reward's own thread: no running loop there
    return result


async def _awaited(result: Any) -> Any:
    return await result


def reward_values(name: str, returned: Any, n: int) -> list[float]:
    """One float per completion from what reward ``name`` returned, or RewardError saying what it was."""
    try:
        values = list(returned)
    except TypeError:
        problem = f"returned {returned!r:.100}; expected a list of {n} numbers"
        raise RewardError(f"reward {name!r} {problem}") from None
    if len(values) != n:
        raise RewardError(f"reward {name!r} returned {len(values)} values for {n} completions")
    out = []
    for index, value in enumerate(values):
        if value is None:  # TRL's "does not apply": not a finite value, dropped as one
            out.append(float("nan"))
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardError(
                f"reward {name!r} returned {value!r:.60} ({type(value).__name__}) for completion {index}; "
                "expected a number"
            )
        out.append(float(value))
    return out


def _check_weights(weights: Sequence[float], count: int) -> None:
    if len(weights) != count:
        raise ValueError(f"{len(weights)} reward weights for {count} rewards; expected one weight per reward")
    if not all(math.isfinite(weight) for weight in weights):
        raise ValueError(f"reward weights must be finite numbers, got {list(weights)}")


def import_callable(spec: str, what: str = "reward") -> Any:
    """The callable at the import path ``package.module:name`` (a class is instantiated with no arguments);
    errors name ``what`` it was for."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{what} {spec!r}: expected an import path 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r}: {error}") from error
    if not hasattr(module, attribute):
        raise ValueError(f"{what} {spec!r}: module {module_name!r} has no attribute {attribute!r}")
    value = getattr(module, attribute)
    if inspect.isclass(value):
        value = value()
    if not callable(value):
        raise ValueError(f"{what} {spec!r} is a {type(value).__name__}, not a callable")
    return value


def load_reward(spec: str | Reward) -> Reward:
    """The reward named by ``spec``, tried in this order:

    - a callable: itself (a reward built in Python needs no name);
    - a built-in name: ``ifeval``, ``ifeval_strict``;
    - a local folder: a reward model saved there (it must hold a config.json);
    - an import path ``package.module:name``: that callable, or an instance of that class made with no
      arguments;
    - a Hugging Face Hub model name, loaded as a :class:`RewardModel`.
    """
    if callable(spec):
        return spec
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"reward {spec!r}: this folder has no config.json; expected a saved reward model"
            )
        return RewardModel(spec)
    if ":" in spec:
        return import_callable(spec)
    unknown = (
        f"unknown reward {spec!r}: expected a built-in ({', '.join(BUILTIN_REWARDS)}), an import path "
        "'package.module:function', a folder holding a reward model, or a Hub reward model name"
    )
    if not HUB_ID.match(spec):
        raise ValueError(unknown)
    try:
        return RewardModel(spec)
    except OSError as error:
        raise ValueError(f"{unknown}; loading it from the Hub failed: {error}") from error


def load_rewards(
    specs: Sequence[str | Reward], weights: Sequence[float] | None = None, timeout: float | None = None
) -> CombinedReward:
    """The weighted sum of the rewards named by ``specs`` (see :func:`load_reward`); weights default to 1;
    ``timeout``: seconds each reward call may take (None: no limit)."""
    if not specs:
        raise ValueError("no reward given; expected at least one reward spec")
    if weights is not None:
        _check_weights([float(weight) for weight in weights], len(specs))
    return CombinedReward([load_reward(spec) for spec in specs], weights, timeout)
