"""Choosing the micro-batch size of the DP step from the memory available.

The micro-batch size m only decides how many examples are clipped in one vectorized
chunk: the clipped sum, the noise and the accounting do not depend on it (clipping.py).
So it can be tuned freely for speed; the largest m that fits in memory is usually the
fastest, because per-kernel overheads are paid once per micro-batch.

``auto_microbatch_size`` compiles the per-micro-batch work once at a small probe size,
reads the compiled executable's temporary memory, and extrapolates linearly. Treating the
probe's whole temporary memory as per-example cost over-estimates the fixed part (counted
m/probe times), but the per-example part can itself grow with m (XLA schedules a larger
micro-batch differently; a review of 2026-12-07 saw it grow for the DPDM UNet at K = 32
on the CPU), so the extrapolation is not a bound: the budget's fraction of the free
memory (0.7) is the margin.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from dpjax.privacy import clipping

PyTree = Any


@dataclasses.dataclass(frozen=True)
class MicrobatchChoice:
    """The chosen size and the numbers behind it (for the log)."""

    size: int
    bytes_per_example: float
    budget_bytes: int
    probe: int


def memory_budget_bytes(fraction: float = 0.7, device: jax.Device | None = None) -> int:
    """``fraction`` of the device memory not in use now (accelerators), or of half the
    physical memory (CPU, where the allocator reports no limit)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(fraction * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(fraction * physical / 2)


def probe_bytes_per_example(
    method: Any,
    trainable: PyTree,
    frozen: PyTree,
    image_shape: tuple[int, ...],
    clipping_impl: str,
    probe: int = 8,
    compute_dtype: str = "float32",
) -> float:
    """Temporary memory of one compiled micro-batch of ``probe`` examples, per example."""
    examples = {
        "image": jax.ShapeDtypeStruct((probe, *image_shape), jnp.float32),
        "label": jax.ShapeDtypeStruct((probe,), jnp.int32),
    }
    mask = jax.ShapeDtypeStruct((probe,), jnp.bool_)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.PRNGKey(0), probe))

    def one(t, f, e, m, k):
        return clipping.clipped_grad_sum(
            method.loss_per_example, t, f, e, m, k,
            clip_norm=1.0, microbatch_size=probe, impl=clipping_impl,
            compute_dtype=compute_dtype, routing=clipping.routing_of(method),
        )  # fmt: skip

    compiled = jax.jit(one).lower(trainable, frozen, examples, mask, keys).compile()
    analysis = compiled.memory_analysis()
    temp = getattr(analysis, "temp_size_in_bytes", 0) if analysis is not None else 0
    return float(temp) / probe


def largest_fitting_size(bytes_per_example: float, budget_bytes: int, max_size: int) -> int:
    """The largest power of two <= ``max_size`` with size * bytes_per_example <= budget (>= 1)."""
    size = 1
    while size * 2 <= max_size and size * 2 * bytes_per_example <= budget_bytes:
        size *= 2
    return size


def auto_microbatch_size(
    method: Any,
    trainable: PyTree,
    frozen: PyTree,
    image_shape: tuple[int, ...],
    clipping_impl: str,
    max_size: int,
    budget_bytes: int | None = None,
    probe: int = 8,
    compute_dtype: str = "float32",
) -> MicrobatchChoice:
    """The micro-batch size for ``clipping.clipped_grad_sum`` that fits the memory budget.

    Args:
      method: the method whose ``loss_per_example`` is clipped.
      trainable, frozen: parameters (arrays or ShapeDtypeStructs).
      image_shape: one example's image shape.
      clipping_impl: 'vmap', 'layerwise' or 'ghost'.
      max_size: upper bound (e.g. the expected batch size per device).
      budget_bytes: memory for one micro-batch's temporaries; default
        ``memory_budget_bytes()``.
      probe: the size compiled to measure the memory.
      compute_dtype: the DP step's compute dtype (bfloat16 needs less memory).

    Returns:
      A MicrobatchChoice whose ``size`` is a power of two in [1, max_size].
    """
    budget = memory_budget_bytes() if budget_bytes is None else int(budget_bytes)
    per_example = probe_bytes_per_example(
        method, trainable, frozen, image_shape, clipping_impl, probe, compute_dtype
    )
    size = largest_fitting_size(per_example, budget, max(1, int(max_size)))
    return MicrobatchChoice(size, per_example, budget, probe)


def with_auto_size(
    cfg: Any, method: Any, params: Any, image_shape: tuple[int, ...],
    per_device_batch: float, log: Any = print,
) -> Any:
    """``cfg`` (a ``RunConfig``) with ``dp.microbatch_size`` set by ``auto_microbatch_size``
    for its ``dp.clipping`` path and compute dtype (``params``: a ``Params`` pair).

    Capped at a quarter of ``per_device_batch`` (the expected batch per device), so that
    the last, partly padded micro-batch of a Poisson batch costs at most about 1/8 of a
    step on average.
    """
    choice = auto_microbatch_size(
        method,
        params.trainable,
        params.frozen,
        image_shape,
        cfg.dp.clipping,
        max_size=max(1, int(per_device_batch // 4)),
        compute_dtype=cfg.dp.compute_dtype,
    )
    log(
        f"[dpjax] micro-batch size {choice.size} (auto: {choice.bytes_per_example / 2**20:.1f} "
        f"MiB per example measured at {choice.probe}, budget {choice.budget_bytes / 2**30:.1f} GiB)"
    )
    return dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, microbatch_size=choice.size))
