"""The DP-SGD gradient of one batch, for any model: dpjax's DP engine as a library.

``noised_mean`` is steps 3 and 4 of every dpjax DP step (``dp_step.make_train_step``
calls it): the sum of clipped per-example gradients plus N(0, (sigma C)^2) on every
coordinate, divided by the public expected batch size N*q (Abadi et al. 2016, Alg. 1;
never the realized batch size, which is private). ``private_gradient`` puts step 2
(``clipping.clipped_grad_sum``) in front of it, for a user's own parameters and
per-example loss::

    plan = make_plan(num_examples=N, batch_size=256, delta=1e-5, clip_norm=1.0,
                     epochs=10, epsilon=3.0)            # sigma calibrated, T = 10 / q
    sampler_seed, noise_seed = (secrets.randbits(128) for _ in range(2))  # secret
    sampler = PoissonSampler(N, plan.sampling_rate, seed=sampler_seed, multiple=64)
    noise_key = noise_secret.noise_key(noise_seed)
    loss_key = noise_secret.loss_key(noise_seed)         # secret too: see below
    for t in range(plan.steps):
        b = sampler.batch(t)
        rows = np.maximum(b.indices, 0)                  # padding (-1): masked out
        examples = jax.tree_util.tree_map(lambda a: a[rows], data)
        keys = jax.random.split(jax.random.fold_in(loss_key, t), len(b.indices))
        grads, info = private_gradient(loss_fn, params, {}, examples, b.mask, keys,
                                       jax.random.fold_in(noise_key, t), plan,
                                       microbatch_size=64, num_real=b.num_real)
        ...  # any optax update: post-processing
    epsilon = plan.epsilon()                             # what T steps spent

Guarantee: if ``examples`` are a Poisson batch of rate ``plan.sampling_rate``
(``sampling.PoissonSampler``; real rows first, then padding with ``mask`` False) and
``noise_key`` is used for nothing else, one call is one step of the mechanism that
``plan.dp_event`` accounts for: each example's gradient is clipped to ``plan.clip_norm``
over all of ``trainable`` (padding and non-finite rows contribute 0), and the Gaussian
noise has standard deviation ``plan.noise_multiplier * plan.clip_norm``. The guarantee
also needs the noise key, the sampler's seed and the per-example ``keys`` secret (the
example draws them from the OS's CSPRNG, as a dpjax run does: ``noise_secret``): from a
public or guessable seed, anyone can recompute the noise and the batches and remove
them, and public per-example keys handed out by position (in the batch or the dataset)
shift when an example is added, removed or moved, so the examples after it get other,
known draws and the sum moves by more than the sensitivity. (Keys derived from each
example itself, e.g. from a hash of its content, would be safe public; ones by position
are not.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from dpjax.privacy import clipping, noise
from dpjax.privacy.plan import DPPlan

PyTree = Any


def noised_mean(grad_sum: PyTree, noise_key: jax.Array, plan: DPPlan) -> PyTree:
    """``(grad_sum + N(0, (sigma C)^2 I)) / (N q)``: a clipped sum made private.

    Raises:
      ValueError: ``plan`` is not a DP-SGD plan with DP enabled.
    """
    if not plan.enabled or plan.mechanism != "dpsgd":
        raise ValueError(f"noised_mean needs an enabled DP-SGD plan, got {plan}.")
    noisy = noise.add_gaussian_noise(grad_sum, noise_key, plan.noise_std)
    return jax.tree_util.tree_map(lambda g: g / plan.expected_batch_size, noisy)


def private_gradient(
    loss_fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]],
    trainable: PyTree,
    frozen: PyTree,
    examples: PyTree,
    mask: jax.Array | np.ndarray,
    keys: jax.Array,
    noise_key: jax.Array,
    plan: DPPlan,
    *,
    microbatch_size: int = 0,
    num_real: jax.Array | int | None = None,
    impl: str = "vmap",
    compute_dtype: str = "float32",
) -> tuple[PyTree, clipping.ClipResult]:
    """The DP-SGD gradient of one padded Poisson batch, and the clipping diagnostics.

    Args:
      loss_fn: ``loss_fn(trainable, frozen, example, key) -> (loss, aux)`` for ONE
        example (no batch axis): a scalar loss and a dict of scalar metrics ({} for
        none). Anything repeated per example must be averaged inside it.
      trainable: the parameters differentiated, clipped and noised.
      frozen: parameters passed through, never differentiated ({} for none).
      examples: a pytree of arrays with leading axis P (the padded batch).
      mask: (P,) bool, True for the real examples, which come first.
      keys: (P,) PRNG keys, one per example (e.g. ``jax.random.split``).
      noise_key: the key of this step's noise, used for nothing else.
      plan: the privacy plan (``plan.make_plan``): C, sigma and N q.
      microbatch_size: rows per vectorized chunk; 0 for the whole batch at once.
      num_real: the number of real rows (``PaddedBatch.num_real``); micro-batches after
        it are skipped.
      impl, compute_dtype: the clipping path and arithmetic dtype, as
        ``clipping.clipped_grad_sum`` (each gives the same sum up to rounding).

    Returns:
      (the noised mean gradient, a pytree like ``trainable`` in float32; the
      ``ClipResult`` of the clipping: its norms and counts are NOT private, they are
      diagnostics of the private batch).

    Raises:
      TypeError: ``loss_fn`` does not return (scalar loss, dict of scalars).
      ValueError: a concrete ``mask`` with padding before a real row, a plan that is not
        an enabled DP-SGD plan, or a bad micro-batch size (as ``clipped_grad_sum``).
    """
    _check_loss_fn(loss_fn, trainable, frozen, examples, keys)
    concrete = isinstance(mask, np.ndarray) or (
        isinstance(mask, jax.Array) and not isinstance(mask, jax.core.Tracer)
        and mask.is_fully_addressable)  # (Traced, or spread over hosts: not checkable.)
    if concrete:
        host = np.asarray(mask, bool)
        if host.any() and not host[: int(host.sum())].all():
            raise ValueError("mask: the real examples must come first, then the padding.")
    size = int(np.shape(mask)[0])
    result = clipping.clipped_grad_sum(
        loss_fn, trainable, frozen, examples, jax.numpy.asarray(mask), keys,
        clip_norm=plan.clip_norm, microbatch_size=microbatch_size or size,
        num_real=num_real, impl=impl, compute_dtype=compute_dtype,
    )
    return noised_mean(result.grad_sum, noise_key, plan), result


def _check_loss_fn(loss_fn, trainable, frozen, examples, keys) -> None:
    """Raises TypeError unless ``loss_fn`` gives (scalar, dict of scalars) on one example."""
    one = jax.tree_util.tree_map(lambda a: a[0], examples)
    try:
        out = jax.eval_shape(loss_fn, trainable, frozen, one, keys[0])
    except TypeError as e:
        raise TypeError(
            f"loss_fn(trainable, frozen, example, key) failed on one example: {e}") from e
    ok = (isinstance(out, tuple) and len(out) == 2 and getattr(out[0], "shape", None) == ()
          and isinstance(out[1], dict) and all(getattr(v, "shape", None) == ()
                                               for v in out[1].values()))
    if not ok:
        raise TypeError(
            "loss_fn(trainable, frozen, example, key) must return (loss, aux): the scalar "
            f"loss of ONE example and a dict of scalar metrics ({{}} for none); got {out}."
        )
