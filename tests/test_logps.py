"""grouppo.logps: per-response log-probs equal the full-logits computation, the prompt runs once and is
shared exactly, the LM head is chunked exactly and stays float32 under autocast."""

import pytest
import torch
from conftest import loss_grad, random_groups

from grouppo.collate import GroupCollator
from grouppo.decoupled import group_logps
from grouppo.embedded.synthetic import tiny_llama
from grouppo.logps import lm_parts


def naive_logps(model, feats):
    """Each response scored as one full sequence with full logits: the definition, no tricks."""
    out = []
    for f in feats:
        for r in f["response_ids"]:
            ids = torch.tensor([f["prompt_ids"] + r])
            logp = model(ids).logits.log_softmax(-1)[0]
            start = len(f["prompt_ids"]) - 1
            out.append(logp[start + torch.arange(len(r)), torch.tensor(r)].sum())
    return torch.stack(out)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_logps_equal_naive_full_logits(tokenizer, share_prompt):
    model = tiny_llama(tokenizer).double()
    feats = random_groups([3, 2, 4], [1, 1, 2], prompt_lens=[5, 2, 7])
    batch = GroupCollator(pad_token_id=tokenizer.pad_token_id)(feats)
    got = group_logps(model, batch, response_chunk_size=2, share_prompt=share_prompt, logits_chunk_size=3)
    torch.testing.assert_close(got, naive_logps(model, feats), rtol=1e-12, atol=1e-12)


def test_shared_prompt_gradient_equals_unshared(tokenizer):
    # LlamaRMSNorm computes in float32 even in a float64 model, so the two layouts (different shapes,
    # different rounding) agree to float32 precision; each equals the naive definition in value (above).
    model = tiny_llama(tokenizer).double()
    batch = GroupCollator(pad_token_id=tokenizer.pad_token_id)(
        random_groups([4, 3], [2, 1], prompt_lens=[6, 3])
    )
    shared = loss_grad(model, batch, "all_pairs", response_chunk_size=2, share_prompt=True)
    unshared = loss_grad(model, batch, "all_pairs", response_chunk_size=2, share_prompt=False)
    assert ((shared - unshared).abs().max() / unshared.abs().max()).item() <= 1e-6


def test_transformers_gradient_checkpointing_falls_back_to_exact_unshared_scoring(tokenizer):
    # Under gradient checkpointing, transformers' layers drop the KV cache in training mode: the prompt
    # cannot be shared, and scoring must notice instead of failing or reading an empty cache.
    model = tiny_llama(tokenizer).double().train()
    batch = GroupCollator(pad_token_id=tokenizer.pad_token_id)(random_groups([4, 3], [2, 1]))
    unshared = loss_grad(model, batch, "all_pairs", response_chunk_size=2, share_prompt=False)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = loss_grad(model, batch, "all_pairs", response_chunk_size=2, share_prompt=True)
    assert ((checkpointed - unshared).abs().max() / unshared.abs().max()).item() <= 1e-10


@pytest.mark.parametrize("response_chunk_size", [None, 2])
def test_a_checkpoint_wrapper_around_each_layer_keeps_the_shared_prompt_exact(tokenizer, response_chunk_size):
    # torch's checkpoint_wrapper (what accelerate's FSDP activation checkpointing applies) recomputes a
    # layer on the same cache object: the prompt cache must not grow in the recompute, and the prompt
    # stays shared (one prompt pass per group).
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model = tiny_llama(tokenizer).double().train()
    batch = GroupCollator(pad_token_id=tokenizer.pad_token_id)(random_groups([4, 3], [2, 1]))
    unshared = loss_grad(model, batch, "all_pairs", response_chunk_size=2, share_prompt=False)
    plain = loss_grad(model, batch, "all_pairs", response_chunk_size=response_chunk_size, share_prompt=True)
    layer = type(model.model.layers[0])
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, layer))
    assert sum("CheckpointWrapper" in type(m).__name__ for m in model.modules()) == len(model.model.layers)
    prompt_passes = []
    model.model.register_forward_hook(lambda m, a, kw, out: prompt_passes.append(kw.get("input_ids").shape),
                                      with_kwargs=True)  # fmt: skip
    shared = loss_grad(model, batch, "all_pairs", response_chunk_size=response_chunk_size, share_prompt=True)
    assert ((shared - plain).abs().max() / plain.abs().max()).item() <= 1e-12  # the same computation
    # and the unshared layout to float32 precision (RMSNorm computes in float32; see the test above)
    assert ((shared - unshared).abs().max() / unshared.abs().max()).item() <= 1e-6
    assert prompt_passes[0] == batch["prompt_ids"].shape  # the first backbone call is the shared prompt pass


def test_prompt_runs_once_per_group(tokenizer):
    model = tiny_llama(tokenizer)
    batch = GroupCollator(pad_token_id=tokenizer.pad_token_id)(
        random_groups([8, 8], [4, 4], prompt_lens=[9, 9])
    )
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    group_logps(model, batch, response_chunk_size=4)
    hook.remove()
    # one prompt pass over both groups ([2, 9]), then four chunks of 4 responses: no prompt tokens in them
    assert seen[0] == torch.Size([2, 9])
    assert all(shape[0] == 4 and shape[1] == batch["response_ids"].shape[1] for shape in seen[1:])


def test_token_chunking_is_exact(tokenizer):
    model = tiny_llama(tokenizer).double()
    batch = GroupCollator(pad_token_id=tokenizer.pad_token_id)(random_groups([3, 3], [1, 2]))
    whole = loss_grad(model, batch, "all_pairs", response_chunk_size=2, logits_chunk_size=10_000)
    tiny = loss_grad(model, batch, "all_pairs", response_chunk_size=2, logits_chunk_size=2)
    assert ((whole - tiny).abs().max() / whole.abs().max()).item() <= 1e-10


def test_bfloat16_autocast_keeps_the_lm_head_in_float32(tokenizer):
    """Under CPU/GPU autocast the vocabulary projection and log-softmax stay float32 for a float32 model:
    bfloat16 logits would cost about 0.01 nats a token, summed over every response token."""
    from grouppo.logps import token_logps

    model = tiny_llama(tokenizer)
    parts = lm_parts(model)
    hidden = 50 * torch.randn(9, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, model.config.vocab_size, (9,), generator=torch.Generator().manual_seed(1))
    want = torch.log_softmax(hidden @ parts.lm_head.weight.T, -1)[torch.arange(9), targets]
    with torch.autocast("cpu", torch.bfloat16):
        got = token_logps(hidden, targets, parts, chunk_size=4)
        half = torch.log_softmax(parts.lm_head(hidden).float(), -1)[torch.arange(9), targets]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (half - want).abs().max() > 1e-3  # what the float32 head avoids


def test_token_stats_come_with_the_log_probs_and_carry_no_gradient(tokenizer):
    """The ``token_stats`` a chunked pass hands back (TRL's ``logits/*``, ``entropy`` and
    ``mean_token_accuracy``) are each token's mean logit, predictive entropy and argmax hit, detached;
    the log-probs and their gradient are those of a pass without them."""
    from grouppo.logps import TOKEN_STATS, token_logps

    model = tiny_llama(tokenizer).double()
    parts = lm_parts(model)
    hidden = torch.randn(9, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    logits = (hidden @ parts.lm_head.weight.T).detach()
    targets = torch.randint(0, model.config.vocab_size, (9,), generator=torch.Generator().manual_seed(1))
    targets[:4] = logits[:4].argmax(-1)  # some hits, some misses
    stats: list[torch.Tensor] = []
    got = token_logps(hidden, targets, parts, chunk_size=4, token_stats=stats)
    (grad,) = torch.autograd.grad(got.sum(), hidden)
    plain = token_logps(hidden, targets, parts, chunk_size=4)
    (plain_grad,) = torch.autograd.grad(plain.sum(), hidden)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    torch.testing.assert_close(grad, plain_grad, rtol=0, atol=0)
    [table] = stats
    assert not table.requires_grad and table.shape == (9, len(TOKEN_STATS))
    probs = torch.softmax(logits, -1)
    entropy = -(probs * torch.log(probs)).sum(-1)
    hits = (logits.argmax(-1) == targets).double()
    torch.testing.assert_close(table, torch.stack([logits.mean(-1), entropy, hits], -1))
    assert 0 < hits.mean() < 1
