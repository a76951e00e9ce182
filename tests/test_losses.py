"""Group losses: gradients against finite differences and the closed forms, and reductions to DPO."""

import math

import pytest
import torch
import torch.nn.functional as F

from grouppo.losses import LOSSES, FlatGroupBatch, PaddedGroups, group_dpo_loss, positive_nll


def make_groups(s, labels, scores, sizes):
    group_index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    slot = torch.cat([torch.arange(k) for k in sizes])
    scores = torch.tensor(scores, dtype=s.dtype)
    return PaddedGroups.from_flat(s, torch.tensor(labels), scores, group_index, slot)


SIZES = [2, 5, 3]
LABELS = [1, 0, 1, 1, 0, 0, 0, 0, 1, 0]
SCORES = [0.9, 0.1, 3.0, 2.5, 1.0, -1.0, 0.0, 0.2, 0.7, 0.5]


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_gradient_matches_finite_differences(loss_type):
    s = torch.randn(len(LABELS), dtype=torch.float64, requires_grad=True)
    fn = LOSSES[loss_type]

    def total(x):
        return fn(make_groups(x, LABELS, SCORES, SIZES), 0.5).sum()

    assert torch.autograd.gradcheck(total, (s,), eps=1e-6, atol=1e-8)


def _grad(loss_type, s, temperature=1.0):
    s = s.clone().requires_grad_(True)
    LOSSES[loss_type](make_groups(s, LABELS, SCORES, SIZES), temperature).sum().backward()
    return s.grad


def _by_group(values):
    return torch.split(values, SIZES)


def test_all_pairs_gradient_matches_closed_form():
    s = torch.randn(len(LABELS), dtype=torch.float64)
    expected = []
    for sg, lg in zip(_by_group(s), _by_group(torch.tensor(LABELS)), strict=True):
        pos, neg = lg == 1, lg == 0
        npairs = pos.sum() * neg.sum()
        grad = torch.zeros_like(sg)
        for i in torch.nonzero(pos).flatten():
            grad[i] = -torch.sigmoid(sg[neg] - sg[i]).sum() / npairs
        for j in torch.nonzero(neg).flatten():
            grad[j] = torch.sigmoid(sg[j] - sg[pos]).sum() / npairs
        expected.append(grad)
    torch.testing.assert_close(_grad("all_pairs", s), torch.cat(expected), rtol=1e-12, atol=1e-12)


def test_multi_positive_and_infonca_gradients_match_closed_forms():
    s = torch.randn(len(LABELS), dtype=torch.float64)
    mp, nca = [], []
    for sg, lg, rg in zip(
        _by_group(s),
        _by_group(torch.tensor(LABELS)),
        _by_group(torch.tensor(SCORES, dtype=torch.float64)),
        strict=True,
    ):
        p = torch.softmax(sg, 0)
        pos = (lg == 1).double()
        mp.append(p - pos * p / (p * pos).sum())
        nca.append(p - torch.softmax(rg / 0.5, 0))
    torch.testing.assert_close(_grad("multi_positive", s), torch.cat(mp), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad("infonca", s, 0.5), torch.cat(nca), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["all_pairs", "multi_positive", "sdpo", "plackett_luce"])
def test_k2_reduces_to_dpo(loss_type):
    s = torch.tensor([0.3, -1.2, 2.0, 0.5], dtype=torch.float64)
    g = make_groups(s, [1, 0, 0, 1], [1.0, 0.0, 0.0, 1.0], [2, 2])
    expected = -F.logsigmoid(torch.tensor([0.3 + 1.2, 0.5 - 2.0], dtype=torch.float64))
    torch.testing.assert_close(LOSSES[loss_type](g, 1.0), expected)


def test_all_pairs_equals_mean_over_decomposed_pairs():
    s = torch.randn(6, dtype=torch.float64)
    g = make_groups(s, [1, 1, 1, 0, 0, 0], [0.0] * 6, [6])
    pairs = [-F.logsigmoid(s[i] - s[j]) for i in range(3) for j in range(3, 6)]
    torch.testing.assert_close(LOSSES["all_pairs"](g, 1.0)[0], torch.stack(pairs).mean())


def test_plackett_luce_hand_computed():
    s = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    g = make_groups(s, [0, 1, 0], [0.2, 0.9, 0.1], [3])  # ranking by score: 1, 0, 2
    expected = -(2.0 - torch.logsumexp(torch.tensor([2.0, 1.0, 0.5]), 0)) - (
        1.0 - torch.logsumexp(torch.tensor([1.0, 0.5]), 0)
    )
    torch.testing.assert_close(LOSSES["plackett_luce"](g, 1.0)[0], expected.double())


def test_nll_is_per_token_mean_over_positives():
    logps = torch.tensor([[-4.0, -9.0, -1.0]])
    lengths = torch.tensor([[2.0, 3.0, 1.0]])
    positive = torch.tensor([[True, True, False]])
    torch.testing.assert_close(positive_nll(logps, lengths, positive), torch.tensor([(2.0 + 3.0) / 2]))


def test_group_dpo_loss_metrics_follow_trl_names_at_k2():
    batch = FlatGroupBatch(
        logps=torch.tensor([-5.0, -7.0, -3.0, -2.0]),
        ref_logps=torch.tensor([-6.0, -6.0, -3.0, -3.0]),
        lengths=torch.tensor([5, 7, 3, 2]),
        labels=torch.tensor([1, 0, 1, 0]),
        scores=torch.tensor([1.0, 0.0, 1.0, 0.0]),
        group_index=torch.tensor([0, 0, 1, 1]),
        slot=torch.tensor([0, 1, 0, 1]),
    )
    loss, m = group_dpo_loss(batch, beta=0.1, nll_weight=0.5)
    chosen, rejected = torch.tensor([0.1, 0.0]), torch.tensor([-0.1, 0.1])
    dpo = -F.logsigmoid(chosen - rejected).mean()
    nll = (5 / 5 + 3 / 3) / 2
    assert loss.item() == pytest.approx(dpo.item() + 0.5 * nll, rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(0.05)
    assert m["rewards/rejected"] == pytest.approx(0.0)
    assert m["rewards/accuracies"] == pytest.approx(0.5)
    assert m["rewards/margins"] == pytest.approx(0.05)
    assert m["logps/chosen"] == pytest.approx(-4.0)
    assert m["logps/rejected"] == pytest.approx(-4.5)
    assert m["group/pair_accuracy"] == pytest.approx(0.5)


def test_unknown_loss_type_names_the_choices():
    batch = FlatGroupBatch(
        *(torch.zeros(2) for _ in range(4)), torch.zeros(2), torch.tensor([0, 0]), torch.tensor([0, 1])
    )
    with pytest.raises(ValueError, match="all_pairs"):
        group_dpo_loss(batch, loss_type="ipo")


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_a_batchs_loss_is_the_mean_of_its_groups_whatever_the_split(loss_type):
    """Ragged groups (K 2 to 5, 1 to 3 positives): the loss of 4 groups equals the mean of the losses of
    2 + 2, so one process with batch 4, batch 2 with 2 accumulation steps and 2 processes with 2 groups
    each train alike."""
    from grouppo.collate import GroupCollator
    from grouppo.embedded.synthetic import random_groups

    groups = random_groups([2, 5, 3, 4], [1, 2, 1, 3], seed=4, ref_logps=True)

    def loss(part):
        batch = GroupCollator(pad_token_id=0)(part)
        # Each response's log-prob a function of the response alone, whatever batch it is in.
        lengths, ref = batch["response_mask"].sum(-1), batch["ref_logps"].double()
        logps = 0.9 * ref + 0.3 * lengths - 0.2 * batch["slot"]
        scores = batch["scores"].double()
        index = (batch["group_index"], batch["slot"])
        flat = FlatGroupBatch(logps, ref, lengths, batch["labels"], scores, *index)
        return group_dpo_loss(flat, beta=0.3, loss_type=loss_type, nll_weight=0.5)[0]

    whole, halves = loss(groups), (loss(groups[:2]) + loss(groups[2:])) / 2
    assert torch.allclose(whole, halves, rtol=1e-12, atol=0)


def test_label_smoothing_is_conservative_dpo_on_every_pair():
    """``label_smoothing`` eps: each pair's loss is ``-(1 - eps) log sigmoid(m) - eps log sigmoid(-m)``
    (conservative DPO), averaged over the group's pairs; its gradient checks against finite differences.
    (TRL 1.16 applies label_smoothing in its robust, exo_pair and aot losses, not in sigmoid.)"""
    from grouppo.losses import all_pairs_loss

    s = torch.tensor([[1.5, -0.2, 0.3, -1.0]], dtype=torch.float64, requires_grad=True)
    positive = torch.tensor([[True, False, True, False]])
    g = PaddedGroups(s, positive, ~positive, torch.ones_like(positive), s.detach())
    margins = [1.5 - -0.2, 1.5 - -1.0, 0.3 - -0.2, 0.3 - -1.0]
    expected = (
        sum(-0.8 * math.log(1 / (1 + math.exp(-m))) - 0.2 * math.log(1 / (1 + math.exp(m))) for m in margins)
        / 4
    )
    assert all_pairs_loss(g, label_smoothing=0.2).item() == pytest.approx(expected, rel=1e-12)
    assert all_pairs_loss(g).item() != pytest.approx(expected)

    def f(scores):
        return all_pairs_loss(
            PaddedGroups(scores, positive, ~positive, torch.ones_like(positive), scores), 1.0, 0.2
        )

    assert torch.autograd.gradcheck(f, (s,))


def test_group_accuracies_count_a_tie_as_a_miss():
    """At the first step every implicit reward is 0: no pair is ordered and no positive is on top (a tie
    is not a hit, as TRL's rewards/accuracies and grouppo's pair accuracy count it)."""
    from grouppo.losses import group_metrics

    labels, group_index, slot = [1, 0, 0, 1, 0], torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 1, 2, 0, 1])
    scores = torch.tensor(labels, dtype=torch.float32)
    tied = PaddedGroups.from_flat(torch.zeros(5), torch.tensor(labels), scores, group_index, slot)
    metrics = group_metrics(tied, torch.zeros(2, 3))
    for key in ("group/top1_accuracy", "group/pair_accuracy", "rewards/accuracies"):
        assert metrics[key] == 0, key
    # group 0: its positive on top (a hit); group 1: its negative above its positive (a miss)
    s = torch.tensor([0.3, 0.1, 0.3 - 1e-3, 0.0, 0.2])
    metrics = group_metrics(PaddedGroups.from_flat(s, torch.tensor(labels), scores, group_index, slot),
                            torch.zeros(2, 3))  # fmt: skip
    assert metrics["group/top1_accuracy"] == 0.5 and metrics["group/pair_accuracy"] == 0.5
