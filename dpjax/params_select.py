"""Choosing the trained part of a parameter tree by path patterns.

DP fine-tuning methods (DP-LDM: attention and conditioning layers; DP-LoRA: adapters
only) spend the privacy budget on a small part of a pre-trained model. Per-example
gradients are taken w.r.t. the ``trainable`` tree alone (``clipping.py``), so selecting
fewer leaves is also what makes these methods cheap.

Paths are the '/'-joined dict keys of a leaf, e.g. ``down_1_attn_0/NIN_0/kernel``;
patterns are Python regular expressions searched in them (``re.search``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from flax import traverse_util

from dpjax.typed_config import ConfigError

PyTree = Any


def flat(tree: Mapping) -> dict[str, Any]:
    """{'a/b/c': leaf} for a nested dict."""
    return traverse_util.flatten_dict(dict(tree), sep="/") if tree else {}


def nested(flat_tree: Mapping[str, Any]) -> dict:
    """The inverse of ``flat``."""
    return traverse_util.unflatten_dict(dict(flat_tree), sep="/") if flat_tree else {}


def split(tree: Mapping, patterns: Sequence[str]) -> tuple[dict, dict]:
    """(selected, rest): leaves whose path matches any pattern, and all the others.

    Raises:
      ConfigError: a pattern is not a valid regex or matches no leaf (a typo would
        otherwise silently train nothing, or everything); reported in one line.
    """
    leaves = flat(tree)
    selected: dict[str, Any] = {}
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"Invalid trainable-parameter pattern {pattern!r}: {e}") from e
        hits = [p for p in leaves if regex.search(p)]
        if not hits:
            examples = ", ".join(sorted(leaves)[:8])
            raise ConfigError(
                f"Trainable-parameter pattern {pattern!r} matches no parameter. Paths look "
                f"like: {examples}, ..."
            )
        selected.update({p: leaves[p] for p in hits})
    rest = {p: v for p, v in leaves.items() if p not in selected}
    return nested(selected), nested(rest)


def merge(a: Mapping, b: Mapping) -> dict:
    """The union of two trees with disjoint leaf paths (``split``'s inverse)."""
    fa, fb = flat(a), flat(b)
    overlap = sorted(set(fa) & set(fb))
    if overlap:
        raise ValueError(f"Parameter trees overlap at {overlap[:5]}.")
    return nested({**fa, **fb})
