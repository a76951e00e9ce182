"""Parity with TRL's DPOTrainer (trl 1.16): tokens, loss, metrics and one optimizer step.

At K = 2 with one positive, grouppo's ``all_pairs`` loss is DPO's sigmoid loss, and one group is one
TRL preference pair; a group of K responses with |P| positives is, under ``all_pairs``, the batch mean
of DPO over its |P| x |N| decomposed pairs. These tests run both trainers on the same weights and data
and compare concrete numbers: token ids exactly, losses to 1e-5 relative, metrics to 1e-5 (see
``metric_tolerance``), and the weights after one large SGD step to 1e-4 of the step's size (a wrong
gradient term shows far above that).

TRL patches the model it is given (``add_fused_lm_head``), so each trainer gets its own deep copy of
the policy and of the reference. The reference is a differently seeded model, so the rewards are not
zero and the loss is not log 2.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from grouppo import GroupDPOConfig, GroupDPOTrainer
from grouppo.embedded.synthetic import tiny_llama
from grouppo.tokenize import tokenize_group

# TRL's reference pass calls transformers' deprecated `is_gradient_checkpointing`.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

BETA = 0.1
LR = 0.5
# Larger than the default 0.02, so that policy and reference disagree clearly: rewards of order 0.1,
# losses 0.06-0.09 away from log 2, reward accuracies strictly between 0 and 1.
INIT_RANGE = 0.2


# Rewards are beta * (logp - ref_logp), differences of sums of about -40 to -60 in float32: their
# rounding is about beta * 1e-7 * |logp| per term, so they are compared to 1e-5 absolute (1e-4 to 1e-5 of
# their size here); log-probs and accuracies to 1e-5 relative.
def metric_tolerance(key):
    if key.startswith("rewards/") and key != "rewards/accuracies":
        return {"abs": 1e-5, "rel": 0}
    return {"rel": 1e-5}


METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
)

# (prompt, chosen, rejected). The first prompts end with a space: byte-level BPE merges it into the
# response's first word, so the tokenized prompt is not a prefix of prompt + response and the response
# starts where they diverge (for the second pair at a different token for chosen and rejected, so the
# minimum over the pair decides). One chosen already ends with the EOS token, which must not be doubled.
PLAIN_PAIRS = [
    ("Reverse the word: ", "cba", "abc"),
    ("Reverse the word: ", "the fox", "\nfox"),
    ("Reverse the word: fox\n", "xof", "fox"),
    ("The quick brown fox", " jumps over the lazy dog.", " sleeps."),
    ("Explain why the sky is blue.", " Because of the sea.<|im_end|>", " It is not."),
    ("List three fruits:", " apple, pear, fig", " the lazy dog"),
]
CHAT_PAIRS = [
    (
        [{"role": "user", "content": "Reverse the word: abc"}],
        [{"role": "assistant", "content": "cba"}],
        [{"role": "assistant", "content": "abc"}],
    ),
    (
        [
            {"role": "user", "content": "List three fruits."},
            {"role": "assistant", "content": "apple, pear, fig"},
            {"role": "user", "content": "Three more?"},
        ],
        [{"role": "assistant", "content": "plum, kiwi, lime"}],
        [{"role": "assistant", "content": "Write a short poem about the sea."}],
    ),
    (
        [{"role": "user", "content": "Explain why the sky is blue."}],
        [{"role": "assistant", "content": "Light scatters."}],
        [{"role": "assistant", "content": "The quick brown fox."}],
    ),
]

# One group of K = 6 with three positives. The prompt ends on a token boundary ("\n" is never merged
# with the letters after it), so each decomposed pair is tokenized exactly as the whole group is.
BIG_PROMPT = "Reverse the word: abcde\n"
BIG_RESPONSES = ["edcba", "edcab", "decba", "abcde", "bacde", "hello fox"]
BIG_LABELS = [1, 1, 1, 0, 0, 0]


# ----------------------------------------------------------------------------- helpers
def as_group(prompt, chosen, rejected):
    return {"prompt": prompt, "responses": [chosen, rejected], "labels": [1, 0]}


def as_pair(prompt, chosen, rejected):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def decomposed_pairs(prompt, responses, labels):
    """Every (positive, negative) pair of a group, positives in the outer loop."""
    positives = [r for r, label in zip(responses, labels, strict=True) if label == 1]
    negatives = [r for r, label in zip(responses, labels, strict=True) if label == 0]
    return [as_pair(prompt, c, r) for c, r in itertools.product(positives, negatives)]


def common_args(tmp_path, name, batch_size):
    return dict(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=1,
        beta=BETA,
        optim="sgd",
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,  # transformers clips only when max_grad_norm > 0
        max_steps=1,
        seed=0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_drop_last=False,
        dataloader_pin_memory=False,
    )


def trl_trainer(tmp_path, tokenizer, policy, ref, pairs, **options):
    args = DPOConfig(
        **common_args(tmp_path, "trl", len(pairs)),
        **options,
        loss_type="sigmoid",
        bf16=False,  # TRL turns bf16 on when neither bf16 nor fp16 is set
        activation_checkpointing=False,  # TRL's default is True
        precompute_ref_log_probs=False,
    )
    return DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref),
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
    )


def grouppo_trainer(tmp_path, tokenizer, policy, ref, groups, response_chunk_size=None, **options):
    args = GroupDPOConfig(
        **common_args(tmp_path, "grouppo", len(groups)),
        **options,
        loss_type="all_pairs",
        response_chunk_size=response_chunk_size,
        precompute_ref_logps=False,
    )
    return GroupDPOTrainer(
        copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref),
        args=args,
        train_dataset=groups,
        processing_class=tokenizer,
    )


def models(tokenizer):
    policy = tiny_llama(tokenizer, seed=0, initializer_range=INIT_RANGE)
    ref = tiny_llama(tokenizer, seed=1, initializer_range=INIT_RANGE)
    return policy, ref


def loss_and_metrics(trainer):
    """Loss of the whole training set as one batch (no gradient) and the metrics it logged."""
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    mode = "train" if trainer.model.training else "eval"
    # grouppo's public store of the values to log, or TRL's own.
    store = trainer.logged if hasattr(trainer, "logged") else trainer._metrics
    store[mode].clear()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return loss.item(), {key: values[-1] for key, values in store[mode].items()}


def trl_tokens(trainer):
    return [(row["prompt_ids"], [row["chosen_ids"], row["rejected_ids"]]) for row in trainer.train_dataset]


def relative_param_difference(a, b, initial):
    """max |a - b| over max |b - initial|, over all parameters (b: TRL's trained weights)."""
    a, b = dict(a.named_parameters()), dict(b.named_parameters())
    assert a.keys() == b.keys() == initial.keys()
    diff = max((a[k].detach() - b[k].detach()).abs().max().item() for k in a)
    step = max((b[k].detach() - initial[k]).abs().max().item() for k in b)
    return diff, step


def assert_one_step_parity(trl, grouppo, policy, label, same_dashboard=True):
    """One SGD step of each moves the weights alike; with ``same_dashboard`` (the same pairs on both
    sides: K = 2) the step's logs agree too (a group's decomposed pairs read its tokens several times)."""
    initial = {k: v.detach().clone() for k, v in policy.named_parameters()}
    trl.train()
    grouppo.train()
    assert trl.state.global_step == grouppo.state.global_step == 1
    diff, step = relative_param_difference(grouppo.model, trl.model, initial)
    grouppo_step = max(
        (p.detach() - initial[k]).abs().max().item() for k, p in grouppo.model.named_parameters()
    )
    print(
        f"\n[{label}] one SGD step (lr={LR}): max|grouppo - trl| = {diff:.3e}, max|trl step| = {step:.3e}, "
        f"max|grouppo step| = {grouppo_step:.3e}, ratio = {diff / step:.3e}"
    )
    assert step > 1e-3, "the SGD step is too small to tell gradients apart"
    assert diff / step <= 1e-4
    if not same_dashboard:
        return
    # The dashboards agree too: the step's logged keys and values, and the tokens read so far.
    trl_log, log = trl.state.log_history[0], grouppo.state.log_history[0]
    assert log["num_tokens"] == trl_log["num_tokens"] > 0
    for key in METRICS:
        assert log[key] == pytest.approx(trl_log[key], **metric_tolerance(key)), key
    # Every parameter moved in TRL moved in grouppo too, and by the same amount.
    trl_params = dict(trl.model.named_parameters())
    for name, param in grouppo.model.named_parameters():
        torch.testing.assert_close(
            param.detach() - initial[name],
            trl_params[name].detach() - initial[name],
            rtol=0,
            atol=1e-4 * step,
            msg=lambda m, name=name: f"{name}: {m}",
        )


# ----------------------------------------------------------------------------- 1. tokenization
@pytest.mark.parametrize("pairs", [PLAIN_PAIRS, CHAT_PAIRS], ids=["plain", "conversational"])
def test_tokenization_matches_trl(tmp_path, tokenizer, pairs):
    policy, ref = models(tokenizer)
    trl = trl_trainer(tmp_path, tokenizer, policy, ref, [as_pair(*p) for p in pairs])
    expected = trl_tokens(trl)
    assert len(expected) == len(pairs)
    for (prompt_ids, response_ids), pair in zip(expected, pairs, strict=True):
        row = tokenize_group(as_group(*pair), tokenizer)
        assert row["prompt_ids"] == prompt_ids, pair
        assert row["response_ids"] == response_ids, pair
        assert row["labels"] == [1, 0]
    # Through the trainer (record normalization, then tokenization) the tokens are the same.
    grouppo = grouppo_trainer(tmp_path, tokenizer, policy, ref, [as_group(*p) for p in pairs])
    assert [(r["prompt_ids"], r["response_ids"]) for r in grouppo.train_dataset] == expected
    if pairs is PLAIN_PAIRS:
        # The hard cases are exercised: prompts cut where BPE merges across the boundary, EOS appended
        # once (also to a response that already had it).
        eos = tokenizer.eos_token_id
        assert all(ids[-1] == eos and eos not in ids[:-1] for _, rs in expected for ids in rs)
        full_prompts = [tokenizer(pair[0])["input_ids"] for pair in pairs]
        cut = [len(p) < len(full) for (p, _), full in zip(expected, full_prompts, strict=True)]
        assert cut[:2] == [True, True] and not any(cut[2:])


# ----------------------------------------------------------------------------- 2. K = 2 loss
def test_pair_loss_and_metrics_match_trl(tmp_path, tokenizer):
    policy, ref = models(tokenizer)
    trl = trl_trainer(tmp_path, tokenizer, policy, ref, [as_pair(*p) for p in PLAIN_PAIRS])
    grouppo = grouppo_trainer(tmp_path, tokenizer, policy, ref, [as_group(*p) for p in PLAIN_PAIRS])
    trl_loss, trl_metrics = loss_and_metrics(trl)
    loss, metrics = loss_and_metrics(grouppo)
    print(f"\nK=2 loss: trl {trl_loss:.8f}, grouppo {loss:.8f}, |diff| {abs(loss - trl_loss):.3e}")
    for key in METRICS:
        print(f"  {key}: trl {trl_metrics[key]:.8f}, grouppo {metrics[key]:.8f}")
    assert abs(trl_loss - math.log(2)) > 0.05, "policy and reference too close: the test would be weak"
    assert loss == pytest.approx(trl_loss, rel=1e-5, abs=0)
    assert 0 < trl_metrics["rewards/accuracies"] < 1, "accuracy is all or nothing: the test would be weak"
    for key in METRICS:
        assert metrics[key] == pytest.approx(trl_metrics[key], **metric_tolerance(key)), key


# ----------------------------------------------------------------------------- 3. K = 2 SGD step
@pytest.mark.parametrize("response_chunk_size", [None, 1], ids=["coupled", "decoupled"])
def test_pair_sgd_step_matches_trl(tmp_path, tokenizer, response_chunk_size):
    policy, ref = models(tokenizer)
    trl = trl_trainer(tmp_path, tokenizer, policy, ref, [as_pair(*p) for p in PLAIN_PAIRS])
    grouppo = grouppo_trainer(
        tmp_path, tokenizer, policy, ref, [as_group(*p) for p in PLAIN_PAIRS], response_chunk_size
    )
    assert_one_step_parity(trl, grouppo, policy, f"K=2, response_chunk_size={response_chunk_size}")


# ----------------------------------------------------------------------------- 4. K = 6, |P| = 3
def big_group_trainers(tmp_path, tokenizer, response_chunk_size=None):
    policy, ref = models(tokenizer)
    pairs = decomposed_pairs(BIG_PROMPT, BIG_RESPONSES, BIG_LABELS)
    assert len(pairs) == 9
    group = {"prompt": BIG_PROMPT, "responses": BIG_RESPONSES, "labels": BIG_LABELS}
    trl = trl_trainer(tmp_path, tokenizer, policy, ref, pairs)
    grouppo = grouppo_trainer(tmp_path, tokenizer, policy, ref, [group], response_chunk_size)
    return policy, trl, grouppo


def test_group_loss_equals_trl_mean_over_decomposed_pairs(tmp_path, tokenizer):
    _, trl, grouppo = big_group_trainers(tmp_path, tokenizer)
    # The group shares one prompt with every decomposed pair, and each response keeps its tokens.
    row = grouppo.train_dataset[0]
    positives = [ids for ids, label in zip(row["response_ids"], BIG_LABELS, strict=True) if label]
    negatives = [ids for ids, label in zip(row["response_ids"], BIG_LABELS, strict=True) if not label]
    pairs = [(row["prompt_ids"], [c, r]) for c, r in itertools.product(positives, negatives)]
    assert trl_tokens(trl) == pairs

    trl_loss, trl_metrics = loss_and_metrics(trl)
    loss, metrics = loss_and_metrics(grouppo)
    print(f"\nK=6 loss: trl {trl_loss:.8f}, grouppo {loss:.8f}, |diff| {abs(loss - trl_loss):.3e}")
    assert abs(trl_loss - math.log(2)) > 0.05, "policy and reference too close: the test would be weak"
    assert loss == pytest.approx(trl_loss, rel=1e-5, abs=0)
    # Each positive (negative) appears in |N| (|P|) pairs, so TRL's pair means are grouppo's means over
    # positives (negatives); TRL's pair accuracy is grouppo's group/pair_accuracy.
    same = {key: key for key in METRICS if key != "rewards/accuracies"}
    same["rewards/accuracies"] = "group/pair_accuracy"
    for trl_key, key in same.items():
        print(f"  {trl_key}: trl {trl_metrics[trl_key]:.8f}, grouppo {key} {metrics[key]:.8f}")
        assert metrics[key] == pytest.approx(trl_metrics[trl_key], **metric_tolerance(trl_key)), key


@pytest.mark.parametrize("response_chunk_size", [None, 1], ids=["coupled", "decoupled"])
def test_group_sgd_step_matches_trl_on_decomposed_pairs(tmp_path, tokenizer, response_chunk_size):
    policy, trl, grouppo = big_group_trainers(tmp_path, tokenizer, response_chunk_size)
    label = f"K=6 |P|=3, response_chunk_size={response_chunk_size}"
    assert_one_step_parity(trl, grouppo, policy, label, same_dashboard=False)


# ----------------------------------------------------------------------------- 6. TRL's data as it is
@pytest.mark.parametrize("pairs", [PLAIN_PAIRS, CHAT_PAIRS], ids=["plain", "conversational"])
def test_trl_pairs_given_as_they_are_make_trls_step(tmp_path, tokenizer, pairs):
    # A TRL user's dataset (prompt/chosen/rejected) goes to GroupDPOTrainer unconverted, with TRL's
    # loss name, and the step is TRL's.
    policy, ref = models(tokenizer)
    trl_data = [as_pair(*p) for p in pairs]
    trl = trl_trainer(tmp_path, tokenizer, policy, ref, trl_data)
    args = GroupDPOConfig(**common_args(tmp_path, "grouppo", len(trl_data)), loss_type="sigmoid")
    grouppo = GroupDPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
                              train_dataset=Dataset.from_list(trl_data),
                              processing_class=tokenizer)  # fmt: skip
    assert [(r["prompt_ids"], r["response_ids"]) for r in grouppo.train_dataset] == trl_tokens(trl)
    assert_one_step_parity(trl, grouppo, policy, "TRL pairs given as they are")

