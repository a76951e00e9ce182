"""Per-response log-probabilities: (model, batch of groups) -> summed log-prob and token count.

This is the only place that knows how a batch of groups is laid out and scored:

* **Prompt sharing.** Each group's prompt is run once (``prompt_pass``); its key/value cache is then
  reused by every response of the group (``responses_pass``), so a group of K responses costs one
  prompt forward, not K. The gradient flows back into the prompt through the cache, so it stays exact.
  Models whose cache is not a plain full-attention ``DynamicCache`` (sliding windows, recurrent
  layers) fall back to scoring prompt and response together, which is always correct.
* **No full logits.** Only response positions are projected through the LM head, ``logits_chunk_size``
  tokens at a time, each chunk under an activation checkpoint: float32 logits over the vocabulary exist
  for one chunk of tokens at a time, in the forward and in the backward.

Batch layout (built by ``grouppo.collate.GroupCollator``): ``prompt_ids``/``prompt_mask`` are ``[G, P]``
right-padded, one row per group; ``response_ids``/``response_mask`` are ``[N, R]`` right-padded, one row
per response; ``group_index`` ``[N]`` gives each response's group. A response's sequence is its group's
prompt row followed by its response row, with the padding in between masked out and positions counted
over real tokens only, so padding never changes a log-prob.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.utils import logging

logger = logging.get_logger(__name__)

DEFAULT_LOGITS_CHUNK_SIZE = 512
T = TypeVar("T")


@dataclass
class LMParts:
    """The pieces of a causal LM that scoring needs: the backbone (hidden states) and the LM head."""

    backbone: torch.nn.Module
    lm_head: torch.nn.Module
    config: object
    softcap: float | None = None
    logit_scale: float = 1.0


def _unwrap_distributed(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP, DeepSpeed or FSDP wrapper (kept as ``.module``), else ``model``."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def lm_parts(model: torch.nn.Module) -> LMParts:
    """Find the backbone and LM head of a causal LM, through PEFT and DDP wrappers.

    LoRA layers are injected into the backbone's modules, so calling the backbone directly runs them,
    and ``disable_adapter()`` on the PEFT model still switches them off.
    """
    inner = _unwrap_distributed(model)
    if hasattr(inner, "get_base_model"):  # peft.PeftModel
        inner = inner.get_base_model()
    lm_head = inner.get_output_embeddings()
    backbone = getattr(inner, inner.base_model_prefix, None)
    if lm_head is None or backbone is None or backbone is inner:
        raise TypeError(
            f"{type(inner).__name__} is not a causal LM with a separate backbone and LM head "
            "(expected e.g. LlamaForCausalLM: `.model` and `.lm_head`)."
        )
    config = inner.config.get_text_config()
    scale = getattr(config, "logit_scale", None) or 1.0
    return LMParts(backbone, lm_head, inner.config, getattr(config, "final_logit_softcapping", None), scale)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in evaluation mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def call_as_forward(model: torch.nn.Module, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` as the forward of ``model``, inside its wrappers and hooks.

    grouppo scores through the backbone, not ``model.forward``, but distributed wrappers do their work in
    the forward: DistributedDataParallel arms its gradient all-reduce there (and honours ``no_sync`` for
    gradient accumulation), DeepSpeed and FSDP gather or unshard parameters. So the wrapped module's
    ``forward`` is swapped for ``fn`` for the duration of one call of ``model`` itself, and restored after.

    A wrapper may cast the forward's floating outputs (FSDP2's mixed-precision ``output_dtype``, which
    accelerate sets to bfloat16): a summed log-prob of a few hundred tokens rounded to bfloat16 is off by
    up to a nat, more than the reward margins it serves. So a tensor result also travels past the cast,
    in a holder the wrapper does not see, and comes back with its own value and its own gradient path;
    the wrapper's (cast) output joins the result with weight 0, so the wrapper's backward hooks still
    fire, before the backward reaches the model.
    """
    target = _unwrap_distributed(model)
    patched = target.__dict__.get("forward")  # e.g. accelerate's autocast wrapper, kept and restored

    def forward() -> Any:
        out = fn(*args, **kwargs)
        return (out, _Uncast(out)) if isinstance(out, torch.Tensor) else out

    target.forward = forward
    try:
        out = model()
    finally:
        if patched is None:
            del target.forward
        else:
            target.forward = patched
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], _Uncast)):
        return out
    seen, exact = out[0], out[1].value
    if seen.dtype == exact.dtype:
        return seen
    return exact + 0.0 * seen.to(exact.dtype).sum()


class _Uncast:
    """Carries a forward's result past output casts (not a tensor, not a pytree node)."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


def _chunk_token_logps(
    hidden: torch.Tensor, targets: torch.Tensor, parts: LMParts, stats: bool
) -> torch.Tensor:
    # Under autocast a float32 model's vocabulary projection stays float32: bfloat16 logits would add
    # about 0.01 nats of rounding per token to every summed response log-prob (grouppo bench precision).
    device = hidden.device.type
    weight = getattr(parts.lm_head, "weight", None)
    if torch.is_autocast_enabled(device) and weight is not None and weight.dtype == torch.float32:
        with torch.autocast(device, enabled=False):
            logits = parts.lm_head(hidden.float())
    else:
        logits = parts.lm_head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least, float64 kept
    if parts.logit_scale != 1.0:
        logits = logits * parts.logit_scale
    if parts.softcap is not None:
        logits = torch.tanh(logits / parts.softcap) * parts.softcap
    norm = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - norm
    if not stats:
        return logps.unsqueeze(-1)
    # Beside each log-prob, the dashboard's TOKEN_STATS of the token (detached, no extra LM-head call).
    with torch.no_grad():
        plain = logits.detach()
        entropy = norm.detach() - (torch.softmax(plain, dim=-1) * plain).sum(-1)
        top1 = (plain.argmax(-1) == targets).to(plain.dtype)
        table = torch.stack([plain.mean(-1), entropy, top1], dim=-1)
    return torch.cat([logps.unsqueeze(-1), table], dim=-1)


TOKEN_STATS = ("mean_logit", "entropy", "top1")
"""What ``token_logps`` hands back beside each log-prob (TRL's dashboard quantities): the token's mean
logit over the vocabulary, the entropy of its predicted distribution, and 1 when the target is the
argmax (0 otherwise)."""


def token_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    parts: LMParts,
    chunk_size: int = DEFAULT_LOGITS_CHUNK_SIZE,
    calls: int | None = None,
    token_stats: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Log-prob of each target token given its hidden state: ``[T, H]``, ``[T]`` -> ``[T]``.

    The result is float32, or float64 for a float64 model.

    The vocabulary projection runs ``chunk_size`` tokens at a time; with gradients on, each chunk is
    checkpointed so its logits are recomputed in the backward instead of being kept. ``calls`` (at least
    the number of chunks) makes exactly that many LM-head calls, the extra ones on one token with weight 0,
    so that every process of a sharded model makes the same calls (see ``grouppo.decoupled``).
    ``token_stats``, when given, receives each token's ``TOKEN_STATS`` (``[T, 3]``, detached: TRL's
    ``logits/*``, ``entropy`` and ``mean_token_accuracy`` metrics), at no extra LM-head call.
    """
    spans = [slice(start, start + chunk_size) for start in range(0, hidden.shape[0], chunk_size)]
    extra = 0 if calls is None else calls - len(spans)
    if extra < 0:
        raise ValueError(f"{len(spans)} token chunks do not fit in calls={calls}")
    pieces = []
    for span in spans + [slice(0, 1)] * extra:
        h, t = hidden[span], targets[span]
        with_stats = token_stats is not None
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_token_logps, h, t, parts, with_stats, use_reentrant=False))
        else:
            pieces.append(_chunk_token_logps(h, t, parts, with_stats))
    if not spans:
        empty = hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
        if token_stats is not None:
            token_stats.append(empty.new_zeros(0, len(TOKEN_STATS)))
        return empty
    stats = torch.cat(pieces[: len(spans)])
    if token_stats is not None:
        token_stats.append(stats[:, 1:].detach())
    out = stats[:, 0]
    return out + 0.0 * torch.cat(pieces[len(spans) :]).sum() if extra else out


def _sum_per_row(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum the flat per-token ``values`` (``[T]`` or ``[T, k]``: one per True entry of ``mask`` ``[n, R]``)
    back into rows (``[n]`` or ``[n, k]``)."""
    rows = torch.nonzero(mask, as_tuple=True)[0]
    total = torch.zeros((mask.shape[0], *values.shape[1:]), dtype=values.dtype, device=values.device)
    return total.index_add(0, rows, values)


def cache_argument(backbone: torch.nn.Module) -> str:
    """The name under which ``backbone`` takes (and returns) its key/value cache: ``cache`` in
    transformers >= 5.24, ``past_key_values`` before (and in models that still use it)."""
    parameters = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class ReplayLayer(DynamicLayer):
    """A key/value cache layer that a recompute cannot corrupt.

    A ``DynamicLayer`` grows at every ``update``, so a layer run twice on the same cache (its forward, then
    the recompute of an activation checkpoint around it: torch's ``checkpoint_wrapper``, accelerate's FSDP
    activation checkpointing) would see the prompt's keys twice. This layer holds a fixed prefix (the
    prompt's keys and values, or nothing in the prompt pass) and answers every ``update`` with the prefix
    followed by the new states, kept as this forward's result: the recompute sees what the forward saw.
    """

    _layer_type = None  # never registered in transformers' layer-type mapping

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None) -> None:
        super().__init__()
        self.prefix = (keys, values)
        if keys is not None:
            self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.prefix
        if keys is not None:
            key_states = torch.cat([keys, key_states], dim=-2)
            value_states = torch.cat([values, value_states], dim=-2)
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        self.device = key_states.device
        return key_states, value_states

    def get_seq_length(self) -> int:
        keys = self.prefix[0]
        return 0 if keys is None else keys.shape[-2]


def replay_cache(config: Any, kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
    """A cache of ``ReplayLayer``s: empty (the prompt pass) or holding each layer's prompt keys/values."""
    cache = DynamicCache(config=config)
    cache.layers = [ReplayLayer() for _ in cache.layers] if kv is None else [ReplayLayer(k, v) for k, v in kv]
    return cache


@dataclass
class PromptState:
    """One forward of each group's prompt: its key/value cache and the hidden state of its last token."""

    kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # None: the model cannot share, score unshared
    last_hidden: torch.Tensor | None  # [G, H]


def can_share_prompt(parts: LMParts) -> bool:
    """Prompt sharing needs a plain full-attention cache (no sliding windows, no recurrent state), and
    layers that keep it: under transformers' gradient checkpointing, layers in training mode drop the
    cache (their recompute would write it twice), so scoring falls back to unshared sequences."""
    if any(getattr(m, "gradient_checkpointing", False) and m.training for m in parts.backbone.modules()):
        logger.warning_once(
            "activation (gradient) checkpointing is on: each response is scored with its own copy of the "
            "prompt (no prompt sharing). The decoupled backward (response_chunk_size) already bounds "
            "activation memory; turn activation_checkpointing off to share the prompt across the group."
        )
        return False
    cache = DynamicCache(config=parts.config)
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def prompt_pass(parts: LMParts, batch: dict[str, torch.Tensor], share_prompt: bool = True) -> PromptState:
    """Run each group's prompt once and keep what its responses need (gradients flow through it)."""
    if not (share_prompt and can_share_prompt(parts)):
        return PromptState(None, None)
    ids, mask = batch["prompt_ids"], batch["prompt_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    name = cache_argument(parts.backbone)
    out = parts.backbone(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        **{name: replay_cache(parts.config)},
    )
    last = (mask.sum(-1) - 1).clamp(min=0)
    last_hidden = out.last_hidden_state[torch.arange(ids.shape[0], device=ids.device), last]
    kv = [(layer.keys, layer.values) for layer in getattr(out, name).layers]
    return PromptState(kv, last_hidden)


def response_hidden(
    parts: LMParts, batch: dict[str, torch.Tensor], prompt: PromptState, rows: slice = slice(None)
) -> torch.Tensor:
    """Hidden states that predict each real token of the responses ``rows``: ``[T, H]``, in the order of
    ``batch["response_mask"][rows]``'s True entries (the LM head is not applied here)."""
    resp_ids, resp_mask = batch["response_ids"][rows], batch["response_mask"][rows]
    group = batch["group_index"][rows]
    prompt_ids, prompt_mask = batch["prompt_ids"][group], batch["prompt_mask"][group]
    prompt_len = prompt_mask.sum(-1, keepdim=True)
    positions = prompt_len + resp_mask.cumsum(-1) - 1
    attention_mask = torch.cat([prompt_mask, resp_mask], dim=1)
    if prompt.kv is not None:
        cache = replay_cache(parts.config, [(k[group], v[group]) for k, v in prompt.kv])
        out = parts.backbone(
            input_ids=resp_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            **{cache_argument(parts.backbone): cache},
            use_cache=True,
        )
        # The first response token is predicted from the prompt's last hidden state.
        hidden = torch.cat([prompt.last_hidden[group].unsqueeze(1), out.last_hidden_state[:, :-1]], dim=1)
    else:
        prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        out = parts.backbone(
            input_ids=torch.cat([prompt_ids, resp_ids], dim=1),
            attention_mask=attention_mask,
            position_ids=torch.cat([prompt_positions, positions], dim=1),
            use_cache=False,
        )
        full, width = out.last_hidden_state, prompt_ids.shape[1]
        last = (prompt_len.squeeze(-1) - 1).clamp(min=0)
        # Token t of a response is predicted at the previous real position: the prompt's last token for t = 0.
        hidden = torch.cat([full[torch.arange(full.shape[0]), last].unsqueeze(1), full[:, width:-1]], dim=1)
    return hidden[resp_mask.bool()]


def scored_tokens(batch: dict[str, torch.Tensor], rows: slice = slice(None)) -> torch.Tensor:
    """Which response tokens of ``rows`` go through the LM head: ``score_mask`` if the batch has one (it
    lies within ``response_mask``), else every real response token (``[n, R]`` bool)."""
    return batch["score_mask" if "score_mask" in batch else "response_mask"][rows].bool()


def hidden_to_logps(
    hidden: torch.Tensor,
    parts: LMParts,
    batch: dict[str, torch.Tensor],
    rows: slice = slice(None),
    logits_chunk_size: int = DEFAULT_LOGITS_CHUNK_SIZE,
    calls: int | None = None,
    stat_sums: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Summed log-prob of each response in ``rows`` from ``response_hidden``'s output (LM head in chunks,
    ``calls`` LM-head calls when given: see ``token_logps``).

    With a ``score_mask`` in the batch (``[N, R]``, within ``response_mask``) each row sums only the
    tokens it marks; the others are context (run through the backbone, never through the LM head).
    ``stat_sums``, when given, receives each row's sums over its scored tokens of their ``TOKEN_STATS``
    (``[n, 3]``, detached)."""
    keep = batch["response_mask"][rows].bool()
    if "score_mask" in batch:
        scored = scored_tokens(batch, rows)
        hidden, keep = hidden[scored[keep]], scored
    stats: list[torch.Tensor] | None = [] if stat_sums is not None else None
    per_token = token_logps(hidden, batch["response_ids"][rows][keep], parts, logits_chunk_size, calls, stats)
    if stat_sums is not None and stats is not None:
        stat_sums.append(_sum_per_row(stats[0], keep))
    return _sum_per_row(per_token, keep)


def responses_pass(
    parts: LMParts,
    batch: dict[str, torch.Tensor],
    prompt: PromptState,
    rows: slice = slice(None),
    logits_chunk_size: int = DEFAULT_LOGITS_CHUNK_SIZE,
) -> torch.Tensor:
    """Summed log-prob (float32 or wider) of the responses ``rows`` of the batch, given the prompt pass."""
    return hidden_to_logps(response_hidden(parts, batch, prompt, rows), parts, batch, rows, logits_chunk_size)
