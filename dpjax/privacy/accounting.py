"""Privacy accounting: dp_accounting events and epsilon (calibration of sigma:
``calibration.py``).

dp_accounting does the mathematics; this module builds the events that describe what
dpjax actually does, and nothing else in dpjax computes an epsilon.

Guarantees:
* ``dpsgd_event`` describes T steps of the Poisson-subsampled Gaussian mechanism with
  sampling rate q and noise multiplier sigma (noise std sigma*C on a sum of per-example
  gradients each clipped to norm C), which is exactly what ``dp_step`` runs: this needs
  the per-example loss draws to be secret, as they are in a private run
  (``noise_secret``: keyed by dataset index, public draws would shift with a removal,
  or a replacement that sorts elsewhere).
* Every other release (a noised embedding, a private statistic) is an extra event that
  is composed with the DP-SGD event in ``epsilon(events, ...)``; nothing private is free.
* An event with a parameter that is not a number (a NaN noise multiplier or sampling
  rate, a negative or fractional count) raises ``PrivacyError``: dp_accounting would
  account for some of them as free (epsilon 0). (``dpsgd_event`` with 0 steps, or an
  infinite sigma, is a NoOp whatever its other parameters: nothing is released.)
* PLD epsilons are pessimistic (upper bounds) at every discretization. Below an
  effective Gaussian sigma of 0.1 (sigma / 2 under replace-one) the PLD grid is
  coarsened (``pld_discretization``) so that its cost stays bounded; the bound is then
  looser, still above the true epsilon. (Only Gaussian events coarsen the grid: a
  Laplace event of small scale, which dpjax never builds, keeps the fine grid and its
  cost.)
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import Literal

import dp_accounting
from dp_accounting import pld, rdp

Accountant = Literal["rdp", "pld"]
Relation = Literal["add_or_remove_one", "replace_one", "replace_special"]

_RELATIONS = {
    "add_or_remove_one": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
    "replace_special": dp_accounting.NeighboringRelation.REPLACE_SPECIAL,
}
ACCOUNTANTS = ("rdp", "pld")


class PrivacyError(ValueError):
    """The privacy configuration is impossible or would exceed its budget."""


class UnsupportedByAccountantError(PrivacyError):
    """This accountant cannot account for the mechanism under this relation (another may)."""


# dp_accounting's PLD grid (value_discretization_interval), used at sigma >= 0.1.
PLD_INTERVAL = 1e-4
_PLD_FINE_SIGMA = 0.1


def neighbouring_relation(name: str) -> dp_accounting.NeighboringRelation:
    """The dp_accounting relation for a name in ``_RELATIONS``."""
    if name not in _RELATIONS:
        raise PrivacyError(
            f"Unknown neighbouring relation '{name}'; use one of {list(_RELATIONS)}."
        )
    return _RELATIONS[name]


def make_accountant(
    kind: str, relation: str = "add_or_remove_one", pld_interval: float = PLD_INTERVAL
) -> dp_accounting.PrivacyAccountant:
    """A fresh accountant: RDP (dp_accounting's default orders) or PLD (discretization
    ``pld_interval``)."""
    rel = neighbouring_relation(relation)
    if kind == "rdp":
        return rdp.RdpAccountant(neighboring_relation=rel)
    if kind == "pld":
        return pld.PLDAccountant(
            neighboring_relation=rel, value_discretization_interval=pld_interval
        )
    raise PrivacyError(f"Unknown accountant '{kind}'; use one of {list(ACCOUNTANTS)}.")


def dpsgd_event(noise_multiplier: float, sampling_rate: float, steps: int) -> dp_accounting.DpEvent:
    """T self-composed Poisson-subsampled Gaussian steps (Abadi et al. 2016, Alg. 1).

    ``steps == 0`` is the empty mechanism; ``noise_multiplier == inf`` is a step that
    releases nothing about the data.
    """
    if not float(steps).is_integer() or steps < 0:
        raise PrivacyError(f"steps must be a whole number >= 0, got {steps}.")
    if math.isnan(noise_multiplier):
        raise PrivacyError(f"The noise multiplier is {noise_multiplier}: not a number.")
    steps = int(steps)
    if steps == 0 or noise_multiplier == math.inf:  # -inf is <= 0: non-private below.
        return dp_accounting.NoOpDpEvent()
    if not 0.0 < sampling_rate <= 1.0:
        raise PrivacyError(f"sampling rate q must be in (0, 1], got {sampling_rate}.")
    if noise_multiplier <= 0.0:
        return dp_accounting.NonPrivateDpEvent()
    step = dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    return dp_accounting.SelfComposedDpEvent(step, steps)


# The event types dpjax builds or accepts in a recorded release; ``check_event`` refuses
# the others (dp_accounting's zCDP or sampling-without-replacement events took a NaN
# parameter as free).
_KNOWN_EVENTS = (
    dp_accounting.GaussianDpEvent,
    dp_accounting.LaplaceDpEvent,
    dp_accounting.PoissonSampledDpEvent,
    dp_accounting.SelfComposedDpEvent,
    dp_accounting.ComposedDpEvent,
    dp_accounting.NoOpDpEvent,
    dp_accounting.NonPrivateDpEvent,
)


def check_event(event: dp_accounting.DpEvent) -> None:
    """Raises ``PrivacyError`` if a parameter of ``event`` (or of an event inside it) is not
    a valid number: dp_accounting accounts for a NaN noise multiplier as a mechanism that
    costs nothing, and would report epsilon 0 for it. Event types that dpjax does not
    build (``_KNOWN_EVENTS``) are refused rather than checked."""

    def bad(what: str) -> PrivacyError:
        return PrivacyError(f"{what} in the mechanism {event}; refusing to account for it.")

    if not isinstance(event, _KNOWN_EVENTS):
        raise bad(f"An event of type {type(event).__name__} (not one dpjax builds)")
    if isinstance(event, (dp_accounting.GaussianDpEvent, dp_accounting.LaplaceDpEvent)):
        p = event.noise_multiplier  # NumPy scalars are numbers.Real too.
        if not isinstance(p, numbers.Real) or math.isnan(p) or p < 0:
            raise bad(f"A noise multiplier of {p!r}")
    elif isinstance(event, dp_accounting.PoissonSampledDpEvent):
        q = event.sampling_probability
        if not isinstance(q, numbers.Real) or not 0.0 <= q <= 1.0:
            raise bad(f"A sampling probability of {q!r}")
        check_event(event.event)
    elif isinstance(event, dp_accounting.SelfComposedDpEvent):
        try:
            count = operator.index(event.count)  # Any integer type; not 2.5, not NaN.
        except TypeError:
            count = -1
        if count < 0:
            raise bad(f"A composition count of {event.count!r}")
        check_event(event.event)
    elif isinstance(event, dp_accounting.ComposedDpEvent):
        for e in event.events:
            check_event(e)


def _without_infinite_noise(event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
    """``event`` with each Gaussian or Laplace mechanism of infinite noise (it releases
    nothing) as a NoOp: dp_accounting's PLD fails on one (NaN arithmetic)."""
    noop = dp_accounting.NoOpDpEvent
    if isinstance(event, (dp_accounting.GaussianDpEvent, dp_accounting.LaplaceDpEvent)):
        return noop() if event.noise_multiplier == math.inf else event
    if isinstance(event, dp_accounting.PoissonSampledDpEvent):
        inner = _without_infinite_noise(event.event)  # Sampling nothing is nothing.
        return inner if isinstance(inner, noop) else dp_accounting.PoissonSampledDpEvent(
            event.sampling_probability, inner)
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        inner = _without_infinite_noise(event.event)
        return inner if isinstance(inner, noop) else dp_accounting.SelfComposedDpEvent(
            inner, int(event.count))  # (int: a NumPy count failed under PLD.)
    if isinstance(event, dp_accounting.ComposedDpEvent):
        parts = [_without_infinite_noise(e) for e in event.events]
        parts = [e for e in parts if not isinstance(e, noop)]
        return dp_accounting.ComposedDpEvent(parts) if parts else noop()
    return event


def _contains_sampling(event: dp_accounting.DpEvent) -> bool:
    if isinstance(event, dp_accounting.PoissonSampledDpEvent):
        return True
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        return _contains_sampling(event.event)
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return any(_contains_sampling(e) for e in event.events)
    return False


def _effective_noise_multiplier(event: dp_accounting.DpEvent) -> float:
    """The noise multiplier of one Gaussian whose privacy-loss range is about that of
    ``event``'s Gaussian part, for choosing the PLD grid only (inf if it has none).

    Unsampled Gaussians compose exactly into one Gaussian: n releases at sigma are one at
    sigma / sqrt(n), and releases at sigma_i one at (sum_i sigma_i^-2)^-1/2 (their loss
    means add, Dong et al. 2019, Cor. 3.3). A Poisson-sampled part counts at its inner
    sigma, its composition uncounted: sampling keeps each step's loss below the unsampled
    one's, and 4,400 sampled steps at sigma 1 cost 1.3 s on the fine grid.
    """
    if isinstance(event, dp_accounting.GaussianDpEvent):
        return event.noise_multiplier if event.noise_multiplier > 0 else math.inf
    if isinstance(event, dp_accounting.PoissonSampledDpEvent):
        return _effective_noise_multiplier(event.event)
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        sigma = _effective_noise_multiplier(event.event)
        if _contains_sampling(event.event) or event.count < 1:
            return sigma
        return sigma / math.sqrt(event.count)
    if isinstance(event, dp_accounting.ComposedDpEvent):
        parts = [(_effective_noise_multiplier(e), _contains_sampling(e)) for e in event.events]
        sampled = [sigma for sigma, is_sampled in parts if is_sampled]
        unsampled = [sigma for sigma, is_sampled in parts if not is_sampled]
        if min(unsampled, default=math.inf) < 1e-100:  # (sigma^-2 would overflow; the
            return min(unsampled)                      # grid is at its cap below 1e-10.)
        precision = math.fsum(s ** -2.0 for s in unsampled)
        return min(sampled + [precision ** -0.5 if precision > 0 else math.inf])
    return math.inf


def pld_discretization(
    event: dp_accounting.DpEvent, relation: str = "add_or_remove_one"
) -> float:
    """The PLD grid for ``event`` under ``relation``: ``PLD_INTERVAL``, coarsened below an
    effective sigma of 0.1 (``_effective_noise_multiplier``, halved under replace-one,
    whose sensitivity is 2C).

    A Gaussian's privacy loss spans a range that grows as 1/sigma, and PLD's memory and
    time with it (10 steps at q=0.1: 590 MB and 12.4 s at sigma 0.1, 1,418 MB and 30.2 s at
    0.06, terabytes at 1e-3; ``benchmarks/cpu_pld_grid_cost.json``). Below sigma 0.1 the
    interval grows as 1/sigma^2 in powers of 2.
    The epsilon stays an upper bound at any interval: dp_accounting's pessimistic
    connect-the-dots discretization keeps the exact privacy curve at the grid's points
    and interpolates between them, which bounds a convex curve from above at any grid,
    and composition and tail truncation keep that. A coarser grid gives a looser bound
    (the nested grids' epsilons grow with the interval, except in the last digits where
    exp(-loss) underflows, losses above ~745). Such a sigma spends an epsilon in the
    hundreds; the coarser grid moves it by a few percent.
    """
    sigma = _effective_noise_multiplier(event)
    if relation == "replace_one":
        sigma /= 2.0
    if sigma >= _PLD_FINE_SIGMA:
        return PLD_INTERVAL
    # Capped: below sigma ~1e-150 the exponent would overflow (epsilon is astronomic).
    return PLD_INTERVAL * 2.0 ** min(60, math.ceil(2.0 * math.log2(_PLD_FINE_SIGMA / sigma)))


def for_accountant(
    event: dp_accounting.DpEvent, kind: str, relation: str
) -> dp_accounting.DpEvent:
    """``event`` rewritten so that ``kind`` accounts for it under dpjax's one convention.

    dpjax's convention (dp_accounting's PLD accountant and jax_privacy's): the noise
    multiplier of a Gaussian is its std divided by the per-example norm bound C, which
    is the sensitivity under add-or-remove-one; under replace-one the sensitivity is 2C.
    dp_accounting's PLD accountant applies this itself. Its RDP accountant ignores the
    relation for an unsampled ``GaussianDpEvent`` or ``LaplaceDpEvent`` (it would account
    for sensitivity C under replace-one and understate epsilon), so for RDP under
    replace-one each such event's noise multiplier (Laplace: scale) is halved here.
    Poisson sampling at rate 1 takes every example, so it is rewritten as its inner
    event (exactly the same mechanism); other
    sampled events are left alone: the RDP accountant rejects Poisson sampling under
    replace-one on its own.
    """
    if kind != "rdp" or relation != "replace_one":
        return event
    if isinstance(event, dp_accounting.GaussianDpEvent):
        return dp_accounting.GaussianDpEvent(event.noise_multiplier / 2.0)
    if isinstance(event, dp_accounting.LaplaceDpEvent):
        # The same for a Laplace event's scale (in units of the add-or-remove sensitivity).
        return dp_accounting.LaplaceDpEvent(event.noise_multiplier / 2.0)
    if (isinstance(event, dp_accounting.PoissonSampledDpEvent)
            and event.sampling_probability == 1.0):
        return for_accountant(event.event, kind, relation)
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return dp_accounting.ComposedDpEvent(
            [for_accountant(e, kind, relation) for e in event.events]
        )
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        return dp_accounting.SelfComposedDpEvent(
            for_accountant(event.event, kind, relation), event.count
        )
    return event


def epsilon(
    events: Sequence[dp_accounting.DpEvent],
    delta: float,
    kind: str = "rdp",
    relation: str = "add_or_remove_one",
) -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (inf if any is non-private).

    A Gaussian or Laplace mechanism of infinite noise counts as releasing nothing.

    Raises:
      PrivacyError: delta is not in (0, 1); an event's parameter is not a valid number,
        or its type is not one dpjax builds (``check_event``); dp_accounting fails on
        the parameters (e.g. sigma 1e-8 under PLD); ``UnsupportedByAccountantError`` if
        this accountant cannot account for the events under ``relation``.
    """
    if not (isinstance(delta, numbers.Real) and 0.0 < delta < 1.0):
        raise PrivacyError(f"delta must be in (0, 1), got {delta!r}.")
    for e in events:
        check_event(e)
    events = [_without_infinite_noise(e) for e in events]
    events = [e for e in events if not isinstance(e, dp_accounting.NoOpDpEvent)]
    if not events:
        return 0.0
    if any(isinstance(e, dp_accounting.NonPrivateDpEvent) for e in events):
        return math.inf
    event = events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(list(events))
    event = for_accountant(event, kind, relation)
    acc = make_accountant(kind, relation, pld_discretization(event, relation))
    try:
        acc.compose(event)
        return float(acc.get_epsilon(delta))
    except dp_accounting.UnsupportedEventError as e:
        hint = " Try accountant='pld'." if kind != "pld" else ""
        raise UnsupportedByAccountantError(
            f"The {kind.upper()} accountant cannot account for {event} under the "
            f"'{relation}' relation ({e}).{hint}"
        ) from e
    except (ValueError, ArithmeticError, MemoryError) as e:
        # Parameters at the edge of the accountant's arithmetic (sigma 1e-8 or 1e300 under
        # PLD, a Laplace scale of 0 under RDP, a PLD too large for memory): one readable
        # error, not a traceback at a run's final report (accounting fuzz, 2026-12-07).
        raise PrivacyError(
            f"The {kind.upper()} accountant failed on {event} at delta={delta} "
            f"({type(e).__name__}: {e})."
        ) from e
