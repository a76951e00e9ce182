"""grouppo demo: the toy task's data."""

from grouppo.embedded.synthetic import reversal_groups


def test_demo_words_are_one_token_per_letter_in_prompt_and_answer(tokenizer):
    # The demo task is learnable only if a word's letters are the same tokens in the prompt and answer.
    for group in reversal_groups(50, seed=0):
        word = group["answer"][::-1]
        prompt_tokens = tokenizer.convert_ids_to_tokens(tokenizer(group["prompt"])["input_ids"])
        assert prompt_tokens[-len(word) - 1 : -1] == list(word)
        for response in group["responses"]:
            assert tokenizer.convert_ids_to_tokens(tokenizer(response)["input_ids"]) == list(response)
