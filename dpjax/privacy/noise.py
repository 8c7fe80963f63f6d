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
    """Returns ``tree + N(0, std^2 I)`` with one independent key per leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        x.astype(jnp.float32) + std * jax.random.normal(k, x.shape, jnp.float32)
        for x, k in zip(leaves, keys)
    ]
    return jax.tree_util.tree_unflatten(treedef, noisy)
