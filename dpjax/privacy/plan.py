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
import json
import math
from typing import Any

from dpjax.privacy import accounting


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

    def __post_init__(self) -> None:
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
        return accounting.dpsgd_event(self.noise_multiplier, self.sampling_rate, steps)

    def epsilon(self, steps: int | None = None, kind: str | None = None, extra_events=()) -> float:
        """Epsilon at ``delta`` after ``steps`` steps, composed with any extra releases."""
        if not self.enabled:
            return math.inf
        return accounting.epsilon(
            [self.dp_event(steps), *extra_events],
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
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def same_guarantee_as(self, other: DPPlan) -> bool:
        """True if both plans describe the same mechanism (used to validate a resume)."""
        a, b = dataclasses.asdict(self), dataclasses.asdict(other)
        return all(
            (math.isclose(a[k], b[k], rel_tol=1e-9) if isinstance(a[k], float) else a[k] == b[k])
            for k in a
            if k != "steps"
        )


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
) -> DPPlan:
    """Builds a plan: q = B/N, T from ``steps`` or ``epochs`` (T = int(epochs / q)).

    Exactly one of ``epsilon`` (then sigma is calibrated, conservatively) and
    ``noise_multiplier`` must be given when ``enabled``.
    """
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
    if steps <= 0:
        if epochs <= 0:
            raise accounting.PrivacyError("Give either steps > 0 or epochs > 0.")
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
        noise_multiplier = accounting.calibrate_noise_multiplier(
            epsilon, delta, q, steps, accountant, neighbouring
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


def save_plan(path: str, plan: DPPlan, extra: dict[str, Any] | None = None) -> None:
    """Writes the plan (and e.g. the epsilon spent so far) as JSON, atomically."""
    import os
    import tempfile

    payload = {"plan": plan.to_dict(), **(extra or {})}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".dp_plan.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def load_plan(path: str) -> tuple[DPPlan, dict[str, Any]]:
    """Reads what ``save_plan`` wrote."""
    with open(path) as f:
        payload = json.load(f)
    return DPPlan.from_dict(payload.pop("plan")), payload
