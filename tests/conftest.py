import os

import pytest
import torch

from grouppo.synthetic import tiny_llama, tiny_tokenizer


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
