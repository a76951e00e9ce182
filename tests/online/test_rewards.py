import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from grouppo.embedded.instructions import NEEDS_NLTK_DATA, check_response
from grouppo.embedded.synthetic import tiny_tokenizer
from grouppo.online.rewards import (
    BUILTIN_REWARDS,
    CombinedReward,
    RewardModel,
    ifeval_reward,
    ifeval_strict_reward,
    load_reward,
    load_rewards,
    reward_name,
)

# Offline, the checkers that need nltk data cannot run: their instructions are unscored.
NLTK_MISSING = not check_response("Some text. More.", [NEEDS_NLTK_DATA[0]], [{}], "")[0].scored


def length_reward(prompts, completions, **record_fields):
    return [float(len(completion)) for completion in completions]


class BonusReward:
    def __call__(self, prompts, completions, bonus, **record_fields):
        return [float(b) for b in bonus]


NOT_CALLABLE = 3


def test_import_path_rewards_and_exact_weighted_sum():
    assert load_reward("test_rewards:length_reward")(["p"], ["abc"]) == [3.0]
    assert isinstance(load_reward("test_rewards:BonusReward"), BonusReward)
    combined = load_rewards(["test_rewards:length_reward", "test_rewards:BonusReward"], [0.5, -2.0])
    prompts, completions, bonus = ["p", "q"], ["abc", "hello world"], [0.25, 3]
    assert combined(prompts, completions, bonus=bonus, other=["x", "y"]) == [
        0.5 * 3 - 2.0 * 0.25,
        0.5 * 11 - 6.0,
    ]
    assert combined.last_components == {"length_reward": [3.0, 11.0], "BonusReward": [0.25, 3.0]}
    assert reward_name(combined) == "length_reward+BonusReward"
    assert load_rewards([length_reward, "ifeval"]).names == ["length_reward", "ifeval_reward"]
    same_twice = CombinedReward([length_reward, length_reward])
    assert same_twice(["p"], ["ab"]) == [4.0] and same_twice.names == ["length_reward", "length_reward_2"]


def test_weights_and_specs_errors(tmp_path):
    with pytest.raises(ValueError, match="1 reward weights for 2 rewards"):
        load_rewards(["ifeval", "ifeval_strict"], [1.0])
    with pytest.raises(ValueError, match="no reward given"):
        load_rewards([])
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load_reward("no_such_module_xyz:reward")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_reward("test_rewards:missing")
    with pytest.raises(ValueError, match="not a callable"):
        load_reward("test_rewards:NOT_CALLABLE")
    with pytest.raises(
        ValueError, match="unknown reward 'not a reward'.*built-in \\(ifeval, ifeval_strict\\)"
    ):
        load_reward("not a reward")
    with pytest.raises(ValueError, match="no config.json"):
        load_reward(str(tmp_path))
    assert load_reward("ifeval") is ifeval_reward and set(BUILTIN_REWARDS) == {"ifeval", "ifeval_strict"}


LOWER_NO_COMMA = {
    "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma"],
    "kwargs": [{}, {}],
}


def test_ifeval_rewards_on_hand_cases():
    completions = [
        "hello there my friend, how are you today",  # lowercase, a comma
        "hello there my friend and how are you today",  # both followed
        "Hello there, my friend. How are you today?",  # neither
    ]
    fields = {name: [value] * 3 for name, value in LOWER_NO_COMMA.items()}
    prompts = ["Greet me."] * 3
    assert ifeval_reward(prompts, completions, **fields) == [0.5, 1.0, 0.0]
    assert ifeval_strict_reward(prompts, completions, **fields) == [0.0, 1.0, 0.0]
    # TRL's conversational form: prompts and completions as message lists.
    chat_prompts = [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Greet me."}]] * 3
    chat_completions = [[{"role": "assistant", "content": completion}] for completion in completions]
    assert ifeval_reward(chat_prompts, chat_completions, **fields) == [0.5, 1.0, 0.0]


def test_ifeval_reward_needs_its_fields():
    with pytest.raises(ValueError, match="missing instruction_id_list, kwargs"):
        ifeval_reward(["p"], ["c"], other=["x"])
    with pytest.raises(ValueError, match="expected one of each per completion"):
        ifeval_reward(["p"], ["c", "d"], **LOWER_NO_COMMA)


@pytest.mark.skipif(not NLTK_MISSING, reason="nltk data is installed here")
def test_ifeval_reward_over_scored_instructions_only(caplog):
    fields = {"instruction_id_list": [[NEEDS_NLTK_DATA[0], "punctuation:no_comma"], [NEEDS_NLTK_DATA[0]]]}
    fields["kwargs"] = [
        [{"num_sentences": 2, "relation": "at least"}, {}],
        [{"num_sentences": 2, "relation": "at least"}],
    ]
    with caplog.at_level(logging.WARNING, logger="grouppo.rewards"):
        assert ifeval_reward(["p", "p"], ["no comma here. Two.", "x"], **fields) == [1.0, 0.0]
    assert "1 of 2 completions had no instruction that can be checked" in caplog.text


@pytest.fixture(scope="module", params=["with_pad", "without_pad"])
def reward_model_dir(request, tmp_path_factory):
    tokenizer = tiny_tokenizer()
    if request.param == "without_pad":
        tokenizer.pad_token = None
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp(f"reward-{request.param}")
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reward_model_matches_a_direct_forward(reward_model_dir):
    prompts = ["Reverse the word: abc", "Explain why the sky is blue.", "List three fruits."]
    completions = ["cba", "Light scatters.", "apple, pear, plum, and more fruit than you can eat"]
    reward = load_reward(str(reward_model_dir))
    assert isinstance(reward, RewardModel) and reward.model.config.pad_token_id is not None
    scores = reward(prompts, completions, instruction_id_list=[[], [], []])
    assert scores == reward(prompts, completions)  # deterministic
    # Batches of 2 pad differently: equal up to float rounding.
    in_pairs = RewardModel(str(reward_model_dir), batch_size=2)(prompts, completions)
    assert in_pairs == pytest.approx(scores, abs=1e-6)

    tokenizer = tiny_tokenizer()
    model = LlamaForSequenceClassification.from_pretrained(reward_model_dir).eval()
    for prompt, completion, score in zip(prompts, completions, scores, strict=True):
        text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{completion}<|im_end|>\n"
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            expected = model(input_ids=ids).logits[0, 0].item()
        assert isinstance(score, float) and score == pytest.approx(expected, abs=1e-5)
    chat = [[{"role": "user", "content": prompt}] for prompt in prompts]
    assert reward(chat, [[{"role": "assistant", "content": c}] for c in completions]) == scores


# ---------------------------------------------------------------------------------- rewards that fail
def raising(prompts, completions, **_):
    raise KeyError("answer")


def short(prompts, completions, **_):
    return [1.0]


def words(prompts, completions, **_):
    return ["good"] * len(completions)


def slow(prompts, completions, **_):
    import time

    time.sleep(5)
    return [1.0] * len(completions)


@pytest.mark.parametrize(
    "function,message",
    [
        (raising, "reward 'raising' raised KeyError: 'answer'"),
        (short, "reward 'short' returned 1 values for 2 completions"),
        (words, "reward 'words' returned 'good' \\(str\\) for completion 0; expected a number"),
    ],
)
def test_a_reward_that_fails_is_named_with_what_it_returned(function, message):
    from grouppo.online.rewards import RewardError

    with pytest.raises(RewardError, match=message):
        CombinedReward([function])(["p", "p"], ["a", "b"])


def test_a_reward_that_does_not_return_in_time_is_named():
    from grouppo.online.rewards import RewardTimeout

    with pytest.raises(RewardTimeout, match="reward 'slow' did not return within 0.2 s"):
        CombinedReward([slow], timeout=0.2)(["p"], ["a"])
    assert CombinedReward([length_reward], timeout=5)(["p"], ["abc"]) == [3.0]


def test_a_reward_spec_naming_a_missing_module_or_function_says_so():
    with pytest.raises(ValueError, match="cannot import module 'no_such_rewards'"):
        load_reward("no_such_rewards:score")
    with pytest.raises(ValueError, match="module 'test_rewards' has no attribute 'nothing'"):
        load_reward("test_rewards:nothing")


# ------------------------------------------------------------------------- rewards shaped as TRL's
# Reward functions in the shapes TRL's GRPO documentation uses: only ``completions`` named and the rest in
# ``**kwargs``; chat completions read as ``completion[0]["content"]``; a data set column by name.
def reward_len(completions, **kwargs):
    return [-abs(20 - len(text)) for text in completions]


def format_reward_func(completions, **kwargs):
    """1 for a completion of the form <think>...</think><answer>...</answer>, else 0."""
    import re

    texts = [message[0]["content"] for message in completions]
    return [float(re.fullmatch(r"<think>.*?</think><answer>.*?</answer>", t) is not None) for t in texts]


def reward_func(completions, ground_truth, **kwargs):
    """1 when the boxed answer equals the row's ``ground_truth`` column."""
    import re

    found = [re.search(r"\\boxed\{(.*?)\}", text) for text in completions]
    return [float(m is not None and m.group(1) == gt) for m, gt in zip(found, ground_truth, strict=True)]


async def async_reward_len(completions, **kwargs):
    return [float(len(c)) for c in completions]


def seen_arguments(prompts, completions, completion_ids, trainer_state, log_metric, topic, **kwargs):
    SEEN.update(prompts=prompts, completions=completions, completion_ids=completion_ids, state=trainer_state,
                topic=topic)  # fmt: skip
    log_metric("custom/mean_length", sum(len(c[0]["content"]) for c in completions) / len(completions))
    return [float(len(c[0]["content"])) for c in completions]


SEEN: dict = {}


def test_trls_documented_rewards_score_as_trl_calls_them(tokenizer):
    from grouppo.online.rollout import score

    plain = [{"prompt": "Sum 2 and 2.", "ground_truth": "4"}]
    chat = [{"prompt": [{"role": "user", "content": "Think, then answer."}]}]
    texts = [["\\boxed{4} is the answer", "about twenty characters", "\\boxed{5}"]]
    assert score(CombinedReward([reward_len]), plain, texts) == [[-(abs(20 - len(t))) for t in texts[0]]]
    assert score(CombinedReward([reward_func]), plain, texts) == [[1.0, 0.0, 0.0]]
    assert score(CombinedReward([async_reward_len]), plain, texts) == [[float(len(t)) for t in texts[0]]]
    formatted = [["<think>a</think><answer>b</answer>", "no format"]]
    assert score(CombinedReward([format_reward_func]), chat, formatted) == [[1.0, 0.0]]


def test_an_online_run_calls_rewards_with_trls_arguments(tmp_path, tokenizer):
    from conftest import trainer_config

    from grouppo.embedded.synthetic import tiny_llama
    from grouppo.online.trainer import OnlineGroupDPOConfig, OnlineGroupDPOTrainer

    prompts = [{"prompt": [{"role": "user", "content": f"Reverse {w}"}], "topic": w} for w in ("abc", "fgj")]
    args = trainer_config(tmp_path, OnlineGroupDPOConfig, max_steps=1, per_device_train_batch_size=2,
                          num_generations=3, max_new_tokens=5)  # fmt: skip
    rewards = [seen_arguments, reward_len]
    model = tiny_llama(tokenizer)
    trainer = OnlineGroupDPOTrainer(model, reward_funcs=rewards, args=args, train_dataset=prompts,
                                    processing_class=tokenizer)  # fmt: skip
    trainer.train()
    assert SEEN["prompts"][0] == prompts[0]["prompt"] and SEEN["topic"] == ["abc"] * 3 + ["fgj"] * 3
    assert all(c[0]["role"] == "assistant" for c in SEEN["completions"])  # one message each: chat prompts
    assert SEEN["state"] is trainer.state and len(SEEN["completion_ids"]) == 6
    text = SEEN["completions"][0][0]["content"]
    assert SEEN["completion_ids"][0] == tokenizer(text=text, add_special_tokens=False)["input_ids"]
    assert "custom/mean_length" in trainer.state.log_history[0]
