"""The statistics of the one-run privacy audit (Steinke, Nasr & Jagielski 2023).

Pure functions of counts: the p-value of v correct guesses out of r on m canaries under
(epsilon, delta)-DP, the largest epsilon it rejects, the grid of guess counts fixed
before a run, and the bound from canary scores. ``audit.py`` runs the canaries through
the real DP step and uses these; see its docstring for the guarantees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

#: Default k grid, as fractions of the expected number of included, ever-sampled canaries.
GUESS_FRACTIONS = (0.0625, 0.125, 0.25, 0.5, 0.75)


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of ``v`` correct out of ``r`` guesses on ``m`` canaries under (eps, delta)-DP.

    Upper bound on P[correct >= v] for any (epsilon, delta)-DP mechanism (add/remove
    one) and any guessing rule with exactly r guesses: the binomial tail
    P[Binomial(r, p) >= v], p = e^eps / (1 + e^eps), plus 2 m delta * alpha where
    alpha = max_{1 <= i <= v} P[v - i <= Binomial(r, p) < v] / i.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"Need 0 <= v <= r <= m, got v={v}, r={r}, m={m}.")
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, p))  # P[B >= v]
    if delta == 0:
        return min(1.0, tail)
    i = np.arange(1, v + 1)
    window = stats.binom.sf(v - i - 1, r, p) - tail  # P[v - i <= B < v]
    alpha = max(0.0, float(np.max(window / i)))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def one_run_epsilon_lower_bound(
    m: int, r: int, v: int, delta: float, significance: float, tol: float = 1e-4
) -> float:
    """The largest epsilon (up to ``tol``) that ``v`` of ``r`` correct guesses rejects.

    An epsilon is rejected when its p-value is <= ``significance``. Bisection keeps
    p(lo) <= significance and returns lo. This is valid even where the p-value is not
    monotone in epsilon: an (eps, delta)-DP mechanism is (eps', delta)-DP for every
    eps' >= eps, so g(eps) = min over eps' >= eps of p(eps') is also a valid p-value,
    and it is monotone; hence lo > eps_true implies g(eps_true) <= p(lo) <= significance,
    an event of probability at most ``significance``. Returns 0 when not even
    epsilon = 0 is rejected.
    """
    if one_run_p_value(m, r, v, 0.0, delta) > significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) <= significance:
        lo, hi = hi, 2.0 * hi
        if hi > 1e3:  # Cannot happen for v <= r < inf; a guard against a broken p-value.
            return lo
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m, r, v, mid, delta) <= significance:
            lo = mid
        else:
            hi = mid
    return lo


def guess_grid(m: int, sampling_rate: float, steps: int, fractions: Sequence[float]) -> list[int]:
    """The k of the top-k guesses, fixed before the run from public quantities only.

    The expected number of included canaries sampled at least once is
    E = m/2 * (1 - (1 - q)^T); the grid is the given fractions of E (at least 1, at
    most m, no duplicates).
    """
    expected = 0.5 * m * (1.0 - (1.0 - sampling_rate) ** steps)
    ks = sorted({min(m, max(1, int(f * expected))) for f in fractions})
    return ks


def bound_from_scores(
    scores: np.ndarray, included: np.ndarray, ks: Sequence[int], delta: float, confidence: float
) -> tuple[float, list[dict[str, Any]]]:
    """The audit's bound from canary scores (higher = more likely included).

    For each k in ``ks`` the top-k canaries are guessed included; the bound at k uses
    significance (1 - confidence) / len(ks) (Bonferroni over the grid), and the result
    is the best k's bound.
    """
    m = len(scores)
    order = np.argsort(-np.asarray(scores), kind="stable")
    significance = (1.0 - confidence) / len(ks)
    rows = []
    for k in ks:
        correct = int(np.sum(included[order[:k]]))
        eps = one_run_epsilon_lower_bound(m, k, correct, delta, significance)
        rows.append({"k": int(k), "correct": correct, "epsilon_lower_bound": eps})
    return max(r["epsilon_lower_bound"] for r in rows), rows
