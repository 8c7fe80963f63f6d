"""The run's random streams, all derived from ``config.seed``.

One root key is split once into independent streams; a step's key is
``fold_in(stream, step)`` and an example's key is ``fold_in(step_key, dataset_index)``,
so nothing random needs to be checkpointed and a resumed run draws the same numbers.
The data sampler (host-side NumPy, ``privacy.sampling.PoissonSampler``) draws step t's
batch from ``SeedSequence([seed * 1_000_003 + DATA_STREAM, t])``.

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
    # A step's public loss term (``fold_in(extra, step)``: the DP step's and the public
    # step's). A one-shot release draws from ``fold_in(noise, 0)`` (it runs no step).
    extra: jax.Array

    @classmethod
    def from_seed(cls, seed: int) -> Streams:
        keys = jax.random.split(jax.random.key(seed), 5)
        return cls(*keys)


jax.tree_util.register_dataclass(
    Streams, data_fields=["init", "loss", "noise", "sample", "extra"], meta_fields=[]
)
