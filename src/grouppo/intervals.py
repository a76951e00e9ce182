"""Uncertainty of evaluation results: percentile bootstrap intervals over prompts, alone and paired.

An accuracy over n prompts is an estimate; on 32 prompts one prompt moves it by 0.031 and the 95%
interval of a 50% accuracy is about ±0.17. Every evaluation grouppo reports carries such an interval,
and a comparison of two models on the same prompts carries the interval of their paired difference
(resampling prompts jointly, so that what the two models share, the prompts' difficulty, cancels).

The unit resampled is the prompt: a prompt-level metric is a mean of per-prompt values, an
instruction-level metric a ratio of per-prompt sums (instructions passed / instructions scored), and
the instructions of one prompt are not independent. Percentile intervals of ``resamples`` draws from a
seeded generator: the same inputs always give the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def _draws(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(stats: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return [float(low), float(high)]


def ratio_interval(
    numerators: Sequence[float],
    denominators: Sequence[float] | None = None,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> list[float]:
    """The ``level`` percentile-bootstrap interval of ``sum(numerators) / sum(denominators)`` over units
    resampled with replacement (without ``denominators``: of the mean of ``numerators``). ``[nan, nan]``
    for no unit; a resample whose denominators sum to 0 counts as 0."""
    num = np.asarray(numerators, dtype=float)
    den = np.ones_like(num) if denominators is None else np.asarray(denominators, dtype=float)
    if num.shape != den.shape:
        raise ValueError(f"{num.size} numerators for {den.size} denominators")
    if num.size == 0:
        return [float("nan"), float("nan")]
    idx = _draws(num.size, resamples, seed)
    return _interval(ratio_of_sums(num[idx], den[idx]), level)


def paired_difference(
    a: tuple[Sequence[float], Sequence[float]],
    b: tuple[Sequence[float], Sequence[float]],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, float | list[float] | bool]:
    """``B - A`` for a ratio metric of two models on the same units, each given as (numerators,
    denominators) per unit, with its paired bootstrap interval (the same resampled units for both) and
    whether that interval holds 0 (the difference is not distinguishable from none at this level)."""
    (a_num, a_den), (b_num, b_den) = (tuple(np.asarray(x, dtype=float) for x in pair) for pair in (a, b))
    if not a_num.shape == a_den.shape == b_num.shape == b_den.shape:
        raise ValueError("the two models must be scored on the same units")
    if a_num.size == 0:
        raise ValueError("no unit to compare")
    idx = _draws(a_num.size, resamples, seed)
    stats = ratio_of_sums(b_num[idx], b_den[idx]) - ratio_of_sums(a_num[idx], a_den[idx])
    low, high = _interval(stats, level)
    difference = float(ratio_of_sums(b_num, b_den) - ratio_of_sums(a_num, a_den))
    return {"difference": difference, "interval": [low, high], "includes_zero": bool(low <= 0 <= high)}


Units = tuple[Sequence[float], Sequence[float]]


def seeds_and_prompts_difference(
    b: Sequence[Units],
    a: Sequence[Units] | None = None,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
    shared_prompts: bool = True,
) -> dict[str, float | list[float] | bool]:
    """``B - A`` for a ratio metric averaged over training seeds, with an interval that counts both the
    prompts and the seeds as sampled (without ``a``: B's mean and its interval).

    ``b[s]`` (and ``a[s]``) are (numerators, denominators) per prompt of the run with seed ``s``; every run
    is scored on the same prompts, and ``a[s]`` and ``b[s]`` share seed ``s`` (its sampled data and
    order). Each resample draws the seeds with replacement and, independently, the prompts with
    replacement (the same prompts for every seed and both sides), and takes the mean over the drawn
    seeds of the paired difference on the drawn prompts: a two-stage bootstrap, so the interval widens
    with the spread between seeds as well as with the prompts'. With two seeds the seed stage is coarse
    (half of the resamples draw one seed twice, which also makes the interval wider than the
    prompts' and seeds' spread alone would); ``per_seed`` gives each seed's own difference.

    ``shared_prompts=False`` is for units that differ from seed to seed (say, the groups a seed's own
    sampled pool leaves untied): ``a[s]`` and ``b[s]`` still pair unit by unit, but each seed's units are
    resampled on their own, and seeds may hold different numbers of them.
    """
    runs_b = [tuple(np.asarray(x, dtype=float) for x in pair) for pair in b]
    runs_a = [tuple(np.asarray(x, dtype=float) for x in pair) for pair in a] if a is not None else None
    if not runs_b or (runs_a is not None and len(runs_a) != len(runs_b)):
        raise ValueError("B (and A) need one run per seed, the same seeds on both sides")
    if not shared_prompts:
        return _own_prompts_difference(runs_b, runs_a, resamples=resamples, level=level, seed=seed)
    n = runs_b[0][0].size
    if n == 0 or any(x.size != n for run in runs_b + (runs_a or []) for x in run):
        raise ValueError("every run must be scored on the same, non-empty set of prompts")

    def per_run(runs: list, idx: np.ndarray | slice) -> np.ndarray:
        # (seeds, resamples) or (seeds,)
        return np.stack([ratio_of_sums(num[idx], den[idx]) for num, den in runs])

    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, n, size=(resamples, n))
    seeds = rng.integers(0, len(runs_b), size=(resamples, len(runs_b)))
    values = per_run(runs_b, prompts) - (per_run(runs_a, prompts) if runs_a is not None else 0.0)
    stats = np.take_along_axis(values.T, seeds, axis=1).mean(1)
    low, high = _interval(stats, level)
    exact = per_run(runs_b, slice(None)) - (per_run(runs_a, slice(None)) if runs_a is not None else 0.0)
    return {"difference": float(exact.mean()), "interval": [low, high],
            "includes_zero": bool(low <= 0 <= high), "per_seed": [float(v) for v in exact]}  # fmt: skip


def ratio_of_sums(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``sum(num) / sum(den)`` over the last axis (an instruction-level accuracy from per-prompt counts,
    for one sample or a batch of resamples); 0 where the denominators sum to 0."""
    totals = den.sum(-1)
    return np.divide(num.sum(-1), totals, out=np.zeros(np.shape(totals)), where=totals > 0)


def _own_prompts_difference(
    runs_b: list, runs_a: list | None, *, resamples: int, level: float, seed: int
) -> dict[str, float | list[float] | bool]:
    """``seeds_and_prompts_difference`` when every seed has its own units: the prompt stage resamples
    each seed's units apart (``b[s]`` and ``a[s]`` jointly), the seed stage is the same."""
    rng = np.random.default_rng(seed)
    values, exact = [], []
    for s, (b_num, b_den) in enumerate(runs_b):
        a_num, a_den = runs_a[s] if runs_a is not None else (None, None)
        n = b_num.size
        if n == 0 or b_den.size != n or (a_num is not None and not a_num.size == a_den.size == n):
            raise ValueError(f"seed {s}: B (and A) need the same, non-empty set of units")
        idx = rng.integers(0, n, size=(resamples, n))
        a_draws, a_exact = (0.0, 0.0)
        if a_num is not None:
            a_draws, a_exact = ratio_of_sums(a_num[idx], a_den[idx]), ratio_of_sums(a_num, a_den)
        values.append(ratio_of_sums(b_num[idx], b_den[idx]) - a_draws)
        exact.append(float(ratio_of_sums(b_num, b_den) - a_exact))
    seeds = rng.integers(0, len(runs_b), size=(resamples, len(runs_b)))
    stats = np.take_along_axis(np.stack(values).T, seeds, axis=1).mean(1)
    low, high = _interval(stats, level)
    return {"difference": float(np.mean(exact)), "interval": [low, high],
            "includes_zero": bool(low <= 0 <= high), "per_seed": exact}  # fmt: skip
