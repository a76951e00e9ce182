"""Group losses: pure functions of per-response implicit rewards, no model in sight.

Every loss takes a ``PaddedGroups`` (``[G, K]`` tensors padded to the largest group; ``valid`` marks real
responses) and returns one loss per group, ``[G]``. ``s`` is the implicit reward
``beta * (logp - ref_logp)``. At K = 2 with one positive every loss but ``infonca``/``nca`` (which
read soft labels from scores) reduces to DPO's ``-log sigmoid(s_chosen - s_rejected)``.

``group_dpo_loss`` wires them together: rewards, the chosen loss, the optional NLL term on positives,
and the metrics under the names TRL logs (chosen = positives, rejected = negatives; each averaged
within a group, then over groups).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def pad_groups(
    values: torch.Tensor, group_index: torch.Tensor, slot: torch.Tensor, fill: float = 0
) -> torch.Tensor:
    """Scatter flat per-response values ``[N]`` into padded ``[G, K]`` groups (differentiable)."""
    shape = (int(group_index.max()) + 1, int(slot.max()) + 1)
    padded = torch.full(shape, fill, dtype=values.dtype, device=values.device)
    return padded.index_put((group_index, slot), values)


@dataclass
class PaddedGroups:
    """A batch of groups as ``[G, K]`` tensors (K = the largest group; padding has ``valid`` False)."""

    s: torch.Tensor  # implicit rewards beta * (logp - ref_logp)
    positive: torch.Tensor  # bool
    negative: torch.Tensor  # bool
    valid: torch.Tensor  # bool
    scores: torch.Tensor  # the data's scores (labels 1/0 where a record has none)

    @classmethod
    def from_flat(
        cls,
        s: torch.Tensor,
        labels: torch.Tensor,
        scores: torch.Tensor,
        group_index: torch.Tensor,
        slot: torch.Tensor,
    ) -> PaddedGroups:
        """Build groups from flat per-response tensors ``[N]`` and each response's (group, slot)."""
        valid = pad_groups(torch.ones_like(labels, dtype=torch.bool), group_index, slot, False)
        positive = pad_groups(labels.bool(), group_index, slot, False)
        scores = pad_groups(scores.to(s.dtype), group_index, slot)
        return cls(pad_groups(s, group_index, slot), positive, valid & ~positive, valid, scores)


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # The most negative finite value rather than -inf: exp() gives exactly 0 and no gradient turns NaN.
    return x.masked_fill(~mask, torch.finfo(x.dtype).min)


def _mean_over(x: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...] = (1,)) -> torch.Tensor:
    return torch.where(mask, x, 0).sum(dims) / mask.sum(dims)


def all_pairs_loss(g: PaddedGroups, temperature: float = 1.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean DPO loss over every (positive, negative) pair of the group.

    ``L = mean_{i in P, j in N} -log sigmoid(s_i - s_j)``: for one group, exactly the batch mean of DPO
    over the ``|P| * |N|`` decomposed pairs. With ``label_smoothing`` eps, conservative DPO (TRL's
    ``label_smoothing``): each pair's label is right with probability ``1 - eps``,
    ``-(1 - eps) log sigmoid(m) - eps log sigmoid(-m)``.
    """
    pairs = g.positive.unsqueeze(2) & g.negative.unsqueeze(1)
    margin = g.s.unsqueeze(2) - g.s.unsqueeze(1)
    per_pair = -F.logsigmoid(margin)
    if label_smoothing:
        per_pair = (1 - label_smoothing) * per_pair - label_smoothing * F.logsigmoid(-margin)
    return _mean_over(per_pair, pairs, (1, 2))


def multi_positive_loss(g: PaddedGroups, temperature: float = 1.0) -> torch.Tensor:
    """Softmax over the group, all positives as targets: ``logsumexp(s) - logsumexp(s over P)``."""
    return torch.logsumexp(_masked(g.s, g.valid), 1) - torch.logsumexp(_masked(g.s, g.positive), 1)


def sdpo_loss(g: PaddedGroups, temperature: float = 1.0) -> torch.Tensor:
    """S-DPO: each positive against all negatives, ``log(1 + sum_{j in N} exp(s_j - s_w))``.

    With several positives the loss is the mean over positives of each one's S-DPO loss.
    """
    per_positive = F.softplus(torch.logsumexp(_masked(g.s, g.negative), 1, keepdim=True) - g.s)
    return _mean_over(per_positive, g.positive)


def _soft_labels(g: PaddedGroups, temperature: float) -> torch.Tensor:
    return torch.softmax(_masked(g.scores / temperature, g.valid), 1)


def infonca_loss(g: PaddedGroups, temperature: float = 1.0) -> torch.Tensor:
    """InfoNCA: cross-entropy from ``q = softmax(scores / temperature)`` to ``softmax(s)`` over the group."""
    log_p = torch.log_softmax(_masked(g.s, g.valid), 1)
    return -torch.where(g.valid, _soft_labels(g, temperature) * log_p, 0).sum(1)


def nca_loss(g: PaddedGroups, temperature: float = 1.0) -> torch.Tensor:
    """NCA: ``-sum_i q_i log sigmoid(s_i) - (1/K) sum_i log sigmoid(-s_i)``, q as in InfoNCA."""
    attract = -torch.where(g.valid, _soft_labels(g, temperature) * F.logsigmoid(g.s), 0).sum(1)
    return attract - _mean_over(F.logsigmoid(-g.s), g.valid)


def plackett_luce_loss(g: PaddedGroups, temperature: float = 1.0) -> torch.Tensor:
    """Plackett-Luce listwise loss on the ranking by score (ties: earlier response first).

    ``L = -sum_k [s_tau(k) - logsumexp_{j >= k} s_tau(j)]``; the last term is zero and padding sorts last.
    """
    key = _masked(g.scores, g.valid)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    s = _masked(g.s, g.valid).gather(1, order)
    tail_lse = torch.logcumsumexp(s.flip(1), 1).flip(1)
    valid = g.valid.gather(1, order)
    return -torch.where(valid, s - tail_lse, 0).sum(1)


LOSSES: dict[str, Callable[[PaddedGroups, float], torch.Tensor]] = {
    "all_pairs": all_pairs_loss,
    "multi_positive": multi_positive_loss,
    "sdpo": sdpo_loss,
    "infonca": infonca_loss,
    "nca": nca_loss,
    "plackett_luce": plackett_luce_loss,
}


def loss_function(loss_type: str) -> Callable[[PaddedGroups, float], torch.Tensor]:
    """The group loss named ``loss_type``; ValueError naming the choices for an unknown one."""
    if loss_type not in LOSSES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[loss_type]


def positive_nll(logps: torch.Tensor, lengths: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """NLL on positives, one value per group: ``-(1/|P|) sum_{i in P} logp_i / len_i``.

    Each positive's summed log-prob is divided by its own token count (a per-token mean per response),
    then averaged over the group's positives, so long and short positives weigh the same.
    """
    return _mean_over(-logps / lengths.clamp(min=1), positive)


@dataclass
class FlatGroupBatch:
    """Flat per-response inputs of ``group_dpo_loss`` (``[N]`` each), as the collator lays them out."""

    logps: torch.Tensor
    ref_logps: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    group_index: torch.Tensor
    slot: torch.Tensor


def group_dpo_loss(
    batch: FlatGroupBatch,
    *,
    beta: float = 0.1,
    loss_type: str = "all_pairs",
    nll_weight: float = 0.0,
    score_temperature: float = 1.0,
    label_smoothing: float = 0.0,
    preference_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GroupDPO objective for a batch: mean over groups of ``loss_type`` plus ``nll_weight`` x positive NLL.

    Returns the scalar loss and detached metrics named as TRL names them, plus group metrics:
    ``group/pair_accuracy`` (fraction of positive-negative pairs ordered right),
    ``group/top1_accuracy`` (the highest reward is a positive's, strictly above every negative's), ``nll``
    and the chosen-loss value.
    """
    objective = loss_function(loss_type)
    s = beta * (batch.logps - batch.ref_logps)
    g = PaddedGroups.from_flat(s, batch.labels, batch.scores, batch.group_index, batch.slot)
    if label_smoothing:
        if loss_type != "all_pairs":
            raise ValueError(f"label_smoothing applies to the pairwise loss all_pairs, not {loss_type!r}")
        preference = all_pairs_loss(g, score_temperature, label_smoothing).mean()
    else:
        preference = objective(g, score_temperature).mean()
    loss = preference_weight * preference
    logps = pad_groups(batch.logps, batch.group_index, batch.slot)
    lengths = pad_groups(batch.lengths.to(s.dtype), batch.group_index, batch.slot)
    nll = positive_nll(logps, lengths, g.positive).mean()
    if nll_weight:
        loss = loss + nll_weight * nll
    with torch.no_grad():
        metrics = group_metrics(g, logps)
    metrics.update({"loss/preference": preference.item(), "nll": nll.item()})
    return loss, metrics


def group_metrics(g: PaddedGroups, logps: torch.Tensor) -> dict[str, float]:
    """TRL-named reward and log-prob metrics for groups (per-group means, then the mean over groups)."""
    chosen, rejected = _mean_over(g.s, g.positive), _mean_over(g.s, g.negative)
    pairs = g.positive.unsqueeze(2) & g.negative.unsqueeze(1)
    ordered = (g.s.unsqueeze(2) > g.s.unsqueeze(1)).to(g.s.dtype)
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "logps/chosen": _mean_over(logps, g.positive).mean().item(),
        "logps/rejected": _mean_over(logps, g.negative).mean().item(),
        "group/pair_accuracy": _mean_over(ordered, pairs, (1, 2)).mean().item(),
        # Strictly above every negative: a tie (every reward equal at the first step) is not a hit.
        "group/top1_accuracy": (_masked(g.s, g.positive).amax(1) > _masked(g.s, g.negative).amax(1))
        .float()
        .mean()
        .item(),
        "group/size": g.valid.sum(1).float().mean().item(),
    }


def token_metrics(batch: dict[str, torch.Tensor], stat_sums: torch.Tensor | None) -> dict[str, float]:
    """TRL's token-level dashboard, from each row's summed ``grouppo.logps.TOKEN_STATS`` (``[N, 3]``):
    ``logits/chosen`` and ``logits/rejected``, the mean logit (over the vocabulary) of the positives' and
    the negatives' scored tokens (GDPO: the chosen and rejected belief-conditioned answers); ``entropy``,
    the mean entropy of the predicted distribution over both; ``mean_token_accuracy``, the fraction of
    the positives' tokens that are the argmax. Each is averaged over all such tokens of the batch."""
    if stat_sums is None:
        return {}
    if "labels" in batch:
        chosen, rejected = batch["labels"] == 1, batch["labels"] == 0
    elif "role" in batch:
        chosen, rejected = batch["role"] == 1, batch["role"] == 2
    else:
        return {}
    tokens = batch.get("score_mask", batch["response_mask"]).sum(-1).to(stat_sums.dtype)

    def mean(column: int, rows: torch.Tensor) -> float:
        count = tokens[rows].sum()
        return (stat_sums[rows, column].sum() / count).item() if count > 0 else 0.0

    return {
        "logits/chosen": mean(0, chosen),
        "logits/rejected": mean(0, rejected),
        "entropy": mean(1, chosen | rejected),
        "mean_token_accuracy": mean(2, chosen),
    }


# ---------------------------------------------------------------------------------------------- GDPO
CALIBRATION_FORMS = ("renormalized", "single_token")


def check_calibration(calibration: str) -> None:
    """ValueError unless ``calibration`` is one of ``CALIBRATION_FORMS``."""
    if calibration not in CALIBRATION_FORMS:
        raise ValueError(f"calibration={calibration!r}; expected one of {CALIBRATION_FORMS}")


@dataclass
class FlatBeliefBatch:
    """Flat per-row inputs of ``gdpo_loss`` (``[N]`` each), as ``grouppo.tokenize`` lays a record out:
    K belief rows (``role`` 0, ``target`` = the population's probability), a chosen (1) and a rejected
    (2) row, and in the single-token form an NLL row (3); ``nll_row`` marks the row of the belief NLL."""

    logps: torch.Tensor  # summed over each row's scored tokens
    ref_logps: torch.Tensor
    lengths: torch.Tensor  # scored tokens per row
    role: torch.Tensor
    target: torch.Tensor
    nll_row: torch.Tensor
    group_index: torch.Tensor
    slot: torch.Tensor


def belief_log_probs(logps: torch.Tensor, valid: torch.Tensor, renormalize: bool = True) -> torch.Tensor:
    """``[G, K]`` log-probabilities of the beliefs from the rows' summed log-probs: a log-softmax over
    the K beliefs (renormalized), or the log-probs as they are (single token over the whole vocabulary,
    whose mass outside the K belief tokens is lost). Padding gets the most negative finite value."""
    return torch.log_softmax(_masked(logps, valid), 1) if renormalize else _masked(logps, valid)


def calibration_kl(target: torch.Tensor, log_q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``KL(p* || q)`` per group, ``sum_k p*_k (log p*_k - log q_k)`` with ``0 log 0 = 0``: ``[G]``."""
    terms = torch.xlogy(target, target) - target * log_q
    return torch.where(valid & (target > 0), terms, 0).sum(1)


def _group_means(values: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """``[groups]``: the mean of ``values`` over the entries of each group (``group``: an index per entry)."""
    total = values.new_zeros(groups).index_add(0, group, values)
    count = values.new_zeros(groups).index_add(0, group, torch.ones_like(values))
    return total / count.clamp(min=1)


def gdpo_loss(
    batch: FlatBeliefBatch,
    *,
    beta: float = 0.1,
    calibration: str = "renormalized",
    calibration_weight: float = 1.0,
    preference_weight: float = 1.0,
    belief_nll_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GDPO objective, each term a mean over groups (a group: one prompt and population with all its
    belief-conditioned pairs when records are packed, else one pair):

    * calibration ``KL(p* || q_theta)`` over the K beliefs (``calibration`` "renormalized" or "single_token");
    * belief-conditioned DPO on the answer tokens, ``-log sigmoid(beta [(w - ref_w) - (l - ref_l)])``, a mean
      over the group's pairs;
    * belief NLL, minus the mean per-token log-prob of the chosen belief's prefix, a mean over the group's
      records.

    Every group weighs the same whatever it holds, so the loss of a batch is the mean of its groups' and
    does not depend on how groups are split across micro-batches or processes (with as many groups in
    each).
    """
    check_calibration(calibration)
    b = batch
    belief = b.role == 0
    valid = pad_groups(belief, b.group_index, b.slot, False)
    logps = pad_groups(torch.where(belief, b.logps, 0), b.group_index, b.slot)
    target = pad_groups(torch.where(belief, b.target.to(b.logps.dtype), 0), b.group_index, b.slot)
    log_q = belief_log_probs(logps, valid, calibration == "renormalized")
    cal = calibration_kl(target, log_q, valid).mean()
    chosen, rejected = b.role == 1, b.role == 2
    s = beta * (b.logps - b.ref_logps)
    s_w, s_l = s[chosen], s[rejected]
    groups = valid.shape[0]
    pref = _group_means(-F.logsigmoid(s_w - s_l), b.group_index[chosen], groups).mean()
    nll_rows = b.nll_row.bool()
    per_token = -b.logps[nll_rows] / b.lengths[nll_rows].clamp(min=1)
    nll = _group_means(per_token, b.group_index[nll_rows], groups).mean()
    loss = calibration_weight * cal + preference_weight * pref + belief_nll_weight * nll
    with torch.no_grad():
        q = torch.softmax(_masked(logps, valid), 1)  # renormalized beliefs, whatever the training form
        m = 0.5 * (q + target)
        js = 0.5 * (calibration_kl(target, torch.log(m), valid) + calibration_kl(q, torch.log(m), valid))
        top = _masked(target, valid).argmax(1, keepdim=True)
        metrics = {
            "loss/calibration": cal.item(),
            "loss/preference": pref.item(),
            "loss/belief_nll": nll.item(),
            "calibration/js_distance": js.clamp(min=0).sqrt().mean().item(),
            "calibration/majority_bias": (q.gather(1, top) / target.gather(1, top)).mean().item(),
        }
        # The TRL-named reward metrics over the belief-conditioned pairs: averaged within each group, then
        # over groups, as every per-group quantity is.
        pair_group = b.group_index[chosen]

        def over_groups(values: torch.Tensor) -> float:
            return _group_means(values.to(s.dtype), pair_group, groups).mean().item()

        metrics.update(
            {
                "rewards/chosen": over_groups(s_w),
                "rewards/rejected": over_groups(s_l),
                "rewards/accuracies": over_groups(s_w > s_l),
                "rewards/margins": over_groups(s_w - s_l),
                "logps/chosen": over_groups(b.logps[chosen]),
                "logps/rejected": over_groups(b.logps[rejected]),
            }
        )
    return loss, metrics
