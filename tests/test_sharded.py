"""FSDP2 (``fully_shard``) with ragged work per rank: 2 CPU processes over gloo against one process.

``group_logps`` runs the backbone once per chunk of ``response_chunk_size`` responses (each chunk but the
last under a non-reentrant checkpoint that is recomputed in the backward) and the LM head once per
``logits_chunk_size`` tokens, all inside one forward call of the wrapped model. Under FSDP2 every
``fully_shard``-ed decoder layer all-gathers its parameters when it is called (and again in the backward,
and reduce-scatters after each backward through it), so ranks holding different numbers of responses or
tokens would make different numbers of collective calls and wait for each other until the process-group
timeout. ``grouppo.decoupled.agreed_calls`` makes every rank follow the same chunk plan (padding chunks
of weight 0 where a rank has less work), so with ragged work as with equal work the result must equal
one process computing the mean of the ranks' losses exactly (float64: 1e-10 relative).

Why the harness is shaped this way:

* The machines that run ``make test`` have CPUs only, and accelerate 1.15 runs an FSDP config on CPU as
  plain DistributedDataParallel without a word, so an ``accelerate launch`` test would never shard
  anything. The test drives ``torch.distributed.fsdp.fully_shard`` itself (each decoder layer, then the
  whole model, on ``init_device_mesh("cpu", (2,))``: torch 2.13 shards on CPU with nothing more), over
  gloo, the CPU backend, with no accelerate in between.
* The process group's timeout is 60 s (``sharded_worker.GLOO_TIMEOUT_S``), not the default 30 min, so a
  rank left waiting in a collective raises within a minute; a child still alive after 90 s is killed.
  Either way the test fails with "rank N hung: ..." instead of stalling the suite.
* The children write what they computed (full gradients via ``DTensor.full_tensor()``, or log-probs) to
  files in ``tmp_path``, or their traceback; the test process computes the one-process reference with
  the same builders (``sharded_worker``) and compares.
* Children are forked from the test process, which has already imported grouppo: a fresh interpreter
  spends about 10 s importing it (transformers, trl, datasets) on a 2-core machine, per rank and per case.
  Each child uses one thread. ``GROUPPO_SHARDED_START=spawn`` starts fresh interpreters instead.
* float64 throughout, so a wrong gradient (a missing or doubled reduce-scatter, a chunk counted twice)
  cannot hide in rounding.

The cases: an equal-work control (same shapes on both ranks); ragged work (rank 0: 2 groups of K=2 with
short responses; rank 1: K=5 and K=6 with longer ones), decoupled (``response_chunk_size=2``) and coupled,
``logits_chunk_size`` 4 and 512, decoder layers kept unsharded after forward or resharded (FULL_SHARD);
the LM head as its own ``fully_shard`` unit, where the number of token chunks decides its collectives
(otherwise it belongs to the root, which stays unsharded for the whole call); torch's
``checkpoint_wrapper`` around each layer (accelerate's FSDP activation checkpointing), whose recompute
runs on the shared prompt cache; and ``torch.no_grad()`` scoring, the reference pass.

Each rank's loss is the mean over its own groups; FSDP2 averages gradients over ranks, so the reference is
``(loss(rank 0 groups) + loss(rank 1 groups)) / 2`` on an unsharded copy of the same initial weights.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import socket
import time
from dataclasses import asdict

import pytest
import sharded_worker
import torch
from sharded_worker import Case

pytestmark = pytest.mark.slow  # two processes per case

HANG_LIMIT_S = 90  # past this a child is killed (the gloo timeout should have fired at 60 s)
RTOL = 1e-10  # float64

CASES = [
    # The control: same shapes on both ranks, so the same collective calls; the most collective-heavy
    # settings (decoupled, many token chunks, layers resharded after forward). Must pass.
    Case(ragged=False, response_chunk_size=2, logits_chunk_size=4, reshard_after_forward=True),
    # Ragged K and lengths: rank 0 two groups of K=2, short responses; rank 1 K=5 and K=6, longer ones.
    Case(ragged=True, response_chunk_size=2, logits_chunk_size=4, reshard_after_forward=False),
    Case(ragged=True, response_chunk_size=2, logits_chunk_size=512, reshard_after_forward=False),
    Case(ragged=True, response_chunk_size=None, logits_chunk_size=4, reshard_after_forward=False),
    Case(ragged=True, response_chunk_size=None, logits_chunk_size=512, reshard_after_forward=False),
    # Layers resharded after forward (FULL_SHARD): every layer call in the forward all-gathers again.
    Case(ragged=True, response_chunk_size=2, logits_chunk_size=4, reshard_after_forward=True),
    Case(ragged=True, response_chunk_size=None, logits_chunk_size=4, reshard_after_forward=True),
    # The LM head sharded on its own (as some wrap policies do): each token chunk's head call gathers it.
    Case(
        ragged=False,
        response_chunk_size=2,
        logits_chunk_size=4,
        reshard_after_forward=True,
        shard_lm_head=True,
    ),
    Case(
        ragged=True,
        response_chunk_size=None,
        logits_chunk_size=4,
        reshard_after_forward=True,
        shard_lm_head=True,
    ),
    # Activation checkpointing around each layer (what accelerate's fsdp_activation_checkpointing does):
    # the layers are recomputed in the backward on the shared prompt cache.
    Case(ragged=True, response_chunk_size=2, logits_chunk_size=4, reshard_after_forward=True,
         checkpoint_layers=True),
    Case(ragged=True, response_chunk_size=None, logits_chunk_size=512, reshard_after_forward=False,
         checkpoint_layers=True),
    # The root casts its outputs to bfloat16 (accelerate's FSDP2 mixed precision): the log-probs must keep
    # their float64 values (a sum of tens of log-probs rounded to bfloat16 is off by up to a nat).
    Case(ragged=True, response_chunk_size=2, logits_chunk_size=4, reshard_after_forward=True,
         output_bf16=True),
    Case(ragged=True, response_chunk_size=2, logits_chunk_size=4, reshard_after_forward=True, grad=False,
         output_bf16=True),
    # The reference pass: torch.no_grad() scoring of ragged groups, chunk after chunk.
    Case(ragged=True, response_chunk_size=2, logits_chunk_size=4, reshard_after_forward=False, grad=False),
    Case(ragged=True, response_chunk_size=2, logits_chunk_size=4, reshard_after_forward=True, grad=False),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _where(text: str) -> str:
    """The innermost grouppo frame and the innermost torch.distributed frame of a traceback."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', text)
    ours = [f for f in frames if "/grouppo/" in f[0] or "sharded_worker" in f[0]]
    dist_ = [f for f in frames if "torch/distributed" in f[0]]
    parts = []
    if ours:
        path, line, func = ours[-1]
        parts.append(f"{path.split('/src/')[-1].split('/tests/')[-1]}:{line} ({func})")
    if dist_:
        parts.append(f"{dist_[-1][2]} in {dist_[-1][0].split('torch/')[-1]}")
    backward = any(func == "backward" and path.endswith("torch/_tensor.py") for path, _, func in frames)
    return ("in the backward, " if backward else "in ") + " -> ".join(parts)


def _describe(rank: int, text: str) -> str:
    """One rank's failure (its ``rank{N}.err``): hung, dropped by its peer, or another error."""
    lines = text.strip().splitlines()
    header = lines[0].rstrip(":")  # "after 60.3 s"
    error = next((line for line in reversed(lines) if line.strip()), "")
    if "Timed out" in text:
        what = f"hung: a gloo collective timed out ({sharded_worker.GLOO_TIMEOUT_S} s)"
    elif "Connection closed by peer" in text or "Connection reset by peer" in text:
        what = "stopped: the other rank dropped the connection (it timed out or crashed first)"
    else:
        return f"rank {rank} failed {header}:\n" + "\n".join(lines[-30:])
    return f"rank {rank} {what} {header}, {_where(text)}\n    {error}"


def _run_ranks(case: Case, out_dir) -> list[dict]:
    """Run both ranks of ``case``; their results, or ``pytest.fail`` naming each rank that hung or failed."""
    ctx = mp.get_context(os.environ.get("GROUPPO_SHARDED_START", "fork"))
    port = _free_port()
    procs = [
        ctx.Process(
            target=sharded_worker.run_rank, args=(rank, port, asdict(case), str(out_dir)), daemon=True
        )
        for rank in range(sharded_worker.WORLD_SIZE)
    ]
    start = time.monotonic()
    for p in procs:
        p.start()
    killed = set()
    for rank, p in enumerate(procs):
        p.join(max(0.0, start + HANG_LIMIT_S - time.monotonic()))
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
            problems.append(f"rank {rank} hung: still running after {HANG_LIMIT_S} s, killed")
        elif err.exists():
            problems.append(_describe(rank, err.read_text()))
        elif not (out_dir / f"rank{rank}.pt").exists():
            why = " (SIGABRT: gloo aborts on a collective size mismatch, see the captured stderr)"
            problems.append(
                f"rank {rank} died with exit code {p.exitcode} and wrote nothing"
                + (why if p.exitcode == -6 else "")
            )
    if problems:
        pytest.fail(f"[{case.id}, {elapsed:.0f} s]\n" + "\n".join(problems), pytrace=False)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(sharded_worker.WORLD_SIZE)]


def _max_rel(got: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor) -> float:
    return float(((got - expected).abs().max() / scale).detach())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fully_shard_matches_one_process(case, tmp_path, tokenizer):
    results = _run_ranks(case, tmp_path)

    model = sharded_worker.build_model(tokenizer)  # the same initial weights, unsharded, one process
    ranks = range(sharded_worker.WORLD_SIZE)
    if case.grad:
        scored = [sharded_worker.score(model, tokenizer, case, rank) for rank in ranks]
        (sum(loss for loss, _ in scored) / len(scored)).backward()
        expected = {name: p.grad for name, p in model.named_parameters()}
    else:
        with torch.no_grad():
            scored = [sharded_worker.score(model, tokenizer, case, rank) for rank in ranks]

    for rank, result in enumerate(results):
        loss, logps = scored[rank]
        assert result["logps"].shape == logps.shape, f"rank {rank} scored {result['logps'].shape} responses"
        assert _max_rel(result["logps"], logps.detach(), logps.abs().max()) < RTOL, f"rank {rank} log-probs"
        assert _max_rel(result["loss"], loss.detach(), loss.abs()) < RTOL, f"rank {rank} loss"
        if not case.grad:
            continue
        grads = result["grads"]
        assert grads.keys() == expected.keys()
        scale = max(g.abs().max() for g in expected.values())
        errors = {name: _max_rel(grads[name], g, scale) for name, g in expected.items()}
        worst = max(errors, key=errors.get)
        assert errors[worst] < RTOL, (
            f"rank {rank}: gradient of {worst} differs from one process by {errors[worst]:.2e} "
            f"(relative to the largest gradient entry)"
        )
