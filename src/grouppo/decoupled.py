"""The decoupled backward: exact group-loss gradients with one chunk of responses alive at a time.

A group loss couples all K responses of a prompt, so the naive ("coupled") backward keeps the
activations of all K alive until the loss is known: peak memory grows linearly in K. GroupDPO's fix
is that the loss depends on the model only through the K scalars ``logp_i``: with
``c_i = dL/dlogp_i``, ``grad L = sum_i c_i grad logp_i``, so each response can be backpropagated on
its own once the scalars are known.

grouppo gets that gradient with a single ``backward()`` call: each chunk of ``response_chunk_size``
responses but the last runs its backbone under a non-reentrant activation checkpoint. The forward keeps
only each chunk's inputs, its final hidden states (one ``[tokens, hidden]`` tensor: the input of the LM
head, which has its own token-chunk checkpoint) and its ``logp`` scalars; the loss is computed on all of
them; during the backward the autograd engine reaches each chunk with its ``c_i`` already computed,
recomputes that chunk's backbone activations, backpropagates them and frees them before the next. This
is the paper's two-pass algorithm (scalars, coefficients, per-chunk forward+backward of ``sum c_i
logp_i``) with the same FLOPs less one chunk's recompute, but the trainer sees one ordinary loss and one
backward, so it runs unchanged under transformers' Trainer, gradient accumulation, mixed precision and
DeepSpeed/FSDP engines that expect one backward per step. The checkpoint replays the RNG state, so
dropout (if enabled) draws the same mask in the recompute.

The prompt of each group is run once (see ``grouppo.logps``) and shared by every chunk; its
activations are stored once per group, not once per response.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from grouppo.engines import is_sharded
from grouppo.logps import (
    DEFAULT_LOGITS_CHUNK_SIZE,
    TOKEN_STATS,
    LMParts,
    call_as_forward,
    hidden_to_logps,
    lm_parts,
    prompt_pass,
    response_hidden,
    scored_tokens,
    token_logps,
)


def chunks(n: int, size: int | None) -> list[slice]:
    """Consecutive slices of ``size`` rows covering ``range(n)`` (one slice when ``size`` is None)."""
    if size is None or size >= n:
        return [slice(0, n)]
    if size < 1:
        raise ValueError(f"response_chunk_size must be a positive integer or None, got {size}")
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


@dataclass
class Scorer:
    """How a run scores the rows of a batch under a model (policy or reference): ``response_chunk_size``
    responses at a time with gradients (the decoupled backward), ``no_grad_chunk_size`` without (default
    4 x the former), the prompt shared, the LM head in ``logits_chunk_size`` token chunks, inside
    ``precision()`` (the run's autocast: accelerate applies mixed precision by wrapping
    ``model.forward``, which scoring replaces with ``call_as_forward``, so it is entered here)."""

    response_chunk_size: int | None = None
    no_grad_chunk_size: int | None = None
    share_prompt: bool = True
    logits_chunk_size: int = DEFAULT_LOGITS_CHUNK_SIZE
    precision: Callable[[], AbstractContextManager] = nullcontext

    def __call__(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        stat_sums: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        chunk = self.response_chunk_size
        if not torch.is_grad_enabled():
            chunk = self.no_grad_chunk_size or (4 * chunk if chunk else None)
        with self.precision():
            return group_logps(model, batch, response_chunk_size=chunk, share_prompt=self.share_prompt,
                               logits_chunk_size=self.logits_chunk_size, stat_sums=stat_sums)  # fmt: skip


def group_logps(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    response_chunk_size: int | None = None,
    share_prompt: bool = True,
    logits_chunk_size: int = DEFAULT_LOGITS_CHUNK_SIZE,
    stat_sums: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Summed log-prob of every response in ``batch`` (``[N]``), ``response_chunk_size`` responses at a time.

    With gradients enabled and a chunk size, each chunk is checkpointed: the backward through the
    returned scalars is the decoupled backward. ``response_chunk_size=None`` is the coupled computation
    (all responses at once, every activation kept). Without gradients (the reference pass, evaluation)
    chunks simply run one after another, so no pass holds more than one chunk of activations.

    The whole computation runs as one forward call of ``model`` (``call_as_forward``), so a
    DistributedDataParallel, DeepSpeed or FSDP wrapper does its gradient sync or parameter gathering.
    ``stat_sums``, when given, receives one ``[N, 3]`` tensor: each response's sums over the tokens it
    scores of their ``grouppo.logps.TOKEN_STATS`` (detached).
    """
    sums: list[torch.Tensor] = []
    out = call_as_forward(
        model, _group_logps, lm_parts(model), batch, response_chunk_size, share_prompt, logits_chunk_size,
        sums if stat_sums is not None else None,
    )  # fmt: skip
    if stat_sums is not None:
        stat_sums.append(torch.cat(sums) if sums else out.new_zeros(0, len(TOKEN_STATS)))
    return out


def _group_logps(
    parts: LMParts,
    batch: dict[str, torch.Tensor],
    response_chunk_size: int | None,
    share_prompt: bool,
    logits_chunk_size: int,
    stat_sums: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    prompt = prompt_pass(parts, batch, share_prompt)
    spans = chunks(batch["response_ids"].shape[0], response_chunk_size)
    scored = [int(scored_tokens(batch, rows).sum()) for rows in spans]
    plan = agreed_calls(parts, [-(-tokens // logits_chunk_size) for tokens in scored])
    decouple = torch.is_grad_enabled() and response_chunk_size is not None
    pieces, padding = [], []
    for index, calls in enumerate(plan):
        # A process with fewer chunks than another runs padding chunks (its first response, weight 0).
        rows = spans[index] if index < len(spans) else slice(0, 1)
        # The last chunk keeps its activations: the backward reaches it first (autograd runs the most
        # recently recorded nodes first) and frees them before recomputing any other chunk, so peak
        # memory is unchanged and one chunk's recompute is saved (a one-chunk group costs as coupled).
        if decouple and index < len(plan) - 1:
            # Only the backbone is checkpointed: the LM head has its own token-chunk checkpoint, so
            # nesting it here would run the head's forward a third time in the recompute.
            hidden = checkpoint(response_hidden, parts, batch, prompt, rows, use_reentrant=False)
        else:
            hidden = response_hidden(parts, batch, prompt, rows)
        if index < len(spans):
            pieces.append(hidden_to_logps(hidden, parts, batch, rows, logits_chunk_size, calls, stat_sums))
        else:
            targets = batch["response_ids"][rows][batch["response_mask"][rows].bool()]
            padding.append(token_logps(hidden[:1], targets[:1], parts, 1, calls).sum())
    out = torch.cat(pieces)
    return out + 0.0 * torch.stack(padding).sum() if padding else out


def agreed_calls(parts: LMParts, local: list[int]) -> list[int]:
    """The chunk plan every process follows: for each response chunk, the number of LM-head calls.

    FSDP and DeepSpeed ZeRO-3 gather a sharded module's parameters with a collective at every call, so
    every process must call the backbone and the LM head the same number of times, in the same order,
    whatever its groups hold (ragged K and lengths). For a sharded model the processes agree on the
    longest plan (two small all-reduces); processes with less work run padding calls whose results
    enter the output with weight 0, so the values and gradients are exactly those of their own rows.
    Unsharded models (one process, DDP) keep their own plan at no cost.
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not (distributed and (is_sharded(parts.backbone) or is_sharded(parts.lm_head))):
        return local
    device = next(parts.backbone.parameters()).device
    length = torch.tensor([len(local)], device=device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    plan = torch.zeros(int(length.item()), dtype=torch.long, device=device)
    plan[: len(local)] = torch.tensor(local, dtype=torch.long)
    dist.all_reduce(plan, op=dist.ReduceOp.MAX)
    return plan.tolist()
