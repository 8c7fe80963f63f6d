"""How ``clipping.clipped_grad_sum`` iterates its micro-batches: a loop, or unrolled.

``dp.microbatch_loop`` ('auto', 'unroll' or 'loop') gives ``clipped_grad_sum`` its
``unroll`` argument (``unroll_setting``). Either way the micro-batch sums are added in
the same order; only the compiled program differs, so results agree up to float32
rounding (XLA may fuse the two programs differently; tested to 1e-5 relative).

* 'loop': a ``fori_loop`` whose trip count is the number of micro-batches holding real
  examples, so all-padding micro-batches cost nothing.
* 'auto' (``unroll_by_default``): on the CPU backend a batch of at most
  ``MAX_UNROLLED_MICROBATCHES`` micro-batches is unrolled: XLA:CPU rewrites convolutions
  into its fast (Eigen) layout only in the entry computation, so the backward
  convolutions inside a loop or cond body run on a slow fallback: 11-17x slower on the
  f=4 KL autoencoder, 4 micro-batches of 16 (``benchmarks/cpu/microbatch_loop.py``).
  Unrolled, the all-padding micro-batches are computed and masked out (they still
  contribute 0). Many unrolled copies are slower than the loop (DP-LFlow, 22
  micro-batches of 250: 49 s per step unrolled, 34 s looped), hence the small limit.
  Elsewhere: the loop.
"""

from __future__ import annotations

import jax

#: The most micro-batches ``clipped_grad_sum`` unrolls (each copy adds compile time).
MAX_UNROLLED_MICROBATCHES = 8


#: ``dp.microbatch_loop`` settings and the ``unroll`` argument each gives.
MICROBATCH_LOOPS: dict[str, bool | None] = {"auto": None, "unroll": True, "loop": False}


def unroll_setting(microbatch_loop: str) -> bool | None:
    """The ``unroll`` argument of ``clipped_grad_sum`` for a ``dp.microbatch_loop`` value.

    Raises:
      ValueError: an unknown value.
    """
    if microbatch_loop not in MICROBATCH_LOOPS:
        raise ValueError(
            f"dp.microbatch_loop must be one of {list(MICROBATCH_LOOPS)}, got {microbatch_loop!r}."
        )
    return MICROBATCH_LOOPS[microbatch_loop]


def unroll_by_default(num_microbatches: int) -> bool:
    """Whether ``clipped_grad_sum(unroll=None)`` unrolls ``num_microbatches``: on the CPU
    backend up to ``MAX_UNROLLED_MICROBATCHES`` (see the module docstring), else never."""
    return jax.default_backend() == "cpu" and 1 < num_microbatches <= MAX_UNROLLED_MICROBATCHES
