"""Sampling completions from a policy, behind one small interface.

A ``Generator`` turns prompts (plain text or chat messages) into ``num_generations`` completion strings
each. ``TransformersGenerator`` runs ``model.generate`` on the model being trained (any device, no extra
dependency); ``VLLMGenerator`` runs a vLLM engine (the optional ``grouppo[vllm]`` extra, CUDA only) and
can load the policy's current weights into it for online training. ``make_generator`` picks one by name.

Prompts are tokenized exactly as ``grouppo.tokenize`` tokenizes them for training (chat messages through
the chat template with the generation prompt, plain text as is), so the trainer scores the completions
after the very prompt tokens they were sampled from. Sampling follows the policy's own distribution:
only ``temperature`` and ``top_p`` reshape it; top-k and repetition penalties that a model's generation
config may carry are switched off.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from grouppo.logps import eval_mode
from grouppo.tokenize import Prompt, prompt_token_ids

BACKENDS = ("transformers", "vllm")


@dataclass
class SamplingConfig:
    """How completions are sampled.

    ``temperature=0`` decodes greedily. ``batch_size`` counts sequences (prompts x generations) per
    ``generate`` call. ``seed=None`` leaves sampling to the global RNG; an integer makes a run
    reproducible while successive calls still draw different samples.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Generator(Protocol):
    """Samples completions: per prompt, ``num_generations`` strings (no prompt text, no special tokens)."""

    def generate(self, prompts: Sequence[Prompt], num_generations: int = 1) -> list[list[str]]: ...


def _call_seed(seed: int, call: int, part: int) -> int:
    # A seed per (run seed, call, batch): reproducible runs, different samples on every call.
    return random.Random(f"grouppo/{seed}/{call}/{part}").getrandbits(63)


class TransformersGenerator:
    """``model.generate`` on the given (unwrapped) model, in batches of ``config.batch_size`` sequences.

    The model is put in eval mode and under ``torch.no_grad`` while it generates, then restored. Prompts
    are left-padded (padding is masked; the tokenizer's own padding side is left alone). After each call,
    ``last_num_tokens`` holds the number of completion tokens generated, EOS included.
    """

    def __init__(self, model: Any, tokenizer: PreTrainedTokenizerBase, config: SamplingConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or SamplingConfig()
        eos = [tokenizer.eos_token_id]
        model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos += model_eos if isinstance(model_eos, list) else [model_eos]
        self.eos_token_ids = sorted({i for i in eos if i is not None})
        if not self.eos_token_ids:
            raise ValueError(
                "the tokenizer has no eos_token and the model's generation config no eos_token_id"
            )
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        )
        self.last_num_tokens = 0
        self._calls = 0

    def generate(self, prompts: Sequence[Prompt], num_generations: int = 1) -> list[list[str]]:
        return self.generate_from_ids([prompt_token_ids(p, self.tokenizer) for p in prompts], num_generations)

    def generate_from_ids(self, ids: Sequence[list[int]], num_generations: int = 1) -> list[list[str]]:
        """Like ``generate``, from prompts already tokenized (e.g. a prompt and the start of its response)."""
        if num_generations < 1:
            raise ValueError(f"num_generations must be at least 1, got {num_generations}")
        rows = [ids[i] for i in range(len(ids)) for _ in range(num_generations)]
        size = self.config.batch_size
        completions: list[str] = []
        self.last_num_tokens = 0
        try:
            with eval_mode(self.model):
                for part, start in enumerate(range(0, len(rows), size)):
                    completions.extend(self._generate_batch(rows[start : start + size], part))
        finally:
            self._calls += 1
        return [completions[i : i + num_generations] for i in range(0, len(completions), num_generations)]

    def _generate_batch(self, rows: list[list[int]], part: int) -> list[str]:
        device = next(self.model.parameters()).device
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                attention_mask[i, width - len(r) :] = 1
        cfg = self.config
        sampling = (
            {"do_sample": False}
            if cfg.greedy
            else {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
        )
        # Sample from a forked RNG: seeding the global one would also reset the trainer's (dropout, order).
        accelerator = device.type != "cpu"
        with torch.random.fork_rng(
            devices=[device] if accelerator else [], device_type=device.type if accelerator else None
        ):
            if cfg.seed is not None:
                torch.manual_seed(_call_seed(cfg.seed, self._calls, part))
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=cfg.max_new_tokens,
                    pad_token_id=self.pad_token_id,
                    eos_token_id=self.eos_token_ids,
                    repetition_penalty=1.0,
                    use_cache=True,
                    **sampling,
                )
        texts = []
        for row in out[:, width:].tolist():
            n = next((j + 1 for j, t in enumerate(row) if t in self.eos_token_ids), len(row))
            self.last_num_tokens += n
            texts.append(self.tokenizer.decode(row[:n], skip_special_tokens=True))
        return texts


class VLLMGenerator:
    """Generation with a vLLM engine (``pip install grouppo[vllm]``; needs a CUDA GPU).

    ``llm_kwargs`` go to ``vllm.LLM`` (defaults here: ``gpu_memory_utilization=0.3``, to leave the GPU to a
    colocated trainer, and ``seed``). The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``
    unless set) so that ``sync_weights`` can reach its model. Prompts are tokenized here with
    ``tokenizer`` (default: the engine's) and passed as token ids, as for ``TransformersGenerator``.

    Untested in grouppo's suite (no GPU there): only its ImportError is.
    """

    def __init__(
        self,
        model_name_or_path: str,
        config: SamplingConfig | None = None,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **llm_kwargs: Any,
    ):
        vllm = import_vllm()
        self.config = config or SamplingConfig()
        self._vllm = vllm
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        llm_kwargs.setdefault("gpu_memory_utilization", 0.3)
        llm_kwargs.setdefault("seed", self.config.seed or 0)
        self.llm = vllm.LLM(model=str(model_name_or_path), **llm_kwargs)
        self.tokenizer = tokenizer or self.llm.get_tokenizer()
        self.last_num_tokens = 0
        self._calls = 0

    def generate(self, prompts: Sequence[Prompt], num_generations: int = 1) -> list[list[str]]:
        if num_generations < 1:
            raise ValueError(f"num_generations must be at least 1, got {num_generations}")
        cfg = self.config
        params = [
            self._vllm.SamplingParams(
                n=num_generations,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=cfg.max_new_tokens,
                seed=None if cfg.seed is None else _call_seed(cfg.seed, self._calls, i),
                skip_special_tokens=True,
            )
            for i in range(len(prompts))
        ]
        requests = [{"prompt_token_ids": prompt_token_ids(p, self.tokenizer)} for p in prompts]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        self._calls += 1
        self.last_num_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return [[c.text for c in o.outputs] for o in outputs]

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s current weights into the engine (online training), then drop its prefix cache.

        TRL's colocate mode does the same: ``load_weights`` on the engine's in-process model, parameter
        by parameter, with Hugging Face names. A PEFT model's adapter is merged for the copy and unmerged
        after. Not for DeepSpeed ZeRO-3 or FSDP, whose parameters would first need gathering.
        """
        merged = hasattr(model, "merge_adapter")
        if merged:
            model.merge_adapter()
        try:
            weights = list(_hf_weights(model))
            try:
                engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
            except AttributeError:
                # The engine runs in other processes (VLLM_ENABLE_V1_MULTIPROCESSING=1): ship the weights
                # to each worker, which vLLM only pickles with VLLM_ALLOW_INSECURE_SERIALIZATION=1.
                self.llm.apply_model(lambda m: m.load_weights(weights))
            else:
                engine_model.load_weights(weights)
        finally:
            if merged:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()


def _hf_weights(model: torch.nn.Module):
    """(name, tensor) of the base model's weights, with PEFT's wrapping taken out of the names."""
    prefix = getattr(model, "prefix", None)  # a PEFT model's adapter parameter prefix, e.g. "lora_"
    for name, param in model.named_parameters():
        if prefix and prefix in name:
            continue
        if "original_module" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        name = name.replace("modules_to_save.default.", "").replace("_checkpoint_wrapped_module.", "")
        yield name, param.data


def import_vllm() -> Any:
    """``import vllm``, or an ImportError saying how to get it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "the vllm generation backend needs vLLM, which is not installed: `pip install grouppo[vllm]` "
            "(Linux with a CUDA GPU only); or use the transformers backend"
        ) from e
    return vllm


def make_generator(
    backend: str,
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    config: SamplingConfig | None = None,
    model_name_or_path: str | None = None,
) -> Generator:
    """The generator of ``backend``: "transformers" (generates with ``model``) or "vllm" (loads
    ``model_name_or_path``, default ``model.name_or_path``, into a vLLM engine)."""
    if backend == "transformers":
        return TransformersGenerator(model, tokenizer, config)
    if backend == "vllm":
        from grouppo.embedded.models import resolve_model

        if model_name_or_path is not None:
            name = resolve_model(model_name_or_path)
        elif getattr(model, "name_or_path", None):
            name = model.name_or_path
        else:
            raise ValueError("the vllm backend needs model_name_or_path (the model's hub name or local path)")
        return VLLMGenerator(name, config, tokenizer=tokenizer)
    raise ValueError(f"unknown generation backend {backend!r}; expected one of {', '.join(BACKENDS)}")
