"""Empirical privacy audit: a lower bound on epsilon from gradient canaries, in one run.

This is the one-run audit of Steinke, Nasr & Jagielski, "Privacy Auditing with One (1)
Training Run" (NeurIPS 2023, arXiv 2305.08846), in its white-box form with gradient
canaries, run through the library's own DP step (``dp_step.make_train_step``).

The experiment (``run_audit``):

1. ``m`` canaries are drawn; canary i is a fixed random direction u_i in the space of
   the trainable parameters, and is included in the dataset independently with
   probability 1/2 (S_i ~ Bernoulli(1/2), the randomness the theorem needs).
2. Each included canary is one more row of the dataset whose per-example loss is the
   linear function <theta, u_i>, so its per-example gradient is exactly u_i, of norm
   ``canary_norm_multiple * C`` (far above C: clipping has to act). Real rows keep the
   method's own ``loss_per_example``; a canary row is marked by a negative label.
3. ``steps`` DP steps are run with ``make_train_step`` itself: Poisson sampling at the
   plan's q over the real rows plus the included canaries, per-example gradients, the
   flat clip to C, the masked sum, N(0, (sigma C)^2) noise from the noise stream, the
   division by the plan's N*q. The optimizer is replaced by one that applies no update
   and accumulates the noisy gradients it is given, so the parameters stay fixed (a
   fixed, adversarially chosen parameter point is allowed by DP-SGD's guarantee) and
   the accumulated sum is exactly what the auditor observes.
4. Canary i's score is <sum over steps of the noisy averaged gradient, u_i / ||u_i||>.
   The auditor guesses the k highest-scoring canaries as included (k- = 0: bottom
   guesses are weak under subsampling, since an included canary that was never
   sampled looks excluded) and counts the correct guesses v.
5. Their theorem for (epsilon, delta)-DP: if the mechanism is (epsilon, delta)-DP
   w.r.t. adding or removing one example, then for r guesses and m canaries
   P[v' >= v] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta * alpha, with
   alpha = max_{1 <= i <= v} P[v - i <= Binomial(r, e^eps / (1 + e^eps)) < v] / i.
   The lower bound is the largest epsilon whose p-value is <= 1 - confidence.

Guarantees:
* Validity: if the audited path is (epsilon, delta)-DP (add/remove one), then
  P[epsilon_lower_bound > epsilon] <= 1 - confidence, over the canary draws, inclusion,
  sampling and noise. The number of guesses k is taken from a grid fixed before the
  run (fractions of the expected number of included canaries that are ever sampled,
  a public function of m, q and T); the best k is used with a Bonferroni correction
  (significance / grid size), so choosing k after seeing the scores keeps validity.
* What is audited: the DP step as training runs it (sampling, padding and masking,
  per-example gradients, clipping, the sum, the noise, the N*q scaling), in float32 on
  one device with the default micro-batch loop, and with noise, batches and loss draws
  from ``config.seed`` rather than the run's secret (the audit's own randomness; a
  ``compute_dtype``, mesh or ``microbatch_loop`` setting of the run is not applied),
  against the accountant's epsilon for the same q, sigma, T and delta. A
  bug in any of these that makes the step less private than the accountant says can
  raise the bound above that epsilon; ``flagged`` says it did.
* What is NOT audited: the method's loss (canaries replace it), the optimizer, EMA and
  anything after the noisy gradient (post-processing), releases other than DP-SGD
  steps, and privacy lost through the PRNG or floating point.
* Power: the bound can never exceed roughly ln(k / ln(grid / (1 - confidence))), the
  value ``detectable_epsilon`` reports (all guesses right). An audit can only flag a
  claimed epsilon below it: about 3.5 for 2000 canaries with the DPDM smoke plan, 5.0
  with the DPDM FMNIST recipe. It grows only logarithmically with the canaries, and
  the 2 m delta term caps it (about 5.6 at delta = 1e-5), so one-run audits of
  epsilon around 10 are not feasible this way (benchmarks/audit.md).

Fault injection (``AuditConfig.noise_scale``, ``clip_scale``) runs the step with a
broken mechanism while the claim stays the plan's, to check that the audit can fail.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax.privacy import accounting
from dpjax.privacy.audit_stats import (  # noqa: F401 - the statistics, re-exported.
    GUESS_FRACTIONS,
    bound_from_scores,
    guess_grid,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)
from dpjax.privacy.dp_step import make_train_step
from dpjax.privacy.plan import DPPlan
from dpjax.privacy.sampling import PoissonSampler
from dpjax.randomness import Streams, sampler_seed
from dpjax.state import TrainState

PyTree = Any


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """Settings of one audit.

    Attributes:
      num_canaries: m, the number of canaries (each included with probability 1/2).
      steps: DP steps to run; 0 means all of the plan's steps. The claim audited is the
        accountant's epsilon after this many steps.
      confidence: the probability that the bound is valid (0.95: 5% significance).
      guess_fractions: the grid of k (top guesses), as fractions of the expected number
        of included canaries sampled at least once; fixed before the run.
      canary_norm_multiple: a canary's raw gradient norm, in units of C.
      seed: seed of the canaries, their inclusion, the batches and the noise.
      noise_scale: FAULT INJECTION; the step's sigma is multiplied by this (0: no noise).
      clip_scale: FAULT INJECTION; the step clips at C * clip_scale while its noise std
        stays sigma * C (a clip bound that is not the one the noise is calibrated to).
    """

    num_canaries: int = 2000
    steps: int = 0
    confidence: float = 0.95
    guess_fractions: tuple[float, ...] = GUESS_FRACTIONS
    canary_norm_multiple: float = 100.0
    seed: int = 0
    noise_scale: float = 1.0
    clip_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.num_canaries < 2:
            raise accounting.PrivacyError(f"Need >= 2 canaries, got {self.num_canaries}.")
        if self.steps < 0:
            raise accounting.PrivacyError(f"audit steps must be >= 0, got {self.steps}.")
        if not 0.5 < self.confidence < 1.0:
            raise accounting.PrivacyError(f"confidence must be in (0.5, 1), got {self.confidence}.")
        if not self.guess_fractions or not all(0 < f <= 1 for f in self.guess_fractions):
            raise accounting.PrivacyError(
                f"guess_fractions must be non-empty, in (0, 1]: {self.guess_fractions}."
            )
        if not self.canary_norm_multiple >= 1.0:
            raise accounting.PrivacyError("canary_norm_multiple must be >= 1.")
        if self.noise_scale < 0 or self.clip_scale <= 0:
            raise accounting.PrivacyError("noise_scale must be >= 0 and clip_scale > 0.")

    @property
    def faults(self) -> dict[str, float]:
        """The injected faults (empty for a real audit)."""
        out = {}
        if self.noise_scale != 1.0:
            out["noise_scale"] = self.noise_scale
        if self.clip_scale != 1.0:
            out["clip_scale"] = self.clip_scale
        return out


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """What an audit found. ``flagged`` is True when the bound exceeds the claim.

    Attributes:
      epsilon_lower_bound: the empirical lower bound (valid with ``confidence``).
      accountant_epsilon: the claim: the plan's accountant's epsilon after ``steps``.
      detectable_epsilon: the largest bound this audit could have reported (all of the
        largest k guesses right); a claim above it cannot be flagged by this audit.
      flagged: epsilon_lower_bound > accountant_epsilon.
      guesses: per k of the grid: k, correct guesses, and the bound at that k.
      details: the plan, the settings, faults, counts and timings (JSON-serializable).
    """

    epsilon_lower_bound: float
    accountant_epsilon: float
    detectable_epsilon: float
    flagged: bool
    guesses: list[dict[str, Any]]
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["accountant_epsilon"] = _json_float(self.accountant_epsilon)
        return d

    def verdict(self) -> str:
        """One line: the bound against the claim, FLAGGED if above."""
        d = self.details
        faults = d["faults"]
        tag = f" [fault injected: {faults}]" if faults else ""
        head = "FLAGGED" if self.flagged else "ok"
        line = (
            f"audit {head}: empirical epsilon lower bound {self.epsilon_lower_bound:.3f} "
            f"({d['confidence']:.0%} confidence, {d['num_canaries']} canaries, {d['steps']} "
            f"steps) vs accountant epsilon {self.accountant_epsilon:.3f} "
            f"({d['accountant']}, delta={d['delta']:g}){tag}"
        )
        if self.flagged:
            line += ": the DP step leaks more than the accountant says"
        elif self.accountant_epsilon >= self.detectable_epsilon:
            line += (
                f" (note: this audit cannot detect a violation of a claim above "
                f"{self.detectable_epsilon:.2f}; use more canaries)"
            )
        return line


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


# ---------------------------------------------------------------------------------------
# Canaries inside the real DP step.


def _mix32(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash (xor-shift-multiply 'lowbias32'); cheap to compile and run."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def canary_direction(
    template: PyTree, salt: int | jax.Array, index: jax.Array, norm: float
) -> PyTree:
    """Canary ``index``'s direction u: a +-1 vector over all leaves, scaled to norm ``norm``.

    The signs are a hash of (salt, canary index, coordinate), so a direction costs no
    PRNG (whose vmapped form compiles slowly on CPU) and is regenerated identically
    when scoring. Distinct canaries are nearly orthogonal: <u_i, u_j> / norm^2 has mean
    0 and std 1/sqrt(d) over the d trainable coordinates.
    """
    leaves, treedef = jax.tree_util.tree_flatten(template)
    d = sum(int(np.prod(jnp.shape(x))) for x in leaves)
    scale = jnp.float32(norm / math.sqrt(d))
    seed = _mix32(jnp.asarray(index).astype(jnp.uint32) ^ jnp.asarray(salt, jnp.uint32))
    out, offset = [], 0
    for x in leaves:
        n = int(np.prod(jnp.shape(x)))
        j = jnp.arange(offset, offset + n, dtype=jnp.uint32).reshape(jnp.shape(x))
        h = _mix32(_mix32(j * jnp.uint32(0x9E3779B9) + seed) ^ seed)
        sign = 1.0 - 2.0 * (h >> 31).astype(jnp.float32)
        out.append(sign * scale)
        offset += n
    return jax.tree_util.tree_unflatten(treedef, out)


class CanaryMethod:
    """``method`` plus gradient canaries: a row with label -1 - i is canary i.

    A canary row's loss is <theta, u_i> (u_i held constant), so its per-example gradient
    w.r.t. the trainable parameters is exactly u_i; a real row's loss is the method's.
    Everything else (``public_loss``) is the method's. Only ``loss_per_example`` and
    ``public_loss`` are used by the DP step.
    """

    def __init__(self, method: Any, salt: int, norm: float):
        self.method = method
        self.salt = int(salt)
        self.norm = float(norm)

    def loss_per_example(self, trainable, frozen, example, key):
        label = example["label"]
        is_canary = label < 0
        real = dict(example, label=jnp.where(is_canary, 0, label))
        loss, aux = self.method.loss_per_example(trainable, frozen, real, key)
        u = canary_direction(trainable, self.salt, jnp.maximum(-label - 1, 0), self.norm)
        dots = jax.tree_util.tree_map(
            lambda p, d: jnp.sum(p.astype(jnp.float32) * jax.lax.stop_gradient(d)), trainable, u
        )
        canary_loss = sum(jax.tree_util.tree_leaves(dots))
        loss = jnp.where(is_canary, canary_loss, loss.astype(jnp.float32))
        aux = {k: jnp.where(is_canary, 0.0, v) for k, v in aux.items()}
        return loss, aux

    def public_loss(self, trainable, frozen, key):
        return self.method.public_loss(trainable, frozen, key)


def gradient_sum_recorder() -> optax.GradientTransformation:
    """An 'optimizer' that never moves the parameters and sums the gradients it gets.

    Its state is the float32 sum of every gradient passed to ``update`` (in the DP
    step: the noisy averaged gradient plus the public-loss gradient).
    """

    def init(params):
        return jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)

    def update(grads, state, params=None):
        del params
        state = jax.tree_util.tree_map(lambda s, g: s + g.astype(jnp.float32), state, grads)
        return jax.tree_util.tree_map(jnp.zeros_like, grads), state

    return optax.GradientTransformation(init, update)


@jax.jit
def _score_chunks(observed: PyTree, salt: jax.Array, ids: jax.Array) -> jax.Array:
    def one(i):
        u = canary_direction(observed, salt, i, 1.0)
        dots = jax.tree_util.tree_map(lambda a, b: jnp.sum(a * b), observed, u)
        return sum(jax.tree_util.tree_leaves(dots))

    return jax.lax.map(one, ids, batch_size=64)


def _scores(observed: PyTree, salt: int, m: int) -> np.ndarray:
    """<observed, u_i / ||u_i||> for every canary i, 64 at a time (never all u_i at once)."""
    ids = jnp.arange(m, dtype=jnp.uint32)
    return np.asarray(_score_chunks(observed, jnp.uint32(salt), ids), np.float64)


def run_audit(
    method: Any,
    trainable: PyTree,
    frozen: PyTree,
    plan: DPPlan,
    images: np.ndarray,
    labels: np.ndarray,
    config: AuditConfig = AuditConfig(),
    *,
    microbatch_size: int,
    clipping_impl: str = "vmap",
    log=lambda *_: None,
) -> AuditResult:
    """Runs the one-run canary audit of ``plan``'s DP step on ``method`` (module docstring).

    Args:
      method: any method object (``loss_per_example``, ``public_loss``).
      trainable, frozen: the parameter point the steps run at (e.g. init or a checkpoint).
      plan: the DP plan whose epsilon is the claim; its q, sigma, C and N*q run the step.
      images, labels: the rows the canaries are added to, uint8 (N', H, W, C) and (N',).
        Any data of the right shape is valid (DP holds for every dataset); N*q still
        comes from the plan.
      config: the audit settings (and any injected fault).
      microbatch_size: the DP step's micro-batch size.
      clipping_impl: the run's clipping implementation. The canaries' loss reads the
        parameters directly (their gradient is planted, not computed through layers),
        which only the reference path ('vmap') supports: a fast path ('layerwise',
        'ghost'; equal to the reference up to rounding, tests/test_layerwise.py and
        test_ghost.py) is audited through the reference, and the details say so.
      log: progress printer.

    Returns:
      An AuditResult.

    Raises:
      PrivacyError: if the plan is not private or the settings are invalid.
    """
    if not plan.enabled:
        raise accounting.PrivacyError("The plan is not private (dp.enabled=False): no claim.")
    steps = config.steps or plan.steps
    if not 1 <= steps <= plan.steps:
        raise accounting.PrivacyError(f"audit steps must be in [1, {plan.steps}], got {steps}.")
    t0 = time.time()
    run_clipping_impl = clipping_impl
    if clipping_impl != "vmap":
        log(f"[dpjax] audit: the run clips with '{clipping_impl}'; the canaries need the "
            "reference path 'vmap', which computes the same clipped sum")
        clipping_impl = "vmap"
    m, seed = config.num_canaries, config.seed
    claim = accounting.epsilon(
        [plan.dp_event(steps)], plan.delta, plan.accountant, "add_or_remove_one"
    )
    # The step that actually runs: the plan, with any injected fault.
    run_plan = dataclasses.replace(
        plan,
        clip_norm=plan.clip_norm * config.clip_scale,
        noise_multiplier=plan.noise_multiplier * config.noise_scale / config.clip_scale,
    )

    rng = np.random.default_rng([seed, 0xA0D17])
    included = rng.random(m) < 0.5
    ids = np.flatnonzero(included).astype(np.int32)
    n_real = len(images)
    blank = np.zeros((len(ids),) + tuple(images.shape[1:]), np.uint8)
    rows_images = np.concatenate([np.asarray(images, np.uint8), blank])
    rows_labels = np.concatenate([np.asarray(labels, np.int32), -1 - ids])
    salt = int(np.random.default_rng([seed, 0xCA7A]).integers(2**32))
    wrapped = CanaryMethod(method, salt, config.canary_norm_multiple * plan.clip_norm)
    recorder = gradient_sum_recorder()
    step_fn = make_train_step(
        wrapped,
        recorder,
        run_plan,
        microbatch_size=microbatch_size,
        ema_rate=0.0,
        clipping_impl=clipping_impl,
    )
    sampler = PoissonSampler(
        len(rows_labels),
        plan.sampling_rate,
        seed=sampler_seed(seed),
        multiple=microbatch_size,
    )
    streams = Streams.from_seed(seed)
    # Copies: the step donates its state, and the caller's arrays must survive.
    trainable, frozen = jax.tree_util.tree_map(jnp.array, (trainable, frozen))
    state = TrainState.create(trainable, frozen, recorder.init(trainable))
    dev_images, dev_labels = jnp.asarray(rows_images), jnp.asarray(rows_labels)
    times_sampled = np.zeros(m, np.int32)
    for t in range(steps):
        batch = sampler.batch(t)
        state, _ = step_fn(
            state, dev_images, dev_labels, batch.indices, batch.mask, batch.num_real, streams
        )
        rows = batch.indices[: batch.num_real]
        times_sampled[ids[rows[rows >= n_real] - n_real]] += 1  # Diagnostics only.
        log(f"[dpjax] audit step {t + 1}/{steps}: {batch.num_real} rows")
    observed = jax.device_get(state.opt_state)
    scores = _scores(observed, salt, m)
    ks = guess_grid(m, plan.sampling_rate, steps, config.guess_fractions)
    bound, rows = bound_from_scores(scores, included, ks, plan.delta, config.confidence)
    significance = (1.0 - config.confidence) / len(ks)
    detectable = one_run_epsilon_lower_bound(m, ks[-1], ks[-1], plan.delta, significance)
    details = {
        "method": getattr(method, "name", type(method).__name__),
        "what": "one-run gradient-canary audit (Steinke, Nasr, Jagielski 2023) of dp_step",
        "relation": "add_or_remove_one",
        "num_canaries": m,
        "num_included": int(included.sum()),
        "num_included_sampled": int(np.sum(included & (times_sampled > 0))),
        "steps": steps,
        "steps_planned": plan.steps,
        "confidence": config.confidence,
        "delta": plan.delta,
        "accountant": plan.accountant,
        "noise_multiplier": plan.noise_multiplier,
        "clip_norm": plan.clip_norm,
        "clipping_impl": clipping_impl,
        "run_clipping_impl": run_clipping_impl,
        "microbatch_size": microbatch_size,
        "sampling_rate": plan.sampling_rate,
        "expected_batch_size": plan.expected_batch_size,
        "num_examples": plan.num_examples,
        "num_data_rows": n_real,
        "canary_grad_norm": config.canary_norm_multiple * plan.clip_norm,
        "faults": config.faults,
        "seed": seed,
        "score_mean_included": float(scores[included].mean()) if included.any() else None,
        "score_mean_excluded": float(scores[~included].mean()) if (~included).any() else None,
        "seconds": round(time.time() - t0, 2),
    }
    return AuditResult(
        epsilon_lower_bound=float(bound),
        accountant_epsilon=float(claim),
        detectable_epsilon=float(detectable),
        flagged=bool(bound > claim),
        guesses=rows,
        details=details,
    )
