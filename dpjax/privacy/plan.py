"""DPPlan: the privacy parameters of a run, fixed before training starts.

The plan is the contract between the config, the DP step and the accountant: the step
uses exactly (q, sigma, C, N*q) from it, the accountant accounts exactly ``steps`` of it,
and the train loop refuses to run a step past ``steps``. It is written to the workdir as
``dp_plan.json`` and into every checkpoint.

The dataset size N is treated as public, as in DPDM, Opacus and jax_privacy: q and the
expected batch size N*q are derived from it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from dpjax import atomic_file
from dpjax.privacy import accounting, calibration

MECHANISMS = ("dpsgd", "release")


@dataclasses.dataclass(frozen=True)
class DPPlan:
    """Privacy parameters of one DP-SGD run.

    Attributes:
      num_examples: N, the (public) size of the private dataset.
      sampling_rate: q, the Poisson sampling probability of each example at each step.
      noise_multiplier: sigma; the noise std on the clipped-gradient SUM is sigma * C.
      clip_norm: C, the bound on each example's gradient norm (over all trained params).
      steps: T, the number of DP-SGD steps the budget allows. Training stops here.
      delta: the target delta.
      target_epsilon: the epsilon sigma was calibrated to, or None if sigma was given.
      accountant: 'rdp' or 'pld', the accountant used for calibration and the budget.
      neighbouring: the neighbouring relation of the guarantee.
      enabled: False for non-private (public) training; then epsilon is not finite.
      mechanism: 'dpsgd' (the run's private access is T DP-SGD steps) or 'release' (one
        Gaussian release of the whole dataset, DP-MEPF: q = 1, ``noise_multiplier`` is the
        release's, and the ``steps`` are post-processing that never read private data;
        the release is accounted for in the run's ``releases`` once it has happened).
    """

    num_examples: int
    sampling_rate: float
    noise_multiplier: float
    clip_norm: float
    steps: int
    delta: float
    target_epsilon: float | None = None
    accountant: str = "rdp"
    neighbouring: str = "add_or_remove_one"
    enabled: bool = True
    mechanism: str = "dpsgd"

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise accounting.PrivacyError(
                f"Unknown mechanism {self.mechanism!r}; use one of {MECHANISMS}."
            )
        if self.num_examples <= 0:
            raise accounting.PrivacyError("The private dataset is empty.")
        if not 0.0 < self.sampling_rate <= 1.0:
            raise accounting.PrivacyError(f"q must be in (0, 1], got {self.sampling_rate}.")
        if self.enabled and not self.clip_norm > 0:
            raise accounting.PrivacyError(f"clip norm C must be > 0, got {self.clip_norm}.")
        if self.enabled and not self.noise_multiplier >= 0:
            raise accounting.PrivacyError(f"sigma must be >= 0, got {self.noise_multiplier}.")
        if self.steps < 0:
            raise accounting.PrivacyError(f"steps must be >= 0, got {self.steps}.")
        if self.enabled and not 0.0 < self.delta < 1.0:  # Also NaN (a hand-edited plan).
            raise accounting.PrivacyError(f"delta must be in (0, 1), got {self.delta!r}.")

    @property
    def expected_batch_size(self) -> float:
        """N * q: the public denominator of the averaged noisy gradient (not the realized size)."""
        return self.num_examples * self.sampling_rate

    @property
    def noise_std(self) -> float:
        """Std of the Gaussian added to the clipped-gradient sum: sigma * C."""
        return self.noise_multiplier * self.clip_norm

    def dp_event(self, steps: int | None = None) -> Any:
        """The dp_accounting event of the first ``steps`` steps (default: all planned steps)."""
        steps = self.steps if steps is None else steps
        if not self.enabled:
            return accounting.dp_accounting.NonPrivateDpEvent()
        if self.mechanism == "release":
            # Post-processing steps; the release itself is in the run's ``releases``.
            return accounting.dp_accounting.NoOpDpEvent()
        return accounting.dpsgd_event(self.noise_multiplier, self.sampling_rate, steps)

    def epsilon(self, steps: int | None = None, kind: str | None = None) -> float:
        """Epsilon at ``delta`` of this plan's own first ``steps`` steps (default: all).

        Only the plan's mechanism: a run's total, with its prior releases, is
        ``privacy.report``'s.

        Raises:
          PrivacyError: for a one-release plan (DP-MEPF), whose steps are
            post-processing: its epsilon is that of its recorded release
            (``privacy.report.epsilon_spent``), and 0 here would read as free.
        """
        if not self.enabled:
            return math.inf
        if self.mechanism == "release":
            raise accounting.PrivacyError(
                "A one-release plan's epsilon is its release's: use "
                "privacy.report.epsilon_spent with the run's releases."
            )
        return accounting.epsilon(
            [self.dp_event(steps)],
            self.delta,
            kind or self.accountant,
            self.neighbouring,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["expected_batch_size"] = self.expected_batch_size
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DPPlan:
        # Plans written before ``mechanism`` existed were all DP-SGD plans (the default).
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def same_guarantee_as(self, other: DPPlan) -> bool:
        """True if the plans agree on every field but ``steps``: the same mechanism, and the
        same accounting of it (accountant, target epsilon); floats to 1e-9 relative. Used
        to validate a resume, an export and a composed source; never raises (a field that
        is None in one plan and a number in the other differs)."""
        a, b = dataclasses.asdict(self), dataclasses.asdict(other)

        def same(x: Any, y: Any) -> bool:
            if isinstance(x, float) and isinstance(y, (int, float)) and not isinstance(y, bool):
                return math.isclose(x, y, rel_tol=1e-9)
            return x == y

        return all(same(a[k], b[k]) for k in a if k != "steps")


def recorded_plan_matches(recorded: Any, plan: DPPlan) -> bool:
    """Whether ``recorded`` (the plan dict a checkpoint's metadata holds) is ``plan``: the
    same mechanism (``same_guarantee_as``) and the same planned steps. A missing or
    unreadable record is not."""
    if not recorded:
        return False
    try:
        stored = DPPlan.from_dict(dict(recorded))
    except (TypeError, ValueError, AttributeError):
        return False
    return stored.same_guarantee_as(plan) and stored.steps == plan.steps


def make_plan(
    *,
    num_examples: int,
    batch_size: int,
    delta: float,
    clip_norm: float,
    epochs: float = 0.0,
    steps: int = 0,
    epsilon: float | None = None,
    noise_multiplier: float | None = None,
    accountant: str = "rdp",
    neighbouring: str = "add_or_remove_one",
    enabled: bool = True,
    prior_events: Sequence[Any] = (),
    release_events: Callable[[float], Sequence[Any]] | None = None,
) -> DPPlan:
    """Builds a plan: q = B/N, T from ``steps`` or ``epochs`` (T = int(epochs / q)).

    Exactly one of ``epsilon`` (then sigma is calibrated, conservatively) and
    ``noise_multiplier`` must be given when ``enabled``. A target epsilon is the TOTAL
    of the run: it includes ``prior_events`` (dp_accounting events of earlier releases
    of the same private data that the run builds on, e.g. a DP teacher's training).

    With ``release_events`` (a method whose private access is one release, DP-MEPF) the
    plan's mechanism is 'release': ``release_events(sigma)`` lists the release's
    Gaussian events as a function of the noise multiplier, sigma is calibrated on them
    (with the prior events), q is 1 and ``steps`` (required) counts post-processing
    steps; ``batch_size`` and ``epochs`` are not used.

    Raises:
      PrivacyError: among others, when ``enabled`` and delta is not in (0, 1/N): a
        guarantee with delta >= 1/N holds for a mechanism that publishes one example of
        the N outright, so it says nothing about any one example.
    """
    if enabled and num_examples > 0 and not 0.0 < delta < 1.0 / num_examples:
        # A one-release plan protects N (its counts are noised) and publishes delta: the
        # advice is then a power of ten, so that following it does not publish N.
        # (Rounded down to one digit, so that the example is at most 1/(10 N).)
        power = 10.0 ** math.floor(math.log10(0.1 / num_examples))
        advice = power * math.floor(0.1 / num_examples / power)
        if release_events is not None:
            advice = power
        raise accounting.PrivacyError(
            f"dp.delta={delta!r} is not in (0, 1/N) = (0, {1.0 / num_examples:.3g}) for "
            f"N={num_examples} private examples: an (epsilon, delta) guarantee with delta >= "
            "1/N allows publishing one example outright. Set dp.delta below 1/N (common "
            f"practice: at most 1/(10 N), e.g. {advice:.1g}, or 1e-5 for N <= 100,000)."
        )
    if release_events is not None:
        return _release_plan(
            num_examples=num_examples,
            delta=delta,
            clip_norm=clip_norm,
            steps=steps,
            epsilon=epsilon,
            noise_multiplier=noise_multiplier,
            accountant=accountant,
            neighbouring=neighbouring,
            enabled=enabled,
            prior_events=prior_events,
            release_events=release_events,
        )
    if num_examples <= 0:
        raise accounting.PrivacyError("The private dataset is empty.")
    if batch_size <= 0:
        raise accounting.PrivacyError(f"batch size must be > 0, got {batch_size}.")
    if batch_size > num_examples:
        raise accounting.PrivacyError(
            f"The expected batch size {batch_size} exceeds the dataset size {num_examples}; "
            "lower the batch size (q = B/N must be <= 1)."
        )
    q = batch_size / num_examples
    if enabled and accountant == "rdp" and neighbouring == "replace_one" and q < 1.0:
        # Else a given sigma made a plan whose every report said epsilon nan.
        raise accounting.PrivacyError(
            "The RDP accountant cannot account for Poisson-sampled DP-SGD under the "
            "'replace_one' relation (dp_accounting refuses it); use dp.accountant='pld'."
        )
    if steps <= 0:
        if not 0 < epochs < math.inf:
            raise accounting.PrivacyError(
                f"Give either steps > 0 or a finite epochs > 0 (got epochs={epochs!r})."
            )
        steps = int(epochs / q)  # As Opacus/DPDM: T = int(epochs / q).
    if not enabled:
        return DPPlan(
            num_examples,
            q,
            0.0,
            clip_norm,
            steps,
            delta,
            None,
            accountant,
            neighbouring,
            enabled=False,
        )
    if (epsilon is None) == (noise_multiplier is None):
        raise accounting.PrivacyError("Give exactly one of dp.epsilon and dp.noise_multiplier.")
    if epsilon is not None:
        noise_multiplier = calibration.calibrate_noise_multiplier(
            epsilon, delta, q, steps, accountant, neighbouring, extra_events=prior_events
        )
    return DPPlan(
        num_examples,
        q,
        float(noise_multiplier),
        clip_norm,
        steps,
        delta,
        epsilon,
        accountant,
        neighbouring,
    )


def _release_plan(
    *,
    num_examples: int,
    delta: float,
    clip_norm: float,
    steps: int,
    epsilon: float | None,
    noise_multiplier: float | None,
    accountant: str,
    neighbouring: str,
    enabled: bool,
    prior_events: Sequence[Any],
    release_events: Callable[[float], Sequence[Any]],
) -> DPPlan:
    """The plan of a one-release method (see ``make_plan``)."""
    if num_examples <= 0:
        raise accounting.PrivacyError("The private dataset is empty.")
    if steps <= 0:
        raise accounting.PrivacyError(
            "A release method needs dp.steps > 0 (the post-processing steps after the release)."
        )
    if enabled:
        if (epsilon is None) == (noise_multiplier is None):
            raise accounting.PrivacyError("Give exactly one of dp.epsilon and dp.noise_multiplier.")
        if epsilon is not None:
            noise_multiplier = calibration.calibrate(
                lambda s: accounting.dp_accounting.ComposedDpEvent(
                    [*release_events(s), *prior_events]
                ),
                epsilon,
                delta,
                accountant,
                neighbouring,
                what="one release",
            )
    return DPPlan(
        num_examples,
        1.0,
        float(noise_multiplier) if enabled else 0.0,
        clip_norm,
        steps,
        delta,
        epsilon if enabled else None,
        accountant,
        neighbouring,
        enabled=enabled,
        mechanism="release",
    )


def save_plan(path: str, plan: DPPlan, extra: dict[str, Any] | None = None) -> None:
    """Writes the plan (and e.g. the epsilon spent so far) as JSON, atomically."""
    payload = {"plan": plan.to_dict(), **(extra or {})}
    atomic_file.write_json(path, payload, indent=2, sort_keys=True)


def load_plan(path: str) -> tuple[DPPlan, dict[str, Any]]:
    """Reads what ``save_plan`` wrote.

    Raises:
      FileNotFoundError: no such file.
      CorruptFileError: the file does not parse as a plan (``atomic_file.read_json``).
    """
    payload = atomic_file.read_json(path, keys=("plan",))
    try:
        return DPPlan.from_dict(payload.pop("plan")), payload
    except (TypeError, AttributeError) as e:  # A missing field, or not an object.
        raise atomic_file.CorruptFileError(
            f"{path} does not hold a DP plan ({e}): it was changed outside dpjax. Restore "
            "it from a backup, or start a new --workdir."
        ) from None
