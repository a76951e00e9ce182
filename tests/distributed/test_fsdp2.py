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
* The process group's timeout is 60 s (``harness.GLOO_TIMEOUT_S``), not the default 30 min, so a
  rank left waiting in a collective raises within a minute; a child still alive after 90 s is killed.
  Either way the test fails with "rank N hung: ..." instead of stalling the suite.
* The children write what they computed (full gradients via ``DTensor.full_tensor()``, or log-probs) to
  files in ``tmp_path``, or their traceback; the test process computes the one-process reference with
  the same builders (``harness``) and compares.
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

import harness
import pytest
import torch
from harness import Case

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


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fully_shard_matches_one_process(case, tmp_path, tokenizer):
    results = harness.run_ranks(harness.run_rank, case, tmp_path, HANG_LIMIT_S)

    model = harness.build_model(tokenizer)  # the same initial weights, unsharded, one process
    ranks = range(harness.WORLD_SIZE)
    if case.grad:
        scored = [harness.score(model, tokenizer, case, rank) for rank in ranks]
        (sum(loss for loss, _ in scored) / len(scored)).backward()
        expected = {name: p.grad for name, p in model.named_parameters()}
    else:
        with torch.no_grad():
            scored = [harness.score(model, tokenizer, case, rank) for rank in ranks]

    for rank, result in enumerate(results):
        harness.compare_scores(rank, result, *scored[rank], RTOL)
        if case.grad:
            harness.compare_tensors("gradient", rank, result["grads"], expected, RTOL)
