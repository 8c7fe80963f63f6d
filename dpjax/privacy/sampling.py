"""Poisson sampling with static, padded shapes.

Guarantees:
* Each example enters the batch of step t independently with probability q (Poisson
  sampling, the subsampling that ``accounting.dpsgd_event`` accounts for).
* The batch of step t depends only on (seed, t), so a resumed run replays exactly the
  batches of an uninterrupted run.
* No example is ever dropped: batches are padded with index -1 (mask False) to a
  multiple of the micro-batch size and to at least a fixed size chosen so that larger
  batches are very rare; a larger batch gets a larger padded shape (one more compile),
  never truncation.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class PaddedBatch:
    """Indices of one Poisson batch, padded to a static size.

    Attributes:
      indices: int32 (P,), dataset indices first, then -1 for padding.
      mask: bool (P,), True for real examples.
      num_real: the realized batch size (<= P).
    """

    indices: np.ndarray
    mask: np.ndarray
    num_real: int


class PoissonSampler:
    """Poisson sampler over ``num_examples`` examples with rate ``rate``."""

    def __init__(
        self,
        num_examples: int,
        rate: float,
        seed: int,
        multiple: int = 1,
        tail_stds: float = 6.0,
    ):
        """Args:
        num_examples: N.
        rate: q.
        seed: the data-sampling seed (a stream of its own).
        multiple: padded sizes are multiples of this (the micro-batch size).
        tail_stds: the base padded size is N*q plus this many binomial std deviations
          (plus one), so that a larger batch, which gets a larger padded size and a
          recompile, is rare: about 1e-9 per step where the normal approximation holds
          (large N*q), more for small expected batches (4.7e-8 at N*q = 16, 1.1e-6 at
          N*q = 1, exact binomial tails). A larger batch is never cut.
        """
        if not 0 < rate <= 1:
            raise ValueError(f"rate must be in (0, 1], got {rate}.")
        self.num_examples = int(num_examples)
        self.rate = float(rate)
        self.seed = int(seed)
        self.multiple = max(1, int(multiple))
        mean = num_examples * rate
        std = math.sqrt(num_examples * rate * (1 - rate))
        base = min(num_examples, math.ceil(mean + tail_stds * std + 1))
        self.base_size = self._round_up(max(base, 1))

    def _round_up(self, n: int) -> int:
        return int(math.ceil(n / self.multiple) * self.multiple)

    def indices(self, step: int) -> np.ndarray:
        """The sorted dataset indices sampled at ``step``; depends only on (seed, step)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(step)]))
        return np.flatnonzero(rng.random(self.num_examples) < self.rate).astype(np.int32)

    def padded_size(self, num_real: int) -> int:
        """The static size a batch of ``num_real`` examples is padded to."""
        return max(self.base_size, self._round_up(max(num_real, 1)))

    def batch(self, step: int) -> PaddedBatch:
        """The padded batch of ``step``."""
        idx = self.indices(step)
        size = self.padded_size(len(idx))
        indices = np.full((size,), -1, np.int32)
        indices[: len(idx)] = idx
        mask = np.zeros((size,), bool)
        mask[: len(idx)] = True
        return PaddedBatch(indices, mask, len(idx))
