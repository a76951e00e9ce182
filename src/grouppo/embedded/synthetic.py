"""Small models, tokenizers and data made on the spot: the fixtures of the tests and benchmarks, and
the task of the built-in demo (``grouppo demo``), which trains a model from scratch in minutes.

The demo task is letter reversal: the prompt asks to reverse a short word, the K responses are the
right answer and corrupted ones, each scored by the fraction of letters in the right place. A model
trained on the groups should put its probability on the reversal, which greedy decoding then shows.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_CORPUS = [
    "Reverse the word: ",
    "The quick brown fox jumps over the lazy dog. Answer the question in one sentence.",
    "Write a short poem about the sea. Explain why the sky is blue. List three fruits.",
]


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in well under a second, with ChatML special tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or DEFAULT_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    **config: Any,
) -> LlamaForCausalLM:
    """A randomly initialised Llama-shaped causal LM sized to ``tokenizer`` (built in milliseconds)."""
    import torch

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        **config,
    )
    return LlamaForCausalLM(cfg)


# Letters the tiny tokenizer never merges with each other (it merges e.g. "ce", "ck", "do"), so every
# letter of a word is one token in the prompt and in the answer alike.
LETTERS = "abcdfgjqxz"


def _score(candidate: str, target: str) -> float:
    return sum(a == b for a, b in zip(candidate, target, strict=False)) / max(len(candidate), len(target))


def reversal_groups(
    n: int,
    *,
    group_size: int = 8,
    seed: int = 0,
    min_len: int = 3,
    max_len: int = 4,
    exclude: set[str] = frozenset(),
) -> list[dict[str, Any]]:
    """``n`` scored groups of the letter-reversal task (prompt, K responses, scores in [0, 1]).

    The responses are the reversal, the word itself, and words with letters swapped or replaced,
    so the scores are graded; ``exclude`` keeps held-out words out of a training set.
    """
    available = sum(len(LETTERS) ** k - len(LETTERS) ** ((k + 1) // 2) for k in range(min_len, max_len + 1))
    if n > available - len(exclude):
        raise ValueError(f"asked for {n} words; there are {available} of {min_len}-{max_len} letters")
    rng = random.Random(seed)
    groups, seen = [], set(exclude)
    while len(groups) < n:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))
        if word in seen or word == word[::-1]:
            continue
        seen.add(word)
        target = word[::-1]
        candidates = {target, word}
        while len(candidates) < group_size:
            chars = list(target)
            for _ in range(rng.randint(1, 2)):
                i, j = rng.randrange(len(chars)), rng.randrange(len(chars))
                if rng.random() < 0.5:
                    chars[i], chars[j] = chars[j], chars[i]
                else:
                    chars[i] = rng.choice(LETTERS)
            candidates.add("".join(chars))
        responses = sorted(candidates)
        rng.shuffle(responses)
        groups.append(
            {
                "prompt": f"Reverse the word:\n{word}\n",
                "responses": responses,
                "scores": [_score(r, target) for r in responses],
                "answer": target,
            }
        )
    return groups


def random_groups(
    sizes: Sequence[int],
    positives: Sequence[int],
    *,
    seed: int = 0,
    prompt_lens: Sequence[int] | None = None,
    response_len: int | None = None,
    max_response: int = 6,
    vocab: int = 300,
    random_scores: bool = True,
    ref_logps: bool = False,
) -> list[dict[str, Any]]:
    """Tokenized groups of random token ids, from 3 up (never pad, bos or eos: every position is real).

    Group ``g`` has ``sizes[g]`` responses, the first ``positives[g]`` labelled positive, and a prompt of
    ``prompt_lens[g]`` tokens (default ``3 + g``). Every response has ``response_len`` tokens or, without
    it, a random length from 1 to ``max_response``. Scores are uniform random (``random_scores``) or the
    labels. With ``ref_logps`` each group carries reference log-probs as a real run would precompute
    them: about ``-log(vocab)`` per token, plus standard normal noise.

    One generator seeded with ``seed`` draws, group by group: the prompt, each response (its length when
    random, then its ids), the scores when random, the reference log-probs. The benchmarks' recorded
    results and the tests' exact values depend on this order.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    per_token = float(torch.log(torch.tensor(float(vocab))))
    groups = []
    for g, (k, p) in enumerate(zip(sizes, positives, strict=True)):
        prompt = torch.randint(3, vocab, (prompt_lens[g] if prompt_lens else 3 + g,), generator=gen)
        responses = []
        for _ in range(k):
            n = (
                response_len
                if response_len is not None
                else int(torch.randint(1, max_response + 1, (1,), generator=gen))
            )
            responses.append(torch.randint(3, vocab, (n,), generator=gen).tolist())
        labels = [1] * p + [0] * (k - p)
        group = {
            "prompt_ids": prompt.tolist(),
            "response_ids": responses,
            "labels": labels,
            "scores": torch.rand(k, generator=gen).tolist() if random_scores else [float(x) for x in labels],
        }
        if ref_logps:
            typical = torch.tensor([-len(r) * per_token for r in responses])
            group["ref_logps"] = (typical + torch.randn(k, generator=gen)).tolist()
        groups.append(group)
    return groups
