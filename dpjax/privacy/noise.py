"""The Gaussian mechanism on a pytree.

Guarantee: ``add_gaussian_noise(tree, key, std)`` adds to every scalar of ``tree`` an
independent N(0, std^2) sample (float32), drawn from ``key`` alone, as far as a float32
sampler can: ``jax.random.normal`` has bounded support (|z| below about 5.4 over 2^26
draws in the docstring audit) and float granularity, so the accounting's ideal
Gaussian is an assumption (README, "Privacy notes"; Mironov, CCS 2012). Callers pass a key
from the noise stream (``fold_in(noise_stream, step)``), which is used for nothing else,
so noise is never reused across steps or correlated with the loss randomness.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

#: How many pieces the flat standard normal vector is drawn in (``standard_normal``).
NOISE_CHUNKS = 2


def standard_normal(key: jax.Array, size: int) -> jax.Array:
    """(size,) independent N(0, 1) float32 samples, drawn from ``key`` alone.

    Drawn as ``NOISE_CHUNKS`` pieces, piece i from ``fold_in(key, i)`` (independent
    keys, so independent samples), inside a ``lax.map``. Why a loop: a loop's output is
    a materialized buffer. Drawn directly, the vector is an elementwise function of
    random bits, and XLA fuses that function (the inverse-erf polynomial of
    ``jax.random.normal``) into every consumer: once per parameter leaf when the vector
    is cut into a pytree's leaves. For the 289 leaves of the DPDM UNet the noise alone
    compiled to 32,382 HLO instructions (2,592 now), and the whole fast DP step to
    134,026 (74,190 now); ``benchmarks/results.md``, "Compile time of the DP step".
    XLA inlines a loop of one trip, hence at least two pieces.
    """
    piece = -(-size // NOISE_CHUNKS)  # ceil

    def draw(i: jax.Array) -> jax.Array:
        return jax.random.normal(jax.random.fold_in(key, i), (piece,), jnp.float32)

    flat = jax.lax.map(draw, jnp.arange(NOISE_CHUNKS, dtype=jnp.uint32))
    return flat.reshape(-1)[:size]


def add_gaussian_noise(tree: PyTree, key: jax.Array, std: float | jax.Array) -> PyTree:
    """Returns ``tree + N(0, std^2 I)``.

    All scalars' noise comes from ONE flat standard normal vector (``standard_normal``),
    cut into the leaves' shapes: the same distribution as a draw per leaf, but one PRNG
    computation to compile instead of one per leaf (a UNet has ~150-300 leaves, and each
    threefry instance costs seconds of XLA compile time on CPU).
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    sizes = [int(x.size) for x in leaves]
    flat = standard_normal(key, sum(sizes))
    noisy, start = [], 0
    for x, n in zip(leaves, sizes):
        z = jax.lax.dynamic_slice_in_dim(flat, start, n).reshape(x.shape)
        noisy.append(x.astype(jnp.float32) + std * z)
        start += n
    return jax.tree_util.tree_unflatten(treedef, noisy)
