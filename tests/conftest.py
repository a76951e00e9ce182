import os

import pytest
import torch

from grouppo.embedded.synthetic import tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True, scope="session")
def _reference_cache_in_tmp(tmp_path_factory):
    """Precomputed reference log-probs are cached on disk: never in the user's home during tests."""
    os.environ["GROUPPO_CACHE"] = str(tmp_path_factory.mktemp("grouppo-cache"))


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer):
    return tiny_llama(tokenizer, seed=0)


def random_groups(sizes, positives, seed=0, prompt_lens=None, max_response=6, vocab=300):
    """Tokenized groups with random ids: group g has sizes[g] responses, the first positives[g] positive."""
    gen = torch.Generator().manual_seed(seed)
    feats = []
    for g, (k, p) in enumerate(zip(sizes, positives, strict=True)):
        plen = prompt_lens[g] if prompt_lens else 3 + g
        feats.append(
            {
                "prompt_ids": torch.randint(3, vocab, (plen,), generator=gen).tolist(),
                "response_ids": [
                    torch.randint(3, vocab, (int(torch.randint(1, max_response + 1, (1,), generator=gen)),),
                                  generator=gen).tolist()
                    for _ in range(k)
                ],
                "labels": [1] * p + [0] * (k - p),
                "scores": torch.rand(k, generator=gen).tolist(),
            }
        )  # fmt: skip
    return feats


def group_loss(model, batch, loss_type="all_pairs", **kw):
    """A group DPO loss with NLL on ``batch`` against fixed reference log-probs (``kw`` to group_logps)."""
    from grouppo.decoupled import group_logps
    from grouppo.losses import GroupBatch, group_dpo_loss

    logps = group_logps(model, batch, **kw)
    ref = torch.linspace(-30, -10, logps.shape[0], dtype=logps.dtype)
    loss, _ = group_dpo_loss(
        GroupBatch(logps, ref, batch["response_mask"].sum(-1), batch["labels"], batch["scores"],
                   batch["group_index"], batch["slot"]),
        beta=0.5, loss_type=loss_type, nll_weight=0.3,
    )  # fmt: skip
    return loss
