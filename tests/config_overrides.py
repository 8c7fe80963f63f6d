"""Test helpers: dotted-path overrides of an experiment config, and hand edits of a run."""

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


def scale_plan_sigma(workdir, factor: float) -> None:
    """Multiplies the noise multiplier in ``workdir``'s dp_plan.json by ``factor``, as a
    hand edit after the training would (its checkpoints keep the plan they were saved
    under)."""
    import json
    import os

    path = os.path.join(str(workdir), "dp_plan.json")
    with open(path) as f:
        payload = json.load(f)
    payload["plan"]["noise_multiplier"] *= factor
    with open(path, "w") as f:
        json.dump(payload, f)
