"""Parameter-tree helpers shared by tests."""

from __future__ import annotations

from typing import Any

import jax


def jittered(tree: Any, seed: int = 5, scale: float = 0.1) -> Any:
    """``tree`` plus N(0, scale^2) noise on every leaf: a stand-in for trained weights
    (fresh UNets and flows have zero-initialized output layers, which would make them
    trivial: zero outputs, identity flows)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [v + scale * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)]
    )
