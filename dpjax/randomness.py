"""The run's random streams, all derived from ``config.seed``.

One root key is split once into independent streams; a step's key is
``fold_in(stream, step)`` and an example's key is ``fold_in(step_key, dataset_index)``,
so nothing random needs to be checkpointed and a resumed run draws the same numbers.
The data sampler (host-side NumPy) is seeded by (seed, DATA_STREAM, step).

JAX's PRNG (threefry) is not a cryptographically secure generator; DP guarantees assume
ideal Gaussian noise (see the README's privacy notes).
"""

from __future__ import annotations

import dataclasses

import jax

DATA_STREAM = 0xDA7A


@dataclasses.dataclass(frozen=True)
class Streams:
    """Independent key streams: model init, per-example loss draws, DP noise, sampling."""

    init: jax.Array
    loss: jax.Array
    noise: jax.Array
    sample: jax.Array
    extra: jax.Array  # for method-specific one-shot uses (e.g. a release)

    @classmethod
    def from_seed(cls, seed: int) -> Streams:
        keys = jax.random.split(jax.random.key(seed), 5)
        return cls(*keys)

    def data_seed(self, seed: int) -> tuple[int, int]:
        return (seed, DATA_STREAM)


jax.tree_util.register_dataclass(
    Streams, data_fields=["init", "loss", "noise", "sample", "extra"], meta_fields=[]
)
