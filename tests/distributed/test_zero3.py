"""DeepSpeed ZeRO-3 with ragged work per rank: 2 CPU processes over gloo against one process.

The ZeRO-3 half of ``grouppo.decoupled.agreed_calls`` (``test_sharded.py`` is the FSDP2 half). Under
ZeRO stage 3 every module's parameters are partitioned across ranks and all-gathered by a hook each time
the module is called (forward, and again in the backward and in a checkpoint's recompute), and each
gradient is reduce-scattered as the backward completes it; ranks that called the backbone or the LM head
different numbers of times would wait for each other in those collectives. ``is_sharded`` recognises a
ZeRO-3 model by the ``ds_id`` DeepSpeed sets on every parameter, and the ranks follow one chunk plan
(padding chunks of weight 0), so with ragged work as with equal work the result must equal one process
computing the mean of the ranks' losses.

Why the harness is shaped this way:

* The engine is built with ``deepspeed.initialize`` itself, on DeepSpeed's CPU accelerator over gloo:
  accelerate, given a DeepSpeed config on a machine without GPUs, would not run ZeRO at all.
* ZeRO-3 settings that leave no parameter whole on a rank (``stage3_param_persistence_threshold: 0``;
  the default keeps every parameter of this tiny model unpartitioned) and release parameters after each
  call (``stage3_max_reuse_distance: 0``), with small prefetch and reduce buckets: every layer call
  gathers. The worker checks that every parameter is partitioned before scoring.
* float32: ZeRO-3 keeps float32 master weights and gradients, so the tolerance is 1e-5 relative to the
  largest entry (float64's 1e-10 is out of reach); a missing or doubled reduction, or a chunk counted
  twice, is still off by a factor of order 1.
* The process group's timeout is 60 s (``harness.GLOO_TIMEOUT_S``), so a rank left waiting in a
  collective raises within a minute; a child still alive after ``HANG_LIMIT_S`` is killed. Either way the
  test fails with "rank N hung: ..." instead of stalling the suite.
* DeepSpeed's CPU communication backend compiles a small C++ op (``deepspeed_shm_comm``, g++ and ninja,
  about 30-90 s the first time, then cached under ``~/.cache/torch_extensions``) when the engine's
  communication starts. A module fixture builds it once in a separate interpreter, so the children find
  it cached instead of spending their hang budget compiling; the same fixture skips the module when
  ``import deepspeed`` fails.
* Children are forked from the test process (as in ``test_sharded.py``); ``GROUPPO_SHARDED_START=spawn``
  starts fresh interpreters instead.

Cases: an equal-work control; ragged work (``harness.rank_groups``: rank 0 two groups of K=2 with
short responses, rank 1 K=5 and K=6 with longer ones), decoupled (``response_chunk_size=2``) and coupled,
``logits_chunk_size`` 4 and 512; ``torch.no_grad()`` scoring (the reference pass); optimizer steps
(``engine.step()`` with SGD, compared with one process's SGD steps: one, and four whose second batch
has another chunk plan, so that ZeRO-3's trace of the module order, by which it prefetches and releases
parameters from the second step on, is broken, dropped, recorded again and then followed through a whole
step: see ``zero3_worker.Case.sharded``); and the model built under
``deepspeed.zero.Init`` (partitioned as it is built) instead of handed to ``deepspeed.initialize`` whole.

DeepSpeed averages gradients over ranks, so the reference is ``(loss(rank 0 groups) + loss(rank 1
groups)) / 2`` on an unsharded copy of the same initial weights.
"""

from __future__ import annotations

import harness
import pytest
import torch
import zero3_worker
from zero3_worker import Case

pytestmark = pytest.mark.slow  # two processes per case

HANG_LIMIT_S = 120  # past this a child is killed (the gloo timeout should have fired at 60 s)
RTOL = 1e-5  # float32

CASES = [
    # The control: same shapes on both ranks, so the same collective calls whatever the plan. Must pass.
    Case(ragged=False, response_chunk_size=2, logits_chunk_size=4),
    # Ragged K and lengths: rank 0 two groups of K=2, short responses; rank 1 K=5 and K=6, longer ones.
    Case(ragged=True, response_chunk_size=2, logits_chunk_size=4),
    Case(ragged=True, response_chunk_size=2, logits_chunk_size=512),
    Case(ragged=True, response_chunk_size=None, logits_chunk_size=4),
    Case(ragged=True, response_chunk_size=None, logits_chunk_size=512),
    # The reference pass: torch.no_grad() scoring of ragged groups, chunk after chunk.
    Case(ragged=True, response_chunk_size=2, logits_chunk_size=4, grad=False),
    # Optimizer steps: the updated full weights against one process's SGD steps. Four steps: ragged,
    # equal work (another chunk plan: ZeRO-3 drops the module trace it recorded), ragged (recorded again),
    # ragged (prefetching and releasing by that trace for the whole step).
    Case(ragged=True, response_chunk_size=2, logits_chunk_size=4, steps=1),
    Case(ragged=True, response_chunk_size=2, logits_chunk_size=4, steps=4),
    Case(ragged=True, response_chunk_size=None, logits_chunk_size=4, steps=4),
    # The model built under deepspeed.zero.Init (each parameter partitioned as soon as it exists).
    Case(ragged=False, response_chunk_size=2, logits_chunk_size=4, zero_init=True),
    Case(ragged=True, response_chunk_size=2, logits_chunk_size=4, zero_init=True, steps=4),
    Case(ragged=True, response_chunk_size=None, logits_chunk_size=512, zero_init=True),
]


@pytest.fixture(scope="module", autouse=True)
def _deepspeed_cpu():
    harness.prepare_deepspeed_cpu()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_zero3_matches_one_process(case, tmp_path, tokenizer):
    results = harness.run_ranks(zero3_worker.run_rank, case, tmp_path, HANG_LIMIT_S)

    model = zero3_worker.build_model(tokenizer)  # the same initial weights, unsharded, one process
    ranks = range(zero3_worker.WORLD_SIZE)
    if case.grad:
        scored = [harness.score(model, tokenizer, case.sharded(), rank) for rank in ranks]
        (sum(loss for loss, _ in scored) / len(scored)).backward()
        expected = {name: p.grad.clone() for name, p in model.named_parameters()}
        if case.steps:
            initial = {name: p.detach().clone() for name, p in model.named_parameters()}
            _sgd_steps(model, tokenizer, case, expected)
            updates = _updates(dict(model.named_parameters()), initial)
    else:
        with torch.no_grad():
            scored = [harness.score(model, tokenizer, case.sharded(), rank) for rank in ranks]

    for rank, result in enumerate(results):
        harness.compare_scores(rank, result, *scored[rank], RTOL)
        if not case.grad:
            continue
        harness.compare_tensors("gradient", rank, result["grads"], expected, RTOL)
        if case.steps:
            # SGD (no momentum) from the same weights: w - lr * grad at each step. Compared as the total
            # update (new - old) relative to its largest entry, so that float32 rounding of the weights
            # themselves (about 1e-7 of |w|) does not hide a wrong update.
            got = _updates(result["weights"], initial)
            harness.compare_tensors("SGD update", rank, got, updates, RTOL)


def _sgd_steps(model, tokenizer, case: Case, grads: dict) -> None:
    """``case.steps`` SGD steps of ``model`` in one process, each on the mean of the ranks' losses at that
    step (``grads``: the first step's gradients, already computed)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=zero3_worker.LR)
    for step in range(case.steps):
        if step:
            optimizer.zero_grad()
            scored = [harness.score(model, tokenizer, case.sharded(step), rank)
                      for rank in range(zero3_worker.WORLD_SIZE)]  # fmt: skip
            (sum(loss for loss, _ in scored) / len(scored)).backward()
        else:
            for name, p in model.named_parameters():
                p.grad = grads[name].clone()
        optimizer.step()


def _updates(weights: dict, initial: dict) -> dict:
    return {name: w.detach() - initial[name] for name, w in weights.items()}
