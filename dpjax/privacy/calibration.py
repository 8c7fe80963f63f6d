"""Calibration of sigma: the smallest noise multiplier whose epsilon meets a target.

Guarantees:
* ``calibrate_noise_multiplier`` and ``calibrate`` return a sigma whose epsilon (as
  ``accounting.epsilon`` computes it, under the chosen accountant and neighbouring
  relation) is at most the target; they raise ``accounting.PrivacyError`` otherwise.
* A target is refused only where it is unreachable under the accountant asked for (PLD
  does not inherit RDP's refusals).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import dp_accounting

from dpjax.privacy import accounting


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    kind: str = "rdp",
    relation: str = "add_or_remove_one",
    extra_events: Sequence[dp_accounting.DpEvent] = (),
    tol: float = 1e-4,
) -> float:
    """The smallest sigma (up to ``tol``) whose total epsilon is at most the target; where
    a loose target is met below the search's lower ends, a sigma that meets it, not the
    smallest (``calibrate``). Never one whose epsilon exceeds the target.

    The mechanism is T DP-SGD steps (``dpsgd_event``) composed with ``extra_events``
    (releases that happened before, e.g. a DP teacher's training); see ``calibrate``.

    Raises:
      PrivacyError: if the target is unreachable or the check fails.
    """

    def make_event(sigma: float) -> dp_accounting.DpEvent:
        return dp_accounting.ComposedDpEvent(
            [accounting.dpsgd_event(sigma, sampling_rate, steps), *extra_events]
        )

    return calibrate(
        make_event,
        target_epsilon,
        delta,
        kind,
        relation,
        tol,
        what=f"q={sampling_rate}, T={steps}",
    )


_PLD_BRACKET_HALVINGS = 4
_NoBracket = dp_accounting.mechanism_calibration.NoBracketIntervalFoundError
# The lower ends the RDP search tries, in turn, until one misses the target.
_LOWER_ENDS = (0.1, 0.01, 1e-3, 1e-4)


def _bisect_on_own_grids(
    make_event: Callable[[float], dp_accounting.DpEvent],
    lo: float,
    hi: float,
    target_epsilon: float,
    delta: float,
    relation: str,
    tol: float,
    what: str,
) -> float:
    """PLD's smallest sigma in [lo, hi] up to ``tol``, each epsilon on its own grid.

    Bisection keeps ``hi`` a sigma whose epsilon (``epsilon``, on its own grid) meets the
    target, so the result is safe even where epsilon is not monotone across the grids'
    boundaries. About log2((hi - lo) / tol) PLD evaluations; a rare fallback.

    Raises:
      PrivacyError: if ``hi`` itself misses the target.
    """

    def eps(sigma: float) -> float:
        return accounting.epsilon([make_event(sigma)], delta, "pld", relation)

    got = eps(hi)
    if not got <= target_epsilon:
        raise accounting.PrivacyError(
            f"Calibration{' with ' + what if what else ''}: sigma={hi} gives PLD epsilon "
            f"{got} > target {target_epsilon}."
        )
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def calibrate(
    make_event: Callable[[float], dp_accounting.DpEvent],
    target_epsilon: float,
    delta: float,
    kind: str = "rdp",
    relation: str = "add_or_remove_one",
    tol: float = 1e-4,
    what: str = "",
) -> float:
    """The smallest sigma (up to ``tol``) with accounting.epsilon(make_event(sigma)) <= target,
    or, for a loose target met at the search's lowest end (or, under PLD, at RDP's sigma
    below 0.1), that sigma: one that meets the target, not the smallest.

    ``make_event`` must describe a mechanism whose epsilon decreases as sigma grows (any
    composition of Gaussian mechanisms whose noise multipliers scale with sigma). Uses
    dp_accounting's Brent search (``calibrate_dp_mechanism``), then checks the result:
    the returned sigma is never one whose epsilon exceeds the target. PLD brackets its
    search below RDP's sigma; where RDP refuses (a prior release that RDP composes more
    loosely), PLD searches on its own, and where Brent finds no sign change on the
    bracket's coarser grid, it bisects on each sigma's own grid.

    Raises:
      PrivacyError: if the target is unreachable or the check fails.
    """
    if not (0 < target_epsilon < math.inf and 0 < delta < 1):
        raise accounting.PrivacyError(
            f"Need epsilon > 0 and 0 < delta < 1, got ({target_epsilon}, {delta}).")

    def eps(sigma: float) -> float:
        return accounting.epsilon([make_event(sigma)], delta, kind, relation)

    def unreachable(why: str) -> str:
        return (f"Cannot reach epsilon={target_epsilon} at delta={delta}"
                f"{' with ' + what if what else ''}{why}")

    hi = None
    if kind == "pld" and relation != "replace_one":
        # PLD's epsilon is never above RDP's, so its sigma is never above RDP's. A tiny
        # sigma makes PLD discretize an enormous loss range (tens of GB), so bracket
        # the PLD search below the cheap RDP answer instead of searching from ~0.
        try:
            hi = calibrate(make_event, target_epsilon, delta, "rdp", relation, tol, what)
        except accounting.UnsupportedByAccountantError:
            hi = None  # An event RDP cannot account for (a sampled Laplace prior): PLD alone.
        except accounting.PrivacyError as e:
            # RDP composes a prior release more loosely than PLD: a target between the
            # prior's PLD and RDP epsilons is reachable by PLD only (accounting fuzz,
            # 2026-12-07). Refuse only what the prior alone spends under PLD.
            floor = eps(math.inf)
            if not floor < target_epsilon:
                raise accounting.PrivacyError(unreachable(
                    f": the releases composed before this run spend {floor} (pld) alone."
                )) from e
            hi = None
    if hi is not None:
        if hi < 0.1:
            # A loose target: searching below RDP's sigma would discretize PLD's enormous
            # loss range at every try (seconds each on the coarsened grid, minutes and
            # GBs before it). RDP's sigma is kept once PLD confirms it (one evaluation;
            # PLD's epsilon is at most RDP's in practice).
            got = eps(hi)
            if not got <= target_epsilon:
                raise accounting.PrivacyError(
                    f"Calibration: RDP's sigma={hi} gives PLD epsilon {got} > target "
                    f"{target_epsilon}."
                )
            return hi
        # Usually PLD's sigma is within a factor 2 of RDP's. With a large prior release
        # composed in, it can be far below (RDP composes the prior loosely): halve the
        # lower end until it is below the answer, a few times at most.
        lo = 0.5 * hi
        for _ in range(_PLD_BRACKET_HALVINGS):
            if eps(lo) > target_epsilon:
                break
            hi, lo = lo, 0.5 * lo  # lo already meets the target: the answer is below it.
        else:
            if eps(lo) <= target_epsilon:
                return lo  # Meets the target (not the smallest such sigma; never unsafe).
        bracket = dp_accounting.ExplicitBracketInterval(lo, hi)
        lows = (lo,)
    else:
        # dp_accounting searches upward from [lower, guess]: the answer must lie above the
        # lower end. A loose target (epsilon in the hundreds, few steps) is met below 0.1:
        # step the lower end down until it misses the target.
        # (PLD's cost grows as sigma shrinks: it tries 0.5 first, then 0.1, so that a
        # usual target is searched where PLD is cheap.)
        lows = _LOWER_ENDS if kind == "rdp" else (0.5, 0.1)
        for lo in lows:
            if eps(lo) > target_epsilon:
                break
        else:
            return lo  # Meets the target (not the smallest such sigma; never unsafe).
        bracket = dp_accounting.LowerEndpointAndGuess(lo, 1.0)
    # The search's PLD grid is that of its lowest sigma: the check below, at a sigma at
    # least as large, uses the same grid or a finer nested one, whose epsilon is no larger.
    interval = accounting.pld_discretization(
        accounting.for_accountant(make_event(min(lows)), kind, relation), relation)
    try:
        sigma = dp_accounting.calibrate_dp_mechanism(
            lambda: accounting.make_accountant(kind, relation, interval),
            lambda s: accounting.for_accountant(make_event(s), kind, relation),
            target_epsilon,
            delta,
            bracket_interval=bracket,
            tol=tol,
        )
    except _NoBracket as e:
        # Composed with earlier releases, epsilon tends to theirs as sigma grows.
        raise accounting.PrivacyError(unreachable(
            f": no noise multiplier up to 2^30 reaches it ({kind}); the releases composed "
            "before this run spend about that much or more."
        )) from e
    except (ValueError, RuntimeError) as e:
        if kind == "pld" and isinstance(bracket, dp_accounting.ExplicitBracketInterval):
            # Brent found no sign change on the search's grid (lo's, coarser below sigma
            # 0.1): the upper end met the target on its own finer grid only, within the
            # coarsening (a few 1e-5 relative). Search on each sigma's own grid instead.
            return _bisect_on_own_grids(
                make_event, lo, hi, target_epsilon, delta, relation, tol, what
            )
        raise accounting.PrivacyError(unreachable(f" ({e}).")) from e
    sigma = float(sigma)
    # The search met the target on its grid; ``epsilon`` may use a finer one for this
    # sigma, whose epsilon can differ in the last digits (``pld_discretization``): a
    # few steps of tol up settle that, and the result always meets the target there.
    for _ in range(4):
        got = eps(sigma)
        if got <= target_epsilon:
            return sigma
        sigma += tol
    raise accounting.PrivacyError(
        f"Calibration returned sigma={sigma} with epsilon {got} > target {target_epsilon}."
    )
