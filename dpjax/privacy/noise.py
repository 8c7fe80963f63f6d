"""The Gaussian mechanism on a pytree.

Guarantee: ``add_gaussian_noise(tree, key, std)`` adds to every scalar of ``tree`` an
independent N(0, std^2) sample (float32), drawn from ``key`` alone. Callers pass a key
from the noise stream (``fold_in(noise_stream, step)``), which is used for nothing else,
so noise is never reused across steps or correlated with the loss randomness.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def add_gaussian_noise(tree: PyTree, key: jax.Array, std: float | jax.Array) -> PyTree:
    """Returns ``tree + N(0, std^2 I)``.

    All scalars' noise comes from ONE draw of a flat standard normal vector, cut into
    the leaves' shapes: the same distribution as a draw per leaf, but one PRNG
    computation to compile instead of one per leaf (a UNet has ~150 leaves, and each
    threefry instance costs seconds of XLA compile time on CPU).
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    sizes = [int(x.size) for x in leaves]
    flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
    noisy, start = [], 0
    for x, n in zip(leaves, sizes):
        z = jax.lax.dynamic_slice_in_dim(flat, start, n).reshape(x.shape)
        noisy.append(x.astype(jnp.float32) + std * z)
        start += n
    return jax.tree_util.tree_unflatten(treedef, noisy)
