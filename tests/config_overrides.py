"""A test helper: apply dotted-path overrides to an experiment config."""

from typing import Any

import ml_collections


def with_overrides(c: ml_collections.ConfigDict, over: dict[str, Any]) -> ml_collections.ConfigDict:
    """Sets ``c[a][b]... = value`` for each 'a.b...' key of ``over``, then locks ``c``."""
    c.unlock()
    for path, value in over.items():
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    c.lock()
    return c
