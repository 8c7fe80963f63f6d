"""The training state pytree. It stores no PRNG key: every key is derived from the step
number and ``config.seed``, or, for the DP noise and batches, the run's noise secret
(``privacy/noise_secret.py``, kept in the workdir), so a restored state replays the same
randomness."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything that changes during training.

    Attributes:
      step: number of completed optimizer steps (int32 scalar).
      trainable: the parameters DP-SGD trains.
      frozen: parameters that never change (public pre-trained parts).
      opt_state: the optax state of ``trainable``.
      ema: exponential moving average of ``trainable`` (what sampling and export use).
    """

    step: jax.Array
    trainable: PyTree
    frozen: PyTree
    opt_state: PyTree
    ema: PyTree

    @classmethod
    def create(cls, trainable: PyTree, frozen: PyTree, opt_state: PyTree) -> TrainState:
        ema = jax.tree_util.tree_map(jnp.array, trainable)
        return cls(jnp.zeros((), jnp.int32), trainable, frozen, opt_state, ema)

    def as_dict(self) -> dict[str, PyTree]:
        """A plain-dict view for checkpointing."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, PyTree]) -> TrainState:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


jax.tree_util.register_dataclass(
    TrainState, data_fields=[f.name for f in dataclasses.fields(TrainState)], meta_fields=[]
)


def ema_decay(rate: float, num_updates: jax.Array, warmup: bool = True) -> jax.Array:
    """EMA decay with DPDM's warm-up: min(rate, (1 + n) / (10 + n)).

    ``num_updates`` counts the update being made (1 at the first), as the EMA of the
    official DPDM / score_sde code increments its counter before computing the decay."""
    n = num_updates.astype(jnp.float32)
    return jnp.minimum(rate, (1.0 + n) / (10.0 + n)) if warmup else jnp.asarray(rate)
