"""GDPO: belief records, the three loss terms, the scoring layout, the trainer, inference and metrics."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_trained
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from grouppo.collate import GroupCollator
from grouppo.convert import from_gdpo_release
from grouppo.data import DataError, normalize_belief_record, prepare_belief_records
from grouppo.decoupled import group_logps
from grouppo.embedded.opinions import QUESTIONS, label_judge, make_opinions
from grouppo.embedded.synthetic import tiny_llama
from grouppo.gdpo.beliefs import (
    BeliefSampling,
    belief_probabilities,
    evaluate_beliefs,
    parse_belief,
    question_metrics,
    reference_distributions,
    sample_beliefs,
)
from grouppo.gdpo.trainer import GDPOConfig, GDPOTrainer
from grouppo.generation import SamplingConfig
from grouppo.losses import FlatBeliefBatch, gdpo_loss
from grouppo.tokenize import (
    DEFAULT_BELIEF_TEMPLATE,
    belief_prefix,
    pack_belief_rows,
    tokenize_belief_record,
)

CHAT = [{"role": "user", "content": "do you like tea"}]


def record(**overrides):
    base = {
        "prompt": CHAT,
        "beliefs": ["yes", "no", "maybe so"],
        "distribution": [0.5, 0.3, 0.2],
        "belief": 1,
        "chosen": "no i do not",
        "rejected": "yes a lot",
    }
    return normalize_belief_record({**base, **overrides}, 0)


def flat_batch(logps, roles, targets, nll_rows, groups, ref=None, lengths=None):
    logps = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
    group_index = torch.tensor(groups)
    slot = torch.cat([torch.arange(int((group_index == g).sum())) for g in range(int(group_index.max()) + 1)])
    return FlatBeliefBatch(
        logps=logps,
        ref_logps=torch.zeros_like(logps) if ref is None else torch.tensor(ref, dtype=torch.float64),
        lengths=torch.ones(len(roles)) if lengths is None else torch.tensor(lengths, dtype=torch.float64),
        role=torch.tensor(roles),
        target=torch.tensor(targets, dtype=torch.float64),
        nll_row=torch.tensor(nll_rows),
        group_index=group_index,
        slot=slot,
    )


# ----------------------------------------------------------------------------------------------- losses
def test_calibration_equals_a_hand_computation():
    # One record: 3 belief rows (summed prefix log-probs), chosen, rejected.
    b = flat_batch(
        [-1.0, -2.0, -3.5, -10.0, -12.0], [0, 0, 0, 1, 2], [0.5, 0.3, 0.2, 0, 0], [0, 1, 0, 0, 0], [0] * 5
    )
    _, metrics = gdpo_loss(b, calibration_weight=1, preference_weight=0, belief_nll_weight=0)
    z = math.exp(-1) + math.exp(-2) + math.exp(-3.5)
    q = [math.exp(-1) / z, math.exp(-2) / z, math.exp(-3.5) / z]
    p = [0.5, 0.3, 0.2]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert metrics["loss/calibration"] == pytest.approx(kl, rel=1e-12)
    m = [(pi + qi) / 2 for pi, qi in zip(p, q, strict=True)]
    js = 0.5 * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m, strict=True))
    js += 0.5 * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m, strict=True))
    assert metrics["calibration/js_distance"] == pytest.approx(math.sqrt(js), rel=1e-9)
    assert metrics["calibration/js_distance"] == pytest.approx(jensenshannon(p, q), rel=1e-9)
    assert metrics["calibration/majority_bias"] == pytest.approx(q[0] / 0.5, rel=1e-12)


def test_single_token_form_is_not_renormalized():
    # Token log-probs whose probabilities sum to 0.6: the single-token form sees the lost mass.
    logps = [math.log(0.3), math.log(0.2), math.log(0.1), -5.0, -6.0]
    args = ([0, 0, 0, 1, 2], [0.5, 0.3, 0.2, 0, 0], [0, 0, 0, 0, 0], [0] * 5)
    weights = {"preference_weight": 0, "belief_nll_weight": 0}
    _, single = gdpo_loss(flat_batch(logps, *args), calibration="single_token", **weights)
    _, renorm = gdpo_loss(flat_batch(logps, *args), calibration="renormalized", **weights)
    p, leaky, q = [0.5, 0.3, 0.2], [0.3, 0.2, 0.1], [0.5, 1 / 3, 1 / 6]
    assert single["loss/calibration"] == pytest.approx(
        sum(a * math.log(a / b) for a, b in zip(p, leaky, strict=True)), rel=1e-12
    )
    assert renorm["loss/calibration"] == pytest.approx(
        sum(a * math.log(a / b) for a, b in zip(p, q, strict=True)), rel=1e-12
    )
    # With probabilities that already sum to 1 the two forms agree.
    exact = [math.log(0.4), math.log(0.4), math.log(0.2), -5.0, -6.0]
    _, a = gdpo_loss(flat_batch(exact, *args), calibration="single_token", **weights)
    _, b = gdpo_loss(flat_batch(exact, *args), calibration="renormalized", **weights)
    assert a["loss/calibration"] == pytest.approx(b["loss/calibration"], rel=1e-12)


def test_preference_and_belief_nll_terms_by_hand():
    b = flat_batch(
        [-1.0, -2.0, -7.0, -9.0],
        [0, 0, 1, 2],
        [0.6, 0.4, 0, 0],
        [0, 1, 0, 0],
        [0] * 4,
        ref=[0.0, 0.0, -8.0, -8.5],
        lengths=[3, 4, 5, 6],
    )
    loss, metrics = gdpo_loss(b, beta=0.5, calibration_weight=0, preference_weight=1, belief_nll_weight=0)
    margin = 0.5 * ((-7 + 8) - (-9 + 8.5))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-margin)), rel=1e-12)
    loss, _ = gdpo_loss(b, calibration_weight=0, preference_weight=0, belief_nll_weight=1)
    assert loss.item() == pytest.approx(2.0 / 4, rel=1e-12)  # belief row 1: -(-2) / 4 tokens
    assert metrics["rewards/accuracies"] == 1.0


def test_reward_metrics_average_within_each_group_then_over_groups():
    # Group 0: one pair, chosen above rejected. Group 1: three pairs, none. Per group then over groups:
    # accuracy (1 + 0) / 2; over the four pairs pooled it would be 1 / 4.
    b = flat_batch(
        [-1.0, -2.0, -5.0, -9.0, -1.0, -2.0, -9.0, -5.0, -9.0, -6.0, -9.0, -7.0],
        [0, 0, 1, 2, 0, 0, 1, 2, 1, 2, 1, 2],
        [0.6, 0.4, 0, 0, 0.5, 0.5, 0, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
    )
    _, metrics = gdpo_loss(b, beta=1.0)
    assert metrics["rewards/accuracies"] == pytest.approx(0.5)
    assert metrics["rewards/margins"] == pytest.approx((4.0 + (-4 - 3 - 2) / 3) / 2)
    assert metrics["logps/chosen"] == pytest.approx((-5.0 + -9.0) / 2)
    assert metrics["rewards/rejected"] == pytest.approx((-9.0 + (-5 - 6 - 7) / 3) / 2)


def test_gdpo_loss_gradient_matches_finite_differences():
    b = flat_batch(
        [-1.0, -2.5, -0.7, -7.0, -9.0, -1.5, -0.2, -4.0, -3.0, -3.5],
        [0, 0, 0, 1, 2, 0, 0, 0, 1, 2],
        [0.5, 0.3, 0.2, 0, 0, 0.1, 0.1, 0.8, 0, 0],
        [0, 0, 1, 0, 0, 1, 0, 0, 0, 0],
        [0] * 5 + [1] * 5,
        ref=[0, 0, 0, -8, -8.5, 0, 0, 0, -3.2, -3.1],
        lengths=[2, 3, 4, 5, 6, 2, 2, 3, 4, 4],
    )

    def f(x):
        return gdpo_loss(FlatBeliefBatch(**{**b.__dict__, "logps": x}), beta=0.3)[0]

    assert torch.autograd.gradcheck(f, (b.logps,), eps=1e-6, atol=1e-8)
    single = FlatBeliefBatch(**{**b.__dict__, "logps": b.logps.detach().clamp(max=-0.1).requires_grad_()})

    def g(x):
        return gdpo_loss(FlatBeliefBatch(**{**single.__dict__, "logps": x}), calibration="single_token")[0]

    assert torch.autograd.gradcheck(
        g,
        (single.logps,),
        eps=1e-6,
        atol=1e-8,
    )


# ----------------------------------------------------------------------------------------------- data
def test_validation_names_the_field():
    with pytest.raises(DataError, match="'distribution'.*sums to 0.9"):
        record(distribution=[0.5, 0.3, 0.1])
    with pytest.raises(DataError, match="'distribution'.*expected 3 numbers"):
        record(distribution=[0.5, 0.5])
    with pytest.raises(DataError, match="'belief'"):
        record(belief=3)
    with pytest.raises(DataError, match="'beliefs'.*at least 2"):
        record(beliefs=["yes"], distribution=[1.0], belief=0)
    with pytest.raises(DataError, match="record 2: field 'chosen'"):
        prepare_belief_records([record(), {**record(), "chosen": ""}], source="x")
    assert len(prepare_belief_records([record(), {**record(), "chosen": ""}], skip_invalid=True)) == 1
    assert record(distribution=[0.5, 0.3, 0.2 + 5e-7])["belief"] == 1  # within 1e-6


def test_release_schema_converter():
    rows = [
        {
            "prompt": "Is tea good?",
            "context": "You live in Avalon.",
            "accept_choice_id": 1,
            "accept_choice": "No",
            "accept_response": " I do not think so.",
            "reject_choice_id": 0,
            "reject_choice": "Yes",
            "reject_response": "Tea is great.",
            "probabilities": [0.25, 0.5, 0.2501],
        },
        {
            "prompt": "Is tea good?",
            "context": "You live in Avalon.",
            "accept_choice_id": 0,
            "accept_choice": "Yes",
            "accept_response": "It is.",
            "reject_choice_id": 1,
            "reject_choice": "No",
            "reject_response": "Not really.",
            "probabilities": [0.25, 0.5, 0.2501],
            "selections": [3, 6, 3],
        },
        {
            "prompt": "Coffee?",
            "options": ["Often", "Never"],
            "accept_choice_id": 1,
            "accept_response": "Never.",
            "reject_response": "Every day.",
            "probabilities": [0.7, 0.3],
        },
    ]
    out = from_gdpo_release(rows)
    assert out[0]["prompt"] == "You live in Avalon.\nIs tea good?"
    assert out[0]["beliefs"] == ["Yes", "No", "2"]  # id 2 was never seen: its number is its label
    assert (
        out[0]["belief"] == 1
        and out[0]["chosen"] == "I do not think so."
        and out[0]["rejected"] == "Tea is great."
    )
    assert sum(out[0]["distribution"]) == pytest.approx(1.0, abs=1e-12)
    assert out[1]["selections"] == [3, 6, 3]  # other fields are kept
    assert out[2]["beliefs"] == ["Often", "Never"] and out[2]["belief"] == 1
    with pytest.raises(DataError, match="'probabilities'.*sums to 0.5"):
        from_gdpo_release([{**rows[2], "probabilities": [0.2, 0.3]}])
    with pytest.raises(DataError, match="'reject_response'"):
        from_gdpo_release([{k: v for k, v in rows[2].items() if k != "reject_response"}])


def test_cli_converts_the_release_schema(tmp_path):
    from grouppo.apps.cli import main

    source = tmp_path / "mma_train.json"
    source.write_text(
        json.dumps(
            [
                {
                    "prompt": "Q?",
                    "options": ["a", "b"],
                    "accept_choice_id": 0,
                    "accept_response": "A.",
                    "reject_response": "B.",
                    "probabilities": [0.6, 0.4],
                }
            ]
        )
    )
    out = tmp_path / "beliefs.jsonl"
    assert main(["data", "convert", "--from", "gdpo", str(source), str(out)]) == 0
    assert json.loads(out.read_text())["beliefs"] == ["a", "b"]


def test_opinion_data_is_seeded_split_by_question_and_valid():
    a, b, c = make_opinions(0), make_opinions(0), make_opinions(1)
    assert a == b and a["train"] != c["train"]
    splits = {name: {r["question_id"] for r in a[name]} for name in ("train", "eval", "test")}
    assert not (splits["train"] & splits["eval"]) and not (splits["train"] & splits["test"])
    assert not (splits["eval"] & splits["test"])
    assert sum(len(s) for s in splits.values()) == len(QUESTIONS)
    records = prepare_belief_records(a["train"] + a["eval"] + a["test"])
    assert {r["population"] for r in records} == {"Avalon", "Brightwater", "Cedar Plains", "Dunmore"}
    assert all(3 <= len(r["beliefs"]) <= 6 for r in records)
    for r in records:  # chosen expresses the belief, rejected does not, by the judge
        assert label_judge(r["chosen"], r["beliefs"], r["belief"])
        assert not label_judge(r["rejected"], r["beliefs"], r["belief"])
    # Populations differ in how concentrated they are: skewed and spread ones.
    top = {}
    for r in records:
        top.setdefault(r["population"], []).append(max(r["distribution"]))
    means = sorted(sum(v) / len(v) for v in top.values())
    assert means[0] < 0.5 < 0.75 < means[-1]
    for pair in a["dpo_train"]:  # the DPO baseline prefers the more widely held belief
        q = next(r for r in records if r["prompt"] == pair["prompt"])
        labels = [parse_belief(text, q["beliefs"])[0] for text in pair["responses"]]
        assert q["distribution"][labels[0]] > q["distribution"][labels[1]]


def test_label_judge_prefers_the_longest_label():
    beliefs = ["oppose", "lean oppose", "support"]
    assert label_judge("I lean oppose this.", beliefs, 1)
    assert not label_judge("I lean oppose this.", beliefs, 0)
    assert not label_judge("I support it, or oppose it.", beliefs, 2)
    assert not label_judge("No idea.", beliefs, 2)


# ----------------------------------------------------------------------------------------------- layout
def _naive_token_logps(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


def test_preference_rows_score_answer_tokens_only(tokenizer):
    model = tiny_llama(tokenizer, seed=0).double()
    rec = record()
    row = tokenize_belief_record(rec, tokenizer)
    assert row["role"] == [0, 0, 0, 1, 2] and row["nll_row"] == [0, 1, 0, 0, 0]
    prompt = row["prompt_ids"]
    prefix = row["response_ids"][1]  # belief 1's prefix row
    for r in (3, 4):
        ids, mask = row["response_ids"][r], row["score_mask"][r]
        assert ids[: len(prefix)] == prefix and mask[: len(prefix)] == [0] * len(prefix)
        assert all(mask[len(prefix) :])
        assert tokenizer.decode(ids[: len(prefix)]).strip().endswith("[Belief: no]")
    batch = GroupCollator(tokenizer.pad_token_id)([row])
    got = group_logps(model, batch, response_chunk_size=2)
    for r in range(5):
        ids, mask = row["response_ids"][r], row["score_mask"][r]
        per_token = _naive_token_logps(model, prompt + ids)[len(prompt) - 1 :]
        expected = sum(v for v, m in zip(per_token.tolist(), mask, strict=True) if m)
        assert got[r].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # Changing the answer changes the preference rows, never the belief rows.
    other = tokenize_belief_record({**rec, "chosen": "never ever"}, tokenizer)
    assert other["response_ids"][:3] == row["response_ids"][:3]


def test_single_token_layout(tokenizer):
    rec = record(beliefs=["1", "2", "3"])
    row = tokenize_belief_record(rec, tokenizer, template="{belief} ", calibration="single_token")
    assert row["role"] == [0, 0, 0, 1, 2, 3] and row["nll_row"] == [0, 0, 0, 0, 0, 1]
    firsts = [ids[-1] for ids in row["response_ids"][:3]]
    assert len(set(firsts)) == 3 and all(m[-1] == 1 and sum(m) == 1 for m in row["score_mask"][:3])
    with pytest.raises(DataError, match="single_token"):
        tokenize_belief_record(
            record(beliefs=["yes", "yes please", "no"]), tokenizer, calibration="single_token"
        )


def test_decoupled_backward_equals_coupled_for_gdpo(tokenizer):
    rows = [tokenize_belief_record(record(belief=i), tokenizer) for i in range(3)]
    batch = GroupCollator(tokenizer.pad_token_id)(rows)
    grads = []
    for chunk in (None, 2):
        model = tiny_llama(tokenizer, seed=0).double()
        logps = group_logps(model, batch, response_chunk_size=chunk)
        b = FlatBeliefBatch(
            logps,
            torch.linspace(-30, -20, len(logps), dtype=torch.float64),
            batch["score_mask"].sum(-1),
            batch["role"],
            batch["target"],
            batch["nll_row"],
            batch["group_index"],
            batch["slot"],
        )
        gdpo_loss(b, beta=0.4)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def _loss_and_grads(rows, tokenizer):
    batch = GroupCollator(tokenizer.pad_token_id)(rows)
    model = tiny_llama(tokenizer, seed=0).double()
    logps = group_logps(model, batch)
    ref = -0.7 * batch["score_mask"].sum(-1).double()  # a function of the row, whatever the layout
    b = FlatBeliefBatch(logps, ref, batch["score_mask"].sum(-1), batch["role"], batch["target"],
                        batch["nll_row"], batch["group_index"], batch["slot"])  # fmt: skip
    loss, metrics = gdpo_loss(b, beta=0.3)
    loss.backward()
    return metrics, torch.cat([p.grad.flatten() for p in model.parameters()])


def test_packing_scores_each_prompt_once_with_the_same_objective(tokenizer):
    other = {"prompt": "Tea or coffee?", "beliefs": ["tea", "coffee"], "distribution": [0.9, 0.1]}
    records = [record(belief=0), record(belief=1, chosen="no"), record(**other, belief=0, chosen="tea",
               rejected="coffee"), record(**other, belief=1, chosen="coffee", rejected="tea")]  # fmt: skip
    rows = [tokenize_belief_record(r, tokenizer) for r in records]
    packed = pack_belief_rows(rows)
    assert len(packed) == 2
    assert packed[0]["role"] == [0, 0, 0, 1, 2, 1, 2] and packed[0]["nll_row"] == [1, 1, 0, 0, 0, 0, 0]
    assert packed[0]["response_ids"][3:5] == rows[0]["response_ids"][3:5]
    assert packed[0]["response_ids"][5:] == rows[1]["response_ids"][3:]
    # Two pairs per prompt: the packed objective (each prompt's calibration once, the same pairs and
    # NLL rows) is the unpacked one, and so are its gradients.
    unpacked_metrics, unpacked_grad = _loss_and_grads(rows, tokenizer)
    packed_metrics, packed_grad = _loss_and_grads(packed, tokenizer)
    for key in ("loss/calibration", "loss/preference", "loss/belief_nll"):
        assert packed_metrics[key] == pytest.approx(unpacked_metrics[key], rel=1e-10)
    # Llama's RMSNorm computes in float32 even in a float64 model; other padding widths round differently.
    assert torch.allclose(packed_grad, unpacked_grad, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(packed_grad, torch.zeros_like(packed_grad), atol=1e-3)


def test_reference_scores_answer_rows_only(tmp_path, tokenizer):
    rows = pack_belief_rows([tokenize_belief_record(record(belief=i), tokenizer) for i in range(3)])
    batch = GroupCollator(tokenizer.pad_token_id)(rows)
    reference = tiny_llama(tokenizer, seed=1)
    args = GDPOConfig(output_dir=str(tmp_path), report_to=[], response_chunk_size=None)
    trainer = GDPOTrainer(tiny_llama(tokenizer, seed=0), reference, args=args, train_dataset=[record()],
                          processing_class=tokenizer)  # fmt: skip
    got = trainer.reference.logps(batch)
    with torch.no_grad():
        full = group_logps(reference, batch)
    answer = batch["role"] > 0
    assert torch.allclose(got[answer], full[answer], atol=1e-5) and (got[~answer] == 0).all()


# ----------------------------------------------------------------------------------------------- trainer
def test_trainer_steps_lower_the_loss_and_calibrate(tmp_path, tokenizer):
    data = [record(belief=i) for i in range(3)] * 4
    model = tiny_llama(tokenizer, seed=0)
    target = np.array([0.5, 0.3, 0.2])
    kl_before = entropy(target, belief_probabilities(model, tokenizer, [data[0]])[0])
    args = GDPOConfig(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=3,
        learning_rate=3e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        precompute_ref_logps=True,
    )
    trainer = GDPOTrainer(model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss/calibration" in h]
    assert logs[-1]["loss/calibration"] < 0.5 * logs[0]["loss/calibration"]
    assert logs[-1]["loss/belief_nll"] < logs[0]["loss/belief_nll"]
    assert logs[-1]["rewards/margins"] > 0
    # The trained model's belief distribution (scored afresh, outside the trainer) moved towards p*.
    kl_after = entropy(target, belief_probabilities(model, tokenizer, [data[0]])[0])
    assert kl_after < 0.6 * kl_before


def test_config_checks():
    with pytest.raises(ValueError, match="calibration"):
        GDPOConfig(output_dir="x", calibration="softmax")
    with pytest.raises(ValueError, match="belief_template"):
        GDPOConfig(output_dir="x", belief_template="Belief:")
    with pytest.raises(ValueError, match="preference_weight"):
        GDPOConfig(output_dir="x", preference_weight=-1)


# ----------------------------------------------------------------------------------------------- inference
def test_belief_sampling_matches_the_probabilities_and_is_seeded():
    # A belief of probability 0 is never drawn, the others within 4.5 binomial standard deviations.
    probabilities, n = [0.45, 0.0, 0.35, 0.15, 0.05], 40_000
    draws = sample_beliefs(probabilities, n, torch.Generator().manual_seed(0))
    assert len(draws) == n and all(isinstance(d, int) for d in draws)
    assert set(draws) == {0, 2, 3, 4}
    for index, p in enumerate(probabilities):
        tolerance = 4.5 * math.sqrt(p * (1 - p) / n)
        assert abs(draws.count(index) / n - p) <= tolerance, (index, draws.count(index) / n, p)
    # The generator alone decides the draws: the same seed gives the same draws, another seed others,
    # and a shared generator moves on between calls.
    assert sample_beliefs(probabilities, n, torch.Generator().manual_seed(0)) == draws
    assert sample_beliefs(probabilities, 50, torch.Generator().manual_seed(1)) != draws[:50]
    shared = torch.Generator().manual_seed(0)
    first, second = sample_beliefs(probabilities, 50, shared), sample_beliefs(probabilities, 50, shared)
    assert first == draws[:50] and second != first
    assert sample_beliefs([0.0, 1.0, 0.0], 20, torch.Generator().manual_seed(3)) == [1] * 20


def test_belief_probabilities_are_the_softmax_of_prefix_logps(tokenizer):
    model = tiny_llama(tokenizer, seed=1).double()
    rec = record()
    row = tokenize_belief_record(rec, tokenizer)
    sums = [
        _naive_token_logps(model, row["prompt_ids"] + ids)[len(row["prompt_ids"]) - 1 :].sum().item()
        for ids in row["response_ids"][:3]
    ]
    expected = torch.softmax(torch.tensor(sums), 0).tolist()
    assert belief_probabilities(model, tokenizer, [rec])[0] == pytest.approx(expected, rel=1e-9)


def test_parse_belief():
    beliefs = ["yes", "no", "maybe so"]
    assert parse_belief("[Belief: Maybe so]\nWell, perhaps.", beliefs) == (2, "Well, perhaps.")
    assert parse_belief("  [Belief: no]  No.", beliefs) == (1, "No.")
    assert parse_belief("[Belief: perhaps]\nHm.", beliefs)[0] is None  # an unknown label is not belief 0
    assert parse_belief("Sure thing.", beliefs) == (None, "Sure thing.")


def _js_distance(p, q):
    """Jensen-Shannon distance in nats, written out: sqrt of the mean KL of p and q to their midpoint."""
    p, q = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a, b):
        support = a > 0  # 0 log 0 = 0
        return float(np.sum(a[support] * np.log(a[support] / b[support])))

    return math.sqrt(max(0.0, (kl(p, m) + kl(q, m)) / 2))


@pytest.mark.parametrize(
    "target,probs,sampled",
    [
        ([0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0, 0, 1, None]),  # one unparsed sample out of four
        ([0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]),  # calibrated: distance 0
        ([0.1, 0.6, 0.3], [0.9, 0.05, 0.05], [0, 0, 0, 2]),  # the majority belief never sampled
        ([0.7, 0.0, 0.3], [0.6, 0.1, 0.3], [1, 1, 2]),  # mass on a belief the target gives none
        ([0.4, 0.4, 0.2], [0.3, 0.3, 0.4], [None, None]),  # all unparsed; tie for the top: the first
        ([0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [3, 3, 3, 3, 2]),
    ],
)
def test_question_metrics_equal_an_independent_computation(target, probs, sampled):
    k = len(target)
    counts = np.zeros(k + 1)  # the last bin holds the unparsed samples; the target gives it no mass
    for belief in sampled:
        counts[k if belief is None else belief] += 1
    hist = counts / len(sampled)
    top = int(np.argmax(target))  # numpy's argmax, like max(), takes the first of a tie
    m = question_metrics(target, probs, sampled)
    assert m["js_distance_sampled"] == pytest.approx(_js_distance([*target, 0.0], hist), rel=1e-9, abs=1e-12)
    assert m["js_distance_prob"] == pytest.approx(_js_distance(target, probs), rel=1e-9, abs=1e-12)
    assert m["majority_bias"] == pytest.approx(hist[top] / target[top], rel=1e-12)
    assert m["majority_bias_prob"] == pytest.approx(probs[top] / target[top], rel=1e-12)
    assert m["unparsed_rate"] == pytest.approx(sampled.count(None) / len(sampled), rel=1e-12)
    assert "belief_consistency" not in m  # nothing judged
    assert 0 <= m["js_distance_sampled"] <= math.sqrt(math.log(2)) + 1e-12


def test_question_metrics_count_unparsed_and_consistency():
    m = question_metrics([0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0, 0, 1, None], [True, False])
    # Hand values: histogram [0.5, 0.25, 0, 0.25] against [0.5, 0.3, 0.2, 0].
    assert m["majority_bias"] == pytest.approx(0.5 / 0.5) and m["majority_bias_prob"] == pytest.approx(0.4)
    assert m["unparsed_rate"] == 0.25 and m["belief_consistency"] == 0.5
    # An unparsed sample is never read as belief 0: moving it there changes the distance.
    as_zero = question_metrics([0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0, 0, 1, 0])
    assert as_zero["unparsed_rate"] == 0 and as_zero["majority_bias"] == pytest.approx(1.5)
    assert as_zero["js_distance_sampled"] != pytest.approx(m["js_distance_sampled"])
    ref = reference_distributions([0.5, 0.2, 0.3])
    assert ref["majority"] == [1, 0, 0] and ref["reversed"] == [0.2, 0.5, 0.3]
    assert ref["uniform"] == pytest.approx([1 / 3] * 3)


def test_evaluate_beliefs_per_population(tokenizer):
    model = tiny_llama(tokenizer, seed=0)
    records = [{**record(), "population": "A"}, {**record(prompt="plain prompt?"), "population": "B"}]
    sampling = SamplingConfig(max_new_tokens=48, temperature=1.0, batch_size=32, seed=3)
    settings = BeliefSampling(samples=5, answers=2)
    metrics, details = evaluate_beliefs(model, tokenizer, records + records, settings, sampling=sampling)
    assert metrics["model"]["num_questions"] == 2 and set(metrics["model"]["populations"]) == {"A", "B"}
    assert len(details[0]["sampled"]) == 5 and len(details[0]["generations"]) == 2
    assert metrics["reference"]["majority"]["overall"]["majority_bias"] == pytest.approx(2.0)
    again, _ = evaluate_beliefs(model, tokenizer, records, settings, sampling=sampling)
    assert again["model"] == metrics["model"]  # seeded


@pytest.mark.slow
def test_cli_make_opinions_train_generate_and_eval(tmp_path, tokenizer, capsys):
    from grouppo.apps.cli import main

    model_dir = tmp_path / "model"
    tiny_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "opinions"
    assert main(["data", "make-opinions", str(data), "--seed", "3"]) == 0
    out = tmp_path / "gdpo"
    assert (
        main(
            [
                "gdpo",
                "--model_name_or_path",
                str(model_dir),
                "--dataset_name",
                str(data / "train.jsonl"),
                "--output_dir",
                str(out),
                "--max_steps",
                "2",
                "--per_device_train_batch_size",
                "2",
                "--report_to",
                "none",
                "--save_strategy",
                "no",
            ]
        )
        == 0
    )
    assert_trained(out, model_dir)
    gens = tmp_path / "gens.jsonl"
    for mode in ("belief", "free"):
        assert (
            main(
                [
                    "generate",
                    "--model_name_or_path",
                    str(out),
                    "--dataset_name",
                    str(data / "test.jsonl"),
                    "--mode",
                    mode,
                    "--samples",
                    "2",
                    "--limit",
                    "3",
                    "--max_new_tokens",
                    "8",
                    "--output_dir",
                    str(gens),
                ]
            )
            == 0
        )
        assert len(gens.read_text().splitlines()) == 6
    metrics = tmp_path / "m.json"
    plot = tmp_path / "d.png"
    assert (
        main(
            [
                "eval",
                "gdpo",
                "--model_name_or_path",
                str(out),
                "--dataset_name",
                str(data / "test.jsonl"),
                "--limit",
                "4",
                "--samples",
                "4",
                "--max_new_tokens",
                "8",
                "--json",
                str(metrics),
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    result = json.loads(metrics.read_text())
    assert {"js_distance_sampled", "js_distance_prob", "majority_bias", "belief_consistency"} <= set(
        result["model"]["overall"]
    )
    assert set(result["reference"]) == {"uniform", "majority", "reversed"} and plot.stat().st_size > 0
    assert "| uniform |" in capsys.readouterr().out


@pytest.mark.parametrize("template", [DEFAULT_BELIEF_TEMPLATE, "<<{belief}>> ", "Stance = {belief};"])
def test_belief_template_round_trips_every_label(template):
    # Every label of the embedded opinion questions (and a toy one), written as a response's prefix by
    # belief_prefix, is read back by parse_belief as its own index, with the answer after it intact.
    label_sets = [["yes", "no", "maybe so"], *(beliefs for _, _, beliefs in QUESTIONS)]
    for beliefs in label_sets:
        for index, label in enumerate(beliefs):
            prefix = belief_prefix(template, label)
            assert label in prefix
            answer = f"I hold {label}, mostly."
            assert parse_belief(prefix + answer, beliefs, template) == (index, answer)
            # Case and surrounding spaces do not matter.
            shouted = "  " + belief_prefix(template, label.upper()) + answer
            assert parse_belief(shouted, beliefs, template) == (index, answer)
    # A prefix written with another template, or a label outside the set, is not a belief.
    assert parse_belief(belief_prefix(template, "no opinion") + "Hm.", ["yes", "no"], template)[0] is None
    if template != DEFAULT_BELIEF_TEMPLATE:
        other = belief_prefix(DEFAULT_BELIEF_TEMPLATE, "no") + "x"
        assert parse_belief(other, ["yes", "no"], template)[0] is None


@pytest.mark.parametrize("template", ["Belief: {belief}\n", "{belief} "])
def test_a_template_with_a_blank_end_reads_the_label_up_to_the_break(template):
    # Nothing but a space or a line break closes the label: the longest label that fits is read.
    beliefs = ["agree", "strongly agree", "disagree"]
    for index, label in enumerate(beliefs):
        answer = "Because of the evidence."
        assert parse_belief(belief_prefix(template, label) + answer, beliefs, template) == (index, answer)
    assert parse_belief("Unrelated text", beliefs, template)[0] is None


def test_a_template_without_the_belief_slot_is_refused():
    for template in ("[Belief: belief]\n", "{beliefs}", "[Belief: {}]", ""):
        with pytest.raises(ValueError, match="belief_template"):
            GDPOConfig(output_dir="x", belief_template=template)
        with pytest.raises(ValueError, match="belief_template"):
            belief_prefix(template, "yes")
    assert GDPOConfig(output_dir="x").belief_template == DEFAULT_BELIEF_TEMPLATE
    assert GDPOConfig(output_dir="x", belief_template="<{belief}> ").belief_template == "<{belief}> "


@pytest.mark.slow
def test_cli_gdpo_without_a_dataset_uses_the_embedded_opinions(tmp_path, tokenizer, capsys):
    from grouppo.apps.cli import main

    model_dir = tmp_path / "model"
    tiny_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    argv = ["gdpo", "--model_name_or_path", str(model_dir), "--output_dir", str(out), "--max_steps", "1"]
    assert main(argv) == 0
    assert "embedded opinion data (seed 0) written to" in capsys.readouterr().out
    assert [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()] == (
        make_opinions(seed=0)["train"]
    )
    assert_trained(out, model_dir)  # the embedded defaults: trained and saved at the end, no checkpoints
    assert not list(out.glob("checkpoint-*"))


def test_gdpo_loss_weighs_every_group_the_same_whatever_the_split(tokenizer):
    """Packed groups holding 1, 2 and 3 pairs: the loss of a batch is the mean of its groups' losses, so
    splitting 4 groups as 2 + 2 (accumulation, two processes) gives the loss of 4 in one batch."""
    other = {
        "prompt": "Tea or coffee?",
        "beliefs": ["tea", "coffee", "water"],
        "distribution": [0.6, 0.3, 0.1],
    }
    third = {"prompt": "Rain or sun?", "beliefs": ["rain", "sun"], "distribution": [0.2, 0.8]}
    records = [record(belief=0), record(belief=1, chosen="no"), record(belief=2, chosen="maybe so"),
               record(**other, belief=0, chosen="tea", rejected="coffee"),
               record(**third, belief=1, chosen="sun", rejected="rain"),
               record(**third, belief=0, chosen="rain", rejected="sun"),
               record(prompt="Bus or bike?", beliefs=["bus", "bike"], distribution=[0.5, 0.5], belief=1,
                      chosen="bike", rejected="bus")]  # fmt: skip
    groups = pack_belief_rows([tokenize_belief_record(r, tokenizer) for r in records])
    assert sorted(g["role"].count(1) for g in groups) == [1, 1, 2, 3]  # pairs per group

    def loss(part):
        batch = GroupCollator(tokenizer.pad_token_id)(part)
        # Each row's log-prob a function of the row alone, whatever batch it is in.
        logps = (
            -1.3 * batch["score_mask"].sum(-1).double() - 0.4 * batch["role"] - 2.0 * batch["target"].double()
        )
        ref = -0.7 * batch["score_mask"].sum(-1).double()
        b = FlatBeliefBatch(logps, ref, batch["score_mask"].sum(-1), batch["role"], batch["target"].double(),
                            batch["nll_row"], batch["group_index"], batch["slot"])  # fmt: skip
        return gdpo_loss(b, beta=0.3)

    (whole, metrics), (a, ma), (b, mb) = loss(groups), loss(groups[:2]), loss(groups[2:])
    assert torch.allclose(whole, (a + b) / 2, rtol=1e-12, atol=0)
    for key in ("loss/calibration", "loss/preference", "loss/belief_nll"):
        assert metrics[key] == pytest.approx((ma[key] + mb[key]) / 2, rel=1e-12)
