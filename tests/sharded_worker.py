"""One rank of the FSDP2 harness in ``test_sharded.py``: the model, the groups and the loss both sides use.

``run_rank`` is the child process: it joins a 2-process gloo group, shards the tiny Llama with
``fully_shard``, scores its own groups and writes what it got (full gradients, or log-probs without
gradients) to ``rank{N}.pt`` in the output folder, or the traceback to ``rank{N}.err``. The test process
builds the same model and groups with ``build_model`` and ``rank_groups`` for the one-process reference.
Not a test module (pytest collects only ``test_*.py``).
"""

from __future__ import annotations

import faulthandler
import os
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch

WORLD_SIZE = 2
GLOO_TIMEOUT_S = 60  # a collective that the other rank never joins raises after this, instead of 30 min


@dataclass(frozen=True)
class Case:
    """One run of the harness: what each rank scores and how the model is sharded."""

    ragged: bool  # False: both ranks hold groups of the same shapes (same number of chunks and tokens)
    response_chunk_size: int | None  # 2: decoupled backward; None: coupled
    logits_chunk_size: int  # LM-head tokens per chunk
    reshard_after_forward: bool  # for the decoder layers (the root is never resharded after forward)
    grad: bool = True  # False: score under torch.no_grad() (the reference pass) and compare log-probs
    shard_lm_head: bool = False  # the LM head its own fully_shard unit: a collective per token chunk
    checkpoint_layers: bool = False  # torch's checkpoint_wrapper around each layer (accelerate's FSDP AC)
    output_bf16: bool = False  # the root's MixedPrecisionPolicy casts outputs to bfloat16 (as accelerate's)

    @property
    def id(self) -> str:
        return "-".join(
            [
                "ragged" if self.ragged else "equal",
                "decoupled" if self.response_chunk_size else "coupled",
                f"logits{self.logits_chunk_size}",
                "reshard" if self.reshard_after_forward else "keep",
                "grad" if self.grad else "nograd",
            ]
            + (["lmhead"] if self.shard_lm_head else [])
            + (["checkpointed"] if self.checkpoint_layers else [])
            + (["output_bf16"] if self.output_bf16 else [])
        )


def rank_groups(case: Case, rank: int) -> list[dict]:
    """The tokenized groups rank ``rank`` scores: each rank its own (different seeds)."""
    from grouppo.apps.bench import random_groups

    if not case.ragged:  # same shapes on both ranks: 2 groups of K=3, 4-token responses
        return random_groups([3, 3], [1, 2], seed=rank, response_len=4)
    if rank == 0:  # few, short responses: 2 response chunks of 2, at most 6 tokens each
        return random_groups([2, 2], [1, 1], seed=rank, max_response=3)
    # many, longer responses: K=5 and K=6, up to 8 tokens each (6 response chunks, more token chunks)
    return random_groups([5, 6], [2, 3], seed=rank, max_response=8)


def build_model(tokenizer):
    """The same tiny float64 Llama on every rank and in the reference (2 layers, hidden 32)."""
    from grouppo.embedded.synthetic import tiny_llama

    return tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0).double()


def score(model, tokenizer, case: Case, rank: int):
    """``(loss, logps)`` of rank ``rank``'s groups: the conftest ``group_loss`` (all pairs, beta 0.5, NLL
    0.3, fixed reference log-probs); the loss is the mean over the rank's groups."""
    from grouppo.collate import GroupCollator
    from grouppo.decoupled import group_logps
    from grouppo.losses import FlatGroupBatch, group_dpo_loss

    batch = GroupCollator(pad_token_id=tokenizer.pad_token_id)(rank_groups(case, rank))
    logps = group_logps(
        model,
        batch,
        response_chunk_size=case.response_chunk_size,
        share_prompt=True,
        logits_chunk_size=case.logits_chunk_size,
    )
    ref = torch.linspace(-30, -10, logps.shape[0], dtype=logps.dtype)
    loss, _ = group_dpo_loss(
        FlatGroupBatch(logps, ref, batch["response_mask"].sum(-1), batch["labels"], batch["scores"],
                       batch["group_index"], batch["slot"]),
        beta=0.5, nll_weight=0.3,
    )  # fmt: skip
    return loss, logps


def run_rank(rank: int, port: int, case: dict, out_dir: str) -> None:
    """The child process of rank ``rank``: writes ``rank{N}.pt`` or ``rank{N}.err`` in ``out_dir``."""
    faulthandler.disable()  # inherited from pytest by fork: a gloo abort would dump every module's name
    out = Path(out_dir)
    start = time.monotonic()
    try:
        _run(rank, port, Case(**case), out)
    except BaseException:
        # Write the failure and leave at once: tearing the process group down after a failed collective
        # can itself block, and the test reads this file.
        text = f"after {time.monotonic() - start:.1f} s:\n{traceback.format_exc()}"
        (out / f"rank{rank}.err").write_text(text)
        os._exit(1)


def _run(rank: int, port: int, case: Case, out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from grouppo.embedded.synthetic import tiny_tokenizer

    torch.set_num_threads(1)  # two ranks on 2 cores; also keeps a forked child out of OpenMP's pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if dist.is_initialized():
        raise RuntimeError("a default process group already exists in this process (inherited by fork?)")
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=GLOO_TIMEOUT_S)
    )
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    tokenizer = tiny_tokenizer()
    model = build_model(tokenizer)
    if case.checkpoint_layers:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        layer_type = type(model.model.layers[0])
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, layer_type))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=case.reshard_after_forward)
    if case.shard_lm_head:
        fully_shard(model.lm_head, mesh=mesh, reshard_after_forward=case.reshard_after_forward)
    if case.output_bf16:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(output_dtype=torch.bfloat16))
    else:
        fully_shard(model, mesh=mesh)
    unsharded = [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]
    if unsharded:
        raise RuntimeError(f"fully_shard left parameters unsharded: {unsharded}")

    result: dict = {"case": asdict(case)}
    if case.grad:
        loss, logps = score(model, tokenizer, case, rank)
        loss.backward()
        # full_tensor() all-gathers each shard: the same collectives, in the same order, on both ranks.
        # Names as in the unwrapped model (a checkpoint wrapper adds a level to them).
        result["grads"] = {
            name.replace("_checkpoint_wrapped_module.", ""): (
                p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            ).detach().clone()
            for name, p in model.named_parameters()
        }
        result["loss"] = loss.detach()
    else:
        with torch.no_grad():
            loss, logps = score(model, tokenizer, case, rank)
        result["loss"] = loss
    result["logps"] = logps.detach()
    torch.save(result, out / f"rank{rank}.tmp")
    os.replace(out / f"rank{rank}.tmp", out / f"rank{rank}.pt")
    dist.barrier()
    del model
    dist.destroy_process_group()
