"""The run's random streams, derived from ``config.seed``, but for a private run's secret ones.

One root key is split once into independent streams; a step's key is
``fold_in(stream, step)`` and an example's key is ``fold_in(step_key, dataset_index)``,
so nothing random needs to be checkpointed and a resumed run draws the same numbers.
The data sampler (host-side NumPy, ``privacy.sampling.PoissonSampler``) draws step t's
batch from ``SeedSequence([sampler_seed, t])``.

A private run replaces the ``noise`` and ``loss`` streams and the sampler's seed with
values drawn from a secret kept in the workdir (``privacy.noise_secret``): from
``config.seed`` alone, which is public, anyone could recompute the noise, and the
index-keyed loss draws would break the sensitivity bound (an example removed, or
replaced by one that sorts elsewhere, shifts the indices after it).
``from_seed`` and ``sampler_seed`` give the seed-derived ones (``dp.secret_noise=False``,
the canary audit, sampling).

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


def sampler_seed(seed: int) -> int:
    """The Poisson sampler's seed derived from ``config.seed`` (not a secret one)."""
    return seed * 1_000_003 + DATA_STREAM


jax.tree_util.register_dataclass(
    Streams, data_fields=["init", "loss", "noise", "sample", "extra"], meta_fields=[]
)
