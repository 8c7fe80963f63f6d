"""Per-example gradient clipping: the clipped-gradient SUM over the trainable subtree.

Guarantees of ``clipped_grad_sum`` (the reference path, vmap of grad):
* Each example's gradient is taken w.r.t. ``trainable`` only (frozen parameters are
  closed over and never differentiated), over its whole loss, so any repetition the loss
  averages (noise draws, augmentations, timesteps) is inside the unit of clipping.
* Each example's gradient is scaled by min(1, C / ||g||_2), where the norm is over ALL
  trainable leaves together (flat clipping, Abadi et al. 2016, Alg. 1 line "clip"), so its
  contribution has norm <= C up to float32 rounding (a few ulps: 1.3e-7 relative at
  most over 4,096 rows in the docstring audit; far below what the noise hides).
* Padding rows (mask False) and rows whose loss or gradient norm is not finite contribute
  exactly 0, not NaN.
* Hence replacing, removing or padding out one example changes the sum by at most
  ``sensitivity(C, relation)``: C for add/remove (and zero-out), 2C for replace-one.
* Clipping and summation happen in float32 whatever the compute dtype: with
  ``compute_dtype='bfloat16'`` the loss's forward and backward arithmetic runs in
  bfloat16 (``compute_dtype.in_compute_dtype``), but the parameters stay float32 and
  the cast sits inside the differentiated function, so each per-example gradient
  arrives in float32 and its norm, the clip, the sum (and the noise, ``dp_step.py``) are
  float32. The 'layerwise' and 'ghost' paths are given the parameters already cast
  (``compute_dtype.cast_params``) and multiply the layers' bfloat16 inputs and
  cotangents with float32 accumulation (``dpjax.privacy.unfolding``: the products are
  exact, the per-example gradients float32). The sensitivity bound does not depend on
  how the per-example gradient was computed.
* Three implementations give the same result up to rounding: 'vmap' (vmap of grad, the
  reference), 'layerwise' (per-example gradients from layer inputs and output
  cotangents of one ordinary backward pass; see ``dpjax.privacy.layerwise``) and 'ghost'
  (the same pass, then per-example norms without per-example gradients where cheaper,
  and the clipped sum as one reweighted product per layer; ``dpjax.privacy.ghost``).
  'layerwise' and 'ghost' refuse models they cannot cover exactly.
* Examples are processed in micro-batches of ``microbatch_size`` inside one traced loop
  whose trip count is the number of micro-batches holding real examples, so a logical
  batch far larger than memory (DPDM: 4096 examples x 32 noise draws) fits, and
  all-padding micro-batches cost nothing.
* On the CPU backend a few micro-batches are instead unrolled (``unroll``; why and when:
  ``dpjax.privacy.microbatch_loop``): the same sum in the same order.
* Routed examples (``routing``, e.g. DP-LFlow's one model per class): when every example
  reads only ONE slice ``r(x)`` of the trainable tree's leading axis, its gradient is zero
  on every other slice, so its norm over the whole tree is the norm over its slice. The
  routed path differentiates w.r.t. that slice only, clips it to C and adds it into slice
  ``r(x)`` of the sum (a segment sum): the same sum as the reference path on the whole
  tree, with per-example gradients 1/K the size. An example whose route is out of range
  contributes 0 (counted as dropped), never a gradient on a slice it does not own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from dpjax.privacy import ghost, layerwise
from dpjax.privacy.compute_dtype import (
    LossFn,
    PyTree,
    cast_params,
    check_compute_dtype,
    in_compute_dtype,
)
from dpjax.privacy.microbatch_loop import unroll_by_default


def sensitivity(clip_norm: float, relation: str = "add_or_remove_one") -> float:
    """L2 sensitivity of the clipped-gradient sum under a neighbouring relation."""
    return 2.0 * clip_norm if relation == "replace_one" else clip_norm


@dataclasses.dataclass(frozen=True)
class ClipResult:
    """Output of ``clipped_grad_sum``.

    Attributes:
      grad_sum: sum over real, finite examples of their clipped gradients (float32).
      loss_sum: sum of the per-example losses over the same examples (NOT private: a
        release if logged; label it so).
      aux_sum: sums of the per-example auxiliary scalars over the same examples.
      norms: (P,) pre-clipping gradient norms; NaN for padding rows.
      num_valid: number of examples that contributed.
      num_clipped: number of examples whose norm exceeded C.
      num_nonfinite: number of real examples dropped for a non-finite loss or gradient
        norm (including a finite gradient whose float32 norm overflows, ``global_norms``).
    """

    grad_sum: PyTree
    loss_sum: jax.Array
    aux_sum: dict[str, jax.Array]
    norms: jax.Array
    num_valid: jax.Array
    num_clipped: jax.Array
    num_nonfinite: jax.Array


jax.tree_util.register_dataclass(
    ClipResult,
    data_fields=[f.name for f in dataclasses.fields(ClipResult)],
    meta_fields=[],
)


@dataclasses.dataclass(frozen=True)
class Routing:
    """Examples that each read one slice of every trainable leaf's leading axis.

    Attributes:
      num_routes: K, the size of every trainable leaf's leading axis.
      route: ``route(example) -> int32 scalar`` in [0, K): the slice ONE example reads.
      loss: ``loss(part, frozen, example, key) -> (loss, aux)`` of ONE example given only
        its slice ``tree_map(lambda p: p[route(example)], trainable)``. It must equal the
        method's loss on the whole tree (which reads that slice and nothing else).
    """

    num_routes: int
    route: Callable[[PyTree], jax.Array]
    loss: LossFn


def routing_of(method: Any) -> Routing | None:
    """``method.routing()``; None for an object without the hook (``audit.CanaryMethod``,
    whose canary rows do not follow the wrapped method's routes: the reference path)."""
    return method.routing() if hasattr(method, "routing") else None


def global_norms(per_example_grads: PyTree) -> jax.Array:
    """(B,) L2 norm of each example's gradient over all leaves, in float32.

    The squares are summed in float32 without rescaling (no extra pass over the
    per-example gradients), so a norm above about 1.8e19 (sqrt of float32's largest
    value) comes out Inf: ``_finish`` then drops that row like a non-finite one (it adds
    0, never more than C, so the guarantee holds; only a diverged run has such norms)."""
    sq = [
        jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
        for g in jax.tree_util.tree_leaves(per_example_grads)
    ]
    return jnp.sqrt(sum(sq))


def clip_factors(norms: jax.Array, valid: jax.Array, clip_norm: float | None) -> jax.Array:
    """min(1, C/||g||) for valid rows, 0 for others; 1 for valid rows when C is None."""
    if clip_norm is None:
        return valid.astype(jnp.float32)
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-30))
    return jnp.where(valid, scale, 0.0)


def weighted_sum(per_example_grads: PyTree, weights: jax.Array, valid: jax.Array) -> PyTree:
    """sum_b weights_b * g_b in float32; rows with valid False are replaced by 0 first.

    The contraction runs at ``Precision.HIGHEST``: at the default precision a GPU's matrix
    units round g_b and weights_b to TF32 (10-bit mantissa) first, so the added
    contribution could exceed the clip norm measured on the float32 g_b by ~0.1%."""

    def one(g):
        g = g.astype(jnp.float32)
        keep = valid.reshape((-1,) + (1,) * (g.ndim - 1))
        return jnp.einsum(
            "b,b...->...", weights, jnp.where(keep, g, 0.0), precision=lax.Precision.HIGHEST
        )

    return jax.tree_util.tree_map(one, per_example_grads)


def _routed_sum(
    per_example_grads: PyTree, weights: jax.Array, valid: jax.Array, routes: jax.Array, k: int
) -> PyTree:
    """(k, ...) leaves: slice r is sum over rows b with routes[b] == r of weights_b g_b."""

    def one(g):
        g = g.astype(jnp.float32)
        keep = valid.reshape((-1,) + (1,) * (g.ndim - 1))
        w = weights.reshape(keep.shape)
        return jax.ops.segment_sum(jnp.where(keep, w * g, 0.0), routes, num_segments=k)

    return jax.tree_util.tree_map(one, per_example_grads)


def _microbatch_vmap(
    loss_fn: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    examples: PyTree,
    mask: jax.Array,
    keys: jax.Array,
    clip_norm: float | None,
) -> ClipResult:
    """The reference path on one micro-batch: vmap of grad, then clip and sum."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, aux), grads = jax.vmap(grad_fn, in_axes=(None, None, 0, 0))(
        trainable, frozen, examples, keys
    )
    return _clip_and_sum(loss, aux, grads, mask, clip_norm)


def _microbatch_routed(
    routing: Routing,
    trainable: PyTree,
    frozen: PyTree,
    examples: PyTree,
    mask: jax.Array,
    keys: jax.Array,
    clip_norm: float | None,
) -> ClipResult:
    """The routed path on one micro-batch (module docstring): vmap of grad w.r.t. each
    example's own slice, clipped, then summed into that slice."""
    k = routing.num_routes
    routes = jax.vmap(routing.route)(examples).astype(jnp.int32)
    in_range = (routes >= 0) & (routes < k)
    routes = jnp.where(in_range, routes, 0)

    def one(example, key, r):
        part = jax.tree_util.tree_map(lambda p: p[r], trainable)
        grad_fn = jax.value_and_grad(routing.loss, has_aux=True)
        return grad_fn(part, frozen, example, key)

    (loss, aux), grads = jax.vmap(one)(examples, keys, routes)
    # An out-of-range route is a dropped example: NaN loss, so it is counted, not summed.
    loss = jnp.where(in_range, loss, jnp.nan)
    return _clip_and_sum(loss, aux, grads, mask, clip_norm, routes=routes, num_routes=k)


def _clip_and_sum(
    loss: jax.Array,
    aux: dict[str, jax.Array],
    grads: PyTree,
    mask: jax.Array,
    clip_norm: float | None,
    routes: jax.Array | None = None,
    num_routes: int = 0,
) -> ClipResult:
    """Clips (B, ...) per-example gradients to C and sums the real, finite rows; with
    ``routes``, row b is added into slice ``routes[b]`` of a (num_routes, ...) sum."""
    if routes is None:
        summer = lambda w, v: weighted_sum(grads, w, v)  # noqa: E731
    else:
        summer = lambda w, v: _routed_sum(grads, w, v, routes, num_routes)  # noqa: E731
    return _finish(loss, aux, global_norms(grads), mask, clip_norm, summer)


def _finish(
    loss: jax.Array,
    aux: dict[str, jax.Array],
    norms: jax.Array,
    mask: jax.Array,
    clip_norm: float | None,
    summer: Callable[[jax.Array, jax.Array], PyTree],
) -> ClipResult:
    """The clip and the sum, given per-example norms: rows are valid when real and finite
    (loss and norm), their factor is ``clip_factors``, and ``summer(factors, valid)``
    must return sum_b factors_b g_b over the valid rows, g_b being exactly the gradient
    whose norm is ``norms[b]``."""
    finite = jnp.isfinite(norms) & jnp.isfinite(loss)
    valid = mask & finite
    factors = clip_factors(norms, valid, clip_norm)
    zero = jnp.zeros_like(loss, dtype=jnp.float32)
    limit = jnp.inf if clip_norm is None else clip_norm
    return ClipResult(
        grad_sum=summer(factors, valid),
        loss_sum=jnp.sum(jnp.where(valid, loss, zero)),
        aux_sum={k: jnp.sum(jnp.where(valid, v, zero)) for k, v in aux.items()},
        norms=jnp.where(mask, norms, jnp.nan),
        num_valid=jnp.sum(valid.astype(jnp.int32)),
        num_clipped=jnp.sum((valid & (norms > limit)).astype(jnp.int32)),
        num_nonfinite=jnp.sum((mask & ~finite).astype(jnp.int32)),
    )


def _microbatch_layerwise(
    loss_fn: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    examples: PyTree,
    mask: jax.Array,
    keys: jax.Array,
    clip_norm: float | None,
) -> ClipResult:
    """The fast path on one micro-batch: per-example gradients layer by layer.

    Per-example gradients come from one ordinary backward pass (``layerwise``); the
    clipping, the finite check and the weighted sum are the reference path's own
    functions, so the two paths differ only in how the per-example gradients are formed.
    """
    loss, aux, grads = layerwise.per_example_grads(loss_fn, trainable, frozen, examples, mask, keys)
    return _clip_and_sum(loss, aux, grads, mask, clip_norm)


def _microbatch_ghost(
    loss_fn: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    examples: PyTree,
    mask: jax.Array,
    keys: jax.Array,
    clip_norm: float | None,
) -> ClipResult:
    """The ghost path on one micro-batch (``dpjax.privacy.ghost``): per-example norms
    without per-example gradients where that is cheaper, then the clipped sum as one
    reweighted product per layer; the clip and the finite check are the reference's."""
    loss, aux, norms, summer = ghost.norms_and_sum(loss_fn, trainable, frozen, examples, mask, keys)
    return _finish(loss, aux, norms, mask, clip_norm, summer)


def _microbatch_summed(
    loss_fn: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    examples: PyTree,
    mask: jax.Array,
    keys: jax.Array,
    clip_norm: float | None,
) -> ClipResult:
    """Non-private training only (``clip_norm`` None): the gradient of the summed loss of
    the real rows, from ONE backward pass; no per-example gradient is formed, so there
    are no per-example norms (NaN). A non-finite loss makes the sum non-finite, and the
    train loop stops on it."""
    if clip_norm is not None:
        raise ValueError("The summed-gradient path is for non-private training only.")

    def total(tr):
        loss, aux = jax.vmap(loss_fn, in_axes=(None, None, 0, 0))(tr, frozen, examples, keys)
        w = mask.astype(loss.dtype)
        return jnp.sum(w * loss), (loss, aux)

    (loss_sum, (loss, aux)), grad = jax.value_and_grad(total, has_aux=True)(trainable)
    finite = jnp.isfinite(loss)
    zero = jnp.zeros_like(loss, dtype=jnp.float32)
    return ClipResult(
        grad_sum=grad,
        loss_sum=loss_sum,
        aux_sum={k: jnp.sum(jnp.where(mask, v, zero)) for k, v in aux.items()},
        norms=jnp.full(mask.shape, jnp.nan, jnp.float32),
        num_valid=jnp.sum(mask.astype(jnp.int32)),
        num_clipped=jnp.zeros((), jnp.int32),
        num_nonfinite=jnp.sum((mask & ~finite).astype(jnp.int32)),
    )


MICROBATCH_IMPLS: dict[str, Callable[..., ClipResult]] = {
    "vmap": _microbatch_vmap,
    "layerwise": _microbatch_layerwise,
    "ghost": _microbatch_ghost,
}

def clipped_grad_sum(
    loss_fn: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    examples: PyTree,
    mask: jax.Array,
    keys: jax.Array,
    *,
    clip_norm: float | None,
    microbatch_size: int,
    num_real: jax.Array | int | None = None,
    impl: str = "vmap",
    compute_dtype: str = "float32",
    unroll: bool | None = None,
    routing: Routing | None = None,
) -> ClipResult:
    """Sum over examples of per-example gradients clipped to ``clip_norm``.

    Args:
      loss_fn: ``loss_fn(trainable, frozen, example, key) -> (loss, aux)`` for ONE example.
      trainable: the differentiated parameters.
      frozen: parameters that are passed through but never differentiated.
      examples: pytree of arrays with leading axis P, a multiple of ``microbatch_size``.
      mask: (P,) bool, True for real examples. Real examples must come first.
      keys: (P,) PRNG keys, one per example.
      clip_norm: C; None disables clipping (non-private public training only: then the
        sum comes from one backward pass of the summed loss, and ``norms`` are NaN).
      microbatch_size: examples per vectorized chunk.
      num_real: number of real examples (default: P); micro-batches past it are skipped.
      impl: the per-micro-batch implementation (see ``MICROBATCH_IMPLS``).
      compute_dtype: the loss's arithmetic dtype (``compute_dtype.COMPUTE_DTYPES``; see
        ``compute_dtype.in_compute_dtype``). Gradients, norms, clipping and the sum stay
        float32.
      unroll: True: a Python loop over all micro-batches (no early stop; padding rows
        still contribute 0); False: a ``fori_loop`` that stops after the last real one;
        None: ``unroll_by_default`` (unrolled on CPU, where loop bodies are slow).
      routing: examples that each read one slice of the trainable tree (``Routing``):
        with clipping, per-example gradients are taken w.r.t. that slice only and
        summed into it (module docstring); the result is the reference path's. Needs
        ``impl='vmap'``. Without clipping it is not used (``loss_fn`` is).

    Returns:
      A ClipResult; see its docstring.

    Raises:
      ValueError: a batch that is not a whole number of micro-batches, an unknown
        implementation or dtype, or ``routing`` with an implementation other than 'vmap'.
    """
    size = mask.shape[0]
    m = microbatch_size
    if size % m:
        raise ValueError(f"batch size {size} is not a multiple of the micro-batch size {m}.")
    if impl not in MICROBATCH_IMPLS:
        raise ValueError(f"Unknown clipping implementation '{impl}': {list(MICROBATCH_IMPLS)}.")
    check_compute_dtype(compute_dtype)
    loss_fn = in_compute_dtype(loss_fn, compute_dtype)
    if clip_norm is not None and impl in ("layerwise", "ghost"):
        # Their layers must see the parameters they are given (compute_dtype.cast_params);
        # their per-example gradients come out float32 all the same.
        trainable = cast_params(trainable, compute_dtype)
    # Without clipping (public training) per-example gradients are not needed at all.
    one_mb = _microbatch_summed if clip_norm is None else MICROBATCH_IMPLS[impl]
    if routing is not None and clip_norm is not None:
        if impl != "vmap":
            raise ValueError(
                f"Routed examples (one model slice per example) need impl='vmap', got '{impl}'."
            )
        routed = dataclasses.replace(routing, loss=in_compute_dtype(routing.loss, compute_dtype))
        one_mb = lambda _, *args: _microbatch_routed(routed, *args)  # noqa: E731
    num_mb = size // m

    def take(x, i):
        return lax.dynamic_slice_in_dim(x, i * m, m, axis=0)

    def run(i):
        return one_mb(
            loss_fn,
            trainable,
            frozen,
            jax.tree_util.tree_map(lambda x: take(x, i), examples),
            take(mask, i),
            take(keys, i),
            clip_norm,
        )

    if num_mb == 1:
        return run(0)

    first = jax.eval_shape(lambda: run(0))
    init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), first)
    init = dataclasses.replace(init, norms=jnp.full((size,), jnp.nan, jnp.float32))

    def body(i, acc: ClipResult) -> ClipResult:
        r = run(i)
        summed = jax.tree_util.tree_map(
            jnp.add,
            dataclasses.replace(acc, norms=None),
            dataclasses.replace(r, norms=None),
        )
        norms = lax.dynamic_update_slice_in_dim(acc.norms, r.norms, i * m, axis=0)
        return dataclasses.replace(summed, norms=norms)

    if unroll_by_default(num_mb) if unroll is None else unroll:
        acc = init
        for i in range(num_mb):
            acc = body(i, acc)
        return acc
    if num_real is None:
        trips = num_mb
    else:
        trips = jnp.minimum((jnp.asarray(num_real, jnp.int32) + m - 1) // m, num_mb)
    return lax.fori_loop(0, trips, body, init)
