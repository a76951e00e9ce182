"""One rank of the FSDP2 harness in ``test_sharded.py``: the model, the groups and the loss both sides use.

``run_rank`` is the child process: it joins a 2-process gloo group, shards the tiny Llama with
``fully_shard``, scores its own groups and writes what it got (full gradients, or log-probs without
gradients) to ``rank{N}.pt`` in the output folder, or the traceback to ``rank{N}.err``. The test process
builds the same model and groups with ``build_model`` and ``rank_groups`` for the one-process reference.
Not a test module (pytest collects only ``test_*.py``).
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import re
import socket
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
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
    from grouppo.embedded.synthetic import random_groups

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
    guarded(_run, rank, port, Case(**case), out_dir)


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
            )
            .detach()
            .clone()
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


# ---------------------------------------------------------------------------------------------- the harness
# Shared by test_sharded.py (FSDP2) and test_zero3.py (DeepSpeed ZeRO-3): start the ranks, kill the ones
# that hang, and turn each rank's failure into one readable line.
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a ``python -m grouppo`` subprocess: this checkout's ``src`` first on the path."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def cli_inputs(root: Path, tokenizer: Any, groups: list[dict], config: str) -> Path:
    """A tiny model, its tokenizer and ``groups`` under ``root``, and a YAML config naming them followed
    by the lines of ``config``; returns the config's path."""
    from grouppo.embedded.synthetic import tiny_llama
    from grouppo.load import write_jsonl

    tiny_llama(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_jsonl(groups, root / "groups.jsonl")
    path = root / "cfg.yaml"
    path.write_text(f"model_name_or_path: {root / 'model'}\ndataset_name: {root / 'groups.jsonl'}\n{config}")
    return path


def where(text: str) -> str:
    """The innermost grouppo, DeepSpeed and torch.distributed frames of a traceback."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', text)
    parts = []
    ours = [f for f in frames if "/grouppo/" in f[0] or "_worker.py" in f[0]]
    if ours:
        path, line, func = ours[-1]
        parts.append(f"{path.split('/src/')[-1].split('/tests/')[-1]}:{line} ({func})")
    for marker in ("/deepspeed/", "/torch/distributed/"):
        inner = [f for f in frames if marker in f[0] and not f[0].endswith("/utils/nvtx.py")]
        if inner:
            path, line, func = inner[-1]
            parts.append(f"{func} in {marker.strip('/')}/{path.split(marker)[-1]}:{line}")
    backward = any(func == "backward" and path.endswith("torch/_tensor.py") for path, _, func in frames)
    return ("in the backward, " if backward else "in ") + " -> ".join(parts)


def describe(rank: int, text: str) -> str:
    """One rank's failure (its ``rank{N}.err``): hung, dropped by its peer, or another error."""
    lines = text.strip().splitlines()
    header = lines[0].rstrip(":")  # "after 60.3 s"
    error = next((line for line in reversed(lines) if line.strip()), "")
    if "Timed out" in text:
        what = f"hung: a gloo collective timed out ({GLOO_TIMEOUT_S} s)"
    elif "Connection closed by peer" in text or "Connection reset by peer" in text:
        what = "stopped: the other rank dropped the connection (it timed out or crashed first)"
    else:
        return f"rank {rank} failed {header}:\n" + "\n".join(lines[-30:])
    return f"rank {rank} {what} {header}, {where(text)}\n    {error}"


def run_ranks(target: Any, case: Any, out_dir: Path, hang_limit_s: float) -> list[dict]:
    """Run ``target(rank, port, asdict(case), out_dir)`` in each rank's process; their results, or
    ``pytest.fail`` naming each rank that hung (killed after ``hang_limit_s``) or failed."""
    ctx = mp.get_context(os.environ.get("GROUPPO_SHARDED_START", "fork"))
    port = free_port()
    procs = [
        ctx.Process(target=target, args=(rank, port, asdict(case), str(out_dir)), daemon=True)
        for rank in range(WORLD_SIZE)
    ]
    start = time.monotonic()
    for p in procs:
        p.start()
    killed = set()
    for rank, p in enumerate(procs):
        p.join(max(0.0, start + hang_limit_s - time.monotonic()))
        if p.is_alive():
            killed.add(rank)
    for rank in killed:
        procs[rank].kill()  # this child only, by its own process id
        procs[rank].join(10)
    elapsed = time.monotonic() - start

    problems = []
    for rank, p in enumerate(procs):
        err = out_dir / f"rank{rank}.err"
        if rank in killed:
            problems.append(f"rank {rank} hung: still running after {hang_limit_s} s, killed")
        elif err.exists():
            problems.append(describe(rank, err.read_text()))
        elif not (out_dir / f"rank{rank}.pt").exists():
            why = " (SIGABRT: gloo aborts on a collective size mismatch, see the captured stderr)"
            problems.append(
                f"rank {rank} died with exit code {p.exitcode} and wrote nothing"
                + (why if p.exitcode == -6 else "")
            )
    if problems:
        pytest.fail(f"[{case.id}, {elapsed:.0f} s]\n" + "\n".join(problems), pytrace=False)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def max_rel(got: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor) -> float:
    return float(((got - expected).abs().max() / scale).detach())


def compare_scores(rank: int, result: dict, loss: torch.Tensor, logps: torch.Tensor, rtol: float) -> None:
    """A rank's log-probs and loss against one process's."""
    assert result["logps"].shape == logps.shape, f"rank {rank} scored {result['logps'].shape} responses"
    got = max_rel(result["logps"], logps.detach(), logps.abs().max())
    assert got < rtol, f"rank {rank} log-probs"
    assert max_rel(result["loss"], loss.detach(), loss.abs()) < rtol, f"rank {rank} loss"


def compare_tensors(what: str, rank: int, got: dict, expected: dict, rtol: float) -> None:
    """Per-parameter tensors (gradients, updates) against one process's, relative to the largest entry."""
    assert got.keys() == expected.keys(), f"rank {rank}: {what} of other parameters"
    scale = max(t.abs().max() for t in expected.values())
    errors = {name: max_rel(got[name], t, scale) for name, t in expected.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < rtol, (
        f"rank {rank}: {what} of {worst} differs from one process by {errors[worst]:.2e} "
        f"(relative to the largest entry)"
    )


_BUILD_SHM_OP = 'import importlib; importlib.import_module("deepspeed.comm.torch").build_shm_op()'


def prepare_deepspeed_cpu() -> None:
    """For a DeepSpeed test module's fixture: skip without DeepSpeed, and build its CPU communication op
    (``deepspeed_shm_comm``, compiled with g++ the first time, then cached) once, in a separate
    interpreter, outside the children's hang budget."""
    import subprocess
    import sys

    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    probe = subprocess.run(
        [sys.executable, "-c", "import deepspeed"], env=env, capture_output=True, text=True, timeout=300
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"`import deepspeed` fails ({last}): install deepspeed to run the DeepSpeed harnesses")
    build = subprocess.run(
        [sys.executable, "-c", _BUILD_SHM_OP], env=env, capture_output=True, text=True, timeout=600
    )
    if build.returncode != 0:
        pytest.fail("DeepSpeed's CPU communication op (deepspeed_shm_comm) did not build:\n"
                    + build.stderr[-3000:], pytrace=False)  # fmt: skip


def guarded(run: Any, rank: int, port: int, case: Any, out_dir: str) -> None:
    """A rank's child process: ``run(rank, port, case, out)``, or its failure written to ``rank{N}.err``."""
    faulthandler.disable()  # inherited from pytest by fork: a gloo abort would dump every module's name
    out = Path(out_dir)
    start = time.monotonic()
    try:
        run(rank, port, case, out)
    except BaseException:
        # Write the failure and leave at once: tearing the process group down after a failed collective
        # can itself block, and the test reads this file.
        text = f"after {time.monotonic() - start:.1f} s:\n{traceback.format_exc()}"
        (out / f"rank{rank}.err").write_text(text)
        os._exit(1)
