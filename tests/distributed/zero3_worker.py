"""One rank of the DeepSpeed ZeRO-3 harness in ``test_zero3.py``.

``run_rank`` is the child process: it joins a 2-process gloo group, wraps the tiny Llama of
``harness.build_model`` in a ZeRO stage 3 engine (``deepspeed.initialize``, CPU accelerator),
scores its own groups (``harness.rank_groups`` and ``harness.score``: the same groups and
loss as the FSDP2 harness) through the engine, runs ``engine.backward`` and writes what it got (full
gradients via ``safe_get_full_grad``, the updated full weights after ``engine.step()``s, or log-probs
without gradients) to ``rank{N}.pt`` in the output folder, or the traceback to ``rank{N}.err``.
Not a test module (pytest collects only ``test_*.py``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import harness
import torch

WORLD_SIZE = harness.WORLD_SIZE
GLOO_TIMEOUT_S = harness.GLOO_TIMEOUT_S  # a collective the other rank never joins raises after this
LR = 0.1  # SGD, no momentum: one step is w - LR * grad
DTYPE = torch.float32  # ZeRO-3 partitions half, bfloat16 or float32 only (zero.Init asserts on float64)


@dataclass(frozen=True)
class Case:
    """One run of the harness: what each rank scores and how the engine is built."""

    ragged: bool  # False: both ranks hold groups of the same shapes
    response_chunk_size: int | None  # 2: decoupled backward; None: coupled
    logits_chunk_size: int  # LM-head tokens per chunk
    grad: bool = True  # False: score under torch.no_grad() (the reference pass) and compare log-probs
    zero_init: bool = False  # build the model under deepspeed.zero.Init (partitioned as it is built)
    steps: int = 0  # engine.step()s to take (see step_case), then return the updated full weights

    @property
    def id(self) -> str:
        return "-".join(
            [
                "ragged" if self.ragged else "equal",
                "decoupled" if self.response_chunk_size else "coupled",
                f"logits{self.logits_chunk_size}",
                "grad" if self.grad else "nograd",
            ]
            + (["zeroinit"] if self.zero_init else [])
            + ([f"steps{self.steps}"] if self.steps else [])
        )

    def sharded(self, step: int = 0) -> harness.Case:
        """The FSDP2 harness's case with the same chunk sizes, for its builders, and the groups of optimizer
        step ``step`` (from 0): the case's own, but equal work at step 1.

        ZeRO-3 records the order in which modules run during the first step and, from the second on,
        prefetches parameters and releases them by that trace until a module comes out of order. Step 1
        (equal work: another chunk plan) breaks the trace of step 0, so DeepSpeed drops it and records
        step 2's; step 3, with the same plan as step 2, then runs entirely on prefetching and
        trace-driven release. Every rank must see the same order at each step for any of this to agree.
        """
        return harness.Case(
            ragged=self.ragged and step != 1,
            response_chunk_size=self.response_chunk_size,
            logits_chunk_size=self.logits_chunk_size,
            reshard_after_forward=False,
            grad=self.grad,
        )


def build_model(tokenizer) -> torch.nn.Module:
    """The FSDP2 harness's tiny Llama (2 layers, hidden 32, seed 0) in float32: the same initial weights."""
    return harness.build_model(tokenizer).to(DTYPE)


def ds_config() -> dict:
    """ZeRO stage 3, float32, with every parameter partitioned and gathered at each module call.

    ``stage3_param_persistence_threshold: 0`` partitions even the norms' weights (the default keeps
    parameters under 1e5 elements whole on every rank, which for this model would be all of them);
    ``stage3_max_reuse_distance: 0`` releases a module's parameters after each call instead of keeping
    them for a call soon after; small prefetch and reduce buckets so that prefetching and the gradient
    reduce-scatter work layer by layer as they would on a real model.
    """
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_max_reuse_distance": 0,
            "stage3_max_live_parameters": 4096,
            "stage3_prefetch_bucket_size": 2048,
            "reduce_bucket_size": 2048,
            "allgather_bucket_size": 2048,
            "overlap_comm": False,
            "contiguous_gradients": True,
        },
        "zero_allow_untested_optimizer": True,  # the torch SGD given to deepspeed.initialize
        "gradient_clipping": 0.0,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def _build_under_zero_init(tokenizer, config: dict) -> torch.nn.Module:
    """The model as transformers builds it for ZeRO-3 (``from_pretrained``/``from_config`` with an
    ``HfDeepSpeedConfig`` alive: under ``deepspeed.zero.Init``, each parameter partitioned as soon as it
    exists), then given ``build_model``'s weights (transformers initialised it with its own draws)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    reference = build_model(tokenizer)
    hf_ds_config = HfDeepSpeedConfig(config)  # transformers holds it by weak reference: keep it alive
    model = type(reference)._from_config(reference.config, dtype=DTYPE)
    del hf_ds_config
    params = dict(model.named_parameters())
    whole = [name for name, p in params.items() if not hasattr(p, "ds_id") or p.numel() != 0]
    if whole:
        raise RuntimeError(f"not partitioned as built under zero.Init: {whole}")
    # modifier_rank: on leaving, rank 0's full tensors are broadcast and partitioned again (with None
    # DeepSpeed keeps the old partitions and the copy is lost).
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0), torch.no_grad():
        for name, p in reference.named_parameters():
            params[name].copy_(p)
        for name, b in reference.named_buffers():
            model.get_buffer(name).copy_(b)
    return model


def run_rank(rank: int, port: int, case: dict, out_dir: str) -> None:
    """The child process of rank ``rank``: writes ``rank{N}.pt`` or ``rank{N}.err`` in ``out_dir``."""
    harness.guarded(_run, rank, port, Case(**case), out_dir)


def _run(rank: int, port: int, case: Case, out: Path) -> None:
    import torch.distributed as dist

    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    from deepspeed.accelerator import set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from grouppo.embedded.synthetic import tiny_tokenizer

    torch.set_num_threads(1)  # two ranks on 2 cores; also keeps a forked child out of OpenMP's pool
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        LOCAL_WORLD_SIZE=str(WORLD_SIZE),
    )
    if dist.is_initialized():
        raise RuntimeError("a default process group already exists in this process (inherited by fork?)")
    set_accelerator(CPU_Accelerator())  # even if a parent process chose another (forked children)
    timeout = timedelta(seconds=GLOO_TIMEOUT_S)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timeout)
    deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)  # adopts the group made above

    tokenizer = tiny_tokenizer()
    config = ds_config()
    if case.zero_init:
        model = _build_under_zero_init(tokenizer, config)
    else:
        model = build_model(tokenizer)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    missing = [n for n, p in engine.module.named_parameters() if not hasattr(p, "ds_id")]
    whole = [n for n, p in engine.module.named_parameters() if p.ds_tensor.numel() == p.ds_numel]
    if missing or whole:
        raise RuntimeError(f"ZeRO-3 left parameters unpartitioned: {missing or whole}")

    result: dict = {"case": asdict(case)}
    if case.grad:
        loss, logps = harness.score(engine, tokenizer, case.sharded(), rank)
        engine.backward(loss)
        # safe_get_full_grad all-gathers each parameter's reduced gradient partition: the same
        # collectives, in the same order, on both ranks.
        result["grads"] = {
            name: safe_get_full_grad(p).detach().clone() for name, p in engine.module.named_parameters()
        }
        result["loss"] = loss.detach()
        for step in range(1, case.steps + 1):
            engine.step()
            if step < case.steps:
                next_loss, _ = harness.score(engine, tokenizer, case.sharded(step), rank)
                engine.backward(next_loss)
        if case.steps:
            result["weights"] = {
                name: safe_get_full_fp32_param(p).detach().clone()
                for name, p in engine.module.named_parameters()
            }
    else:
        with torch.no_grad():
            loss, logps = harness.score(engine, tokenizer, case.sharded(), rank)
        result["loss"] = loss
    result["logps"] = logps.detach()
    torch.save(result, out / f"rank{rank}.tmp")
    os.replace(out / f"rank{rank}.tmp", out / f"rank{rank}.pt")
    dist.barrier()
    del engine, model
    dist.destroy_process_group()
