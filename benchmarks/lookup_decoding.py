"""Would speculative decoding with prompt lookup speed up greedy answers to a batch of prompts?

    .venv/bin/python benchmarks/lookup_decoding.py --prompts 16 --max_new_tokens 192

Prompt-lookup decoding drafts the next tokens by finding the last few tokens earlier in the prompt or
the answer so far and proposing what followed them; one forward pass then verifies the draft, and
greedy decoding keeps the longest prefix that the model itself would have produced, plus the model's
own next token. The answers are exactly the greedy ones; the gain is fewer forward passes.

This script measures the gain without building the decoder: it takes the greedy answers of the
embedded model to ``--prompts`` IFEval-style prompts (bfloat16 ``model.generate``, the prompts of
``grouppo bench generation``) and replays each one, counting the verification passes it would need
for drafts of up to ``--draft`` tokens (lookup of the last 3, 2, then 1 tokens, the most recent match).
A batch that decodes its sequences together takes as many passes as its slowest sequence, so beside
each sequence's tokens per pass it prints the batch's passes against plain decoding's.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import torch

from grouppo.apps.bench.generation import BASELINE_BATCH, bench_prompt_ids
from grouppo.generation import left_padded


def lookup_draft(context: Sequence[int], size: int, longest: int = 3) -> list[int]:
    """Up to ``size`` tokens that followed the most recent earlier occurrence of the last ``n`` tokens of
    ``context``, for ``n`` from ``longest`` down to 1; empty when none of them occurred before."""
    for n in range(min(longest, len(context) - 1), 0, -1):
        pattern = list(context[-n:])
        for start in range(len(context) - n - 1, -1, -1):
            if list(context[start : start + n]) == pattern:
                return list(context[start + n : start + n + size])
    return []


def passes(prompt: Sequence[int], answer: Sequence[int], size: int) -> int:
    """Verification passes that prompt-lookup decoding needs to produce ``answer`` greedily."""
    done, count = 0, 0
    while done < len(answer):
        draft = lookup_draft([*prompt, *answer[:done]], size)
        accepted = 0
        target = answer[done : done + len(draft)]
        while accepted < len(target) and draft[accepted] == target[accepted]:
            accepted += 1
        done += accepted + 1  # the accepted draft and the model's own next token
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=192)
    parser.add_argument("--draft", type=int, nargs="+", default=[2, 4, 8], help="draft sizes to replay")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from grouppo.models import load_model, load_tokenizer, resolve_model

    name = resolve_model(None)
    model, tokenizer = load_model(name, dtype=torch.bfloat16).eval(), load_tokenizer(name)
    prompts = bench_prompt_ids(tokenizer, args.prompts, args.seed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    answers: list[list[int]] = []
    for start in range(0, len(prompts), BASELINE_BATCH):
        ids, mask = left_padded(prompts[start : start + BASELINE_BATCH], pad)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=eos)  # fmt: skip
        for row in out[:, ids.shape[1] :].tolist():
            answers.append(row[: row.index(eos) + 1] if eos in row else row)
    lengths = [len(a) for a in answers]
    capped = sum(n == args.max_new_tokens and eos not in a for n, a in zip(lengths, answers, strict=True))
    print(f"{len(answers)} greedy answers, {sum(lengths)} tokens, {capped} stopped at --max_new_tokens")
    print("| draft | tokens per pass, all | slowest sequence | fastest | batch passes | plain passes |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size in args.draft:
        counts = [passes(p, a, size) for p, a in zip(prompts, answers, strict=True)]
        per = [n / c for n, c in zip(lengths, counts, strict=True)]
        print(f"| {size} | {sum(lengths) / sum(counts):.2f} | {min(per):.2f} | {max(per):.2f} | "
              f"{max(counts)} | {max(lengths)} |")  # fmt: skip
    print(f"median tokens per pass over sequences: {statistics.median(per):.2f} (draft {args.draft[-1]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
