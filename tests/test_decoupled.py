"""Scoring path and decoupled backward: values against a naive full-logit computation, gradients of the
decoupled backward against the coupled one for every loss, prompt sharing and token chunking."""

import pytest
import torch
from conftest import grads, loss_grad, random_groups

from grouppo.collate import GroupCollator
from grouppo.decoupled import chunks, group_logps
from grouppo.embedded.synthetic import tiny_llama
from grouppo.logps import lm_parts, prompt_pass, responses_pass
from grouppo.losses import LOSSES


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
@pytest.mark.parametrize("sizes,positives", [([2, 2], [1, 1]), ([5, 3], [2, 1]), ([8], [4])])
def test_decoupled_equals_coupled_float64(tokenizer, loss_type, sizes, positives):
    model = tiny_llama(tokenizer).double()
    batch = GroupCollator(pad_token_id=tokenizer.pad_token_id)(
        random_groups(sizes, positives, seed=len(sizes))
    )
    coupled = loss_grad(model, batch, loss_type, response_chunk_size=None)
    for chunk in (1, 3):
        decoupled = loss_grad(model, batch, loss_type, response_chunk_size=chunk)
        rel = ((decoupled - coupled).abs().max() / coupled.abs().max()).item()
        assert rel <= 1e-10, (loss_type, sizes, chunk, rel)


@pytest.mark.parametrize("loss_type", ["all_pairs", "plackett_luce"])
def test_decoupled_equals_coupled_float32(tokenizer, loss_type):
    model = tiny_llama(tokenizer)
    batch = GroupCollator(pad_token_id=tokenizer.pad_token_id)(random_groups([6, 4], [3, 2], seed=3))
    coupled = loss_grad(model, batch, loss_type, response_chunk_size=None)
    for chunk in (1, 2, 4):
        decoupled = loss_grad(model, batch, loss_type, response_chunk_size=chunk)
        assert ((decoupled - coupled).abs().max() / coupled.abs().max()).item() <= 1e-5


def test_decoupled_backward_runs_the_lm_head_twice_per_chunk(tokenizer):
    # Forward and one recompute: nesting the head's token checkpoint inside the chunk checkpoint would
    # add a third, wasted forward of the head per chunk.
    model = tiny_llama(tokenizer)
    batch = GroupCollator(pad_token_id=tokenizer.pad_token_id)(random_groups([8], [4]))
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    for chunk, expected in ((None, 2), (4, 4), (1, 16)):
        calls.clear()
        group_logps(model, batch, response_chunk_size=chunk, logits_chunk_size=10**6).sum().backward()
        assert len(calls) == expected, (chunk, len(calls))


def test_dropout_mask_is_replayed_in_the_recompute(tokenizer):
    model = tiny_llama(tokenizer, attention_dropout=0.3).double().train()
    batch = GroupCollator(pad_token_id=tokenizer.pad_token_id)(random_groups([4], [2]))
    w = torch.randn(4, dtype=torch.float64)
    torch.manual_seed(7)
    model.zero_grad()
    (group_logps(model, batch, response_chunk_size=2) * w).sum().backward()
    decoupled = grads(model)
    # The same chunks without checkpointing, same seed: same dropout masks, so the same gradient.
    torch.manual_seed(7)
    model.zero_grad()
    parts = lm_parts(model)
    prompt = prompt_pass(parts, batch)
    logps = torch.cat([responses_pass(parts, batch, prompt, rows) for rows in chunks(4, 2)])
    (logps * w).sum().backward()
    plain = grads(model)
    assert ((decoupled - plain).abs().max() / plain.abs().max()).item() <= 1e-10
    torch.manual_seed(8)
    model.zero_grad()
    (group_logps(model, batch, response_chunk_size=2) * w).sum().backward()
    assert not torch.allclose(grads(model), plain)  # dropout is really on


def test_chunks_cover_rows_and_reject_bad_sizes():
    assert chunks(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert chunks(5, None) == [slice(0, 5)]
    with pytest.raises(ValueError):
        chunks(5, 0)


def test_last_chunk_is_not_recomputed_and_is_freed_before_the_first_recompute(tokenizer):
    # The backbone runs once for the prompt, once per chunk, and again for every chunk but the last in
    # the backward. The last chunk's kept activations must be used (and freed) before any recompute
    # starts, or two chunks would be alive at once.
    model = tiny_llama(tokenizer)
    batch = GroupCollator(pad_token_id=tokenizer.pad_token_id)(random_groups([6], [3]))
    events = []
    model.model.embed_tokens.register_forward_hook(lambda *_: events.append("forward"))
    model.model.norm.register_full_backward_hook(lambda *_: events.append("backward"))
    for chunk, n_chunks in ((None, 1), (6, 1), (3, 2), (1, 6)):
        logps = group_logps(model, batch, response_chunk_size=chunk)
        assert events.count("forward") == 1 + n_chunks, chunk
        events.clear()
        logps.sum().backward()
        assert events.count("forward") == n_chunks - 1, (chunk, events)
        assert events[0] == "backward", (chunk, events)
        events.clear()


def test_bfloat16_autocast_gradient_is_the_float32_gradient_to_bfloat16_precision(tokenizer):
    """Mixed precision (float32 weights, bfloat16 matrix products): the decoupled backward still equals
    the coupled one, and both point where float32's does."""
    model = tiny_llama(tokenizer)
    batch = GroupCollator(pad_token_id=tokenizer.pad_token_id)(random_groups([4, 3], [2, 1], seed=5))
    full = loss_grad(model, batch, "all_pairs", response_chunk_size=None)
    with torch.autocast("cpu", torch.bfloat16):
        coupled = loss_grad(model, batch, "all_pairs", response_chunk_size=None)
        decoupled = loss_grad(model, batch, "all_pairs", response_chunk_size=2)
    assert decoupled.dtype == torch.float32
    assert ((decoupled - coupled).abs().max() / coupled.abs().max()).item() <= 1e-2
    cosine = torch.nn.functional.cosine_similarity(coupled, full, dim=0).item()
    assert cosine > 0.999, cosine
