"""Ghost clipping: per-example gradient norms without per-example gradients.

The 'ghost' clipping path (``clipping_impl='ghost'``). It starts from the same single
backward pass as 'layerwise' (``layerwise.record``: every layer's inputs a_i and output
cotangents g_i, per example i), then works layer by layer without forming the
(B, *params) tensor of per-example gradients for the layers where that is expensive:

* Norms. For a dense or convolution kernel, example i's gradient is
  W_i = U_i^T g_i, where U_i (T x P_in) is the unfolded input (T output positions,
  copies included; P_in = C_in * kernel offsets) and g_i (T x C_out). Its squared
  Frobenius norm is the "ghost norm" (Goodfellow 2015; Li et al., ICLR 2022, Sec. 4):
      ||U_i^T g_i||_F^2 = sum_{t,s} (U_i U_i^T)_{ts} (g_i g_i^T)_{ts},
  which costs T^2 (P_in + C_out) per example instead of T P_in C_out and never holds
  a P_in x C_out matrix per example. As in mixed ghost clipping (Bu et al., "Scalable
  and efficient training of large convolutional neural networks with differential
  privacy", NeurIPS 2022, Sec. 3.2), each layer takes whichever is cheaper: the ghost
  norm when T (P_in + C_out) < P_in C_out (few positions, wide layers: low-resolution
  convolutions, attention and embedding projections), else the layer's per-example
  gradients exactly as 'layerwise' forms them. Biases, norm scales and embeddings
  (small leaves) always take the per-example route.
* The clipped sum. With clip factors c_i, sum_i c_i W_i = sum_i U_i^T (c_i g_i): for a
  ghost layer, ONE matrix product over all examples and positions per kernel offset
  (the "book-keeping" of Bu et al., ICML 2023: no second backward pass through the
  network, since every U_i and g_i is already recorded), which is the non-private
  backward pass's own weight-gradient product with the cotangent reweighted. For the
  other leaves, the per-example gradients are weighted and summed as in 'layerwise'.

Guarantees of ``norms_and_sum`` (the ClipResult is built by ``clipping.py`` from them):
* The norm of example i is the L2 norm over ALL trainable leaves of its gradient, equal
  to the reference path's (vmap of grad) up to float32 rounding, except that a
  ghost-normed kernel's part is an upper bound that includes its worst-case rounding
  (``_ghost_sq_norm``: positions that cancel would otherwise hide a large gradient;
  negligible where they do not). Tested against the reference, including leaves shared
  by several layer calls, which are never ghost-normed: their per-example gradient is
  the sum over calls, whose norm is not a sum of per-call norms.
* The clipped sum adds, for each example, ``factors[i]`` times exactly the gradient whose
  norm was measured, up to float32 rounding: the ghost Grams and the reweighted
  products use ``Precision.HIGHEST``, so a GPU's reduced-precision (TF32) matrix units
  cannot make the measured norm and the summed contribution disagree by more than
  float32 rounding. Rows with ``valid`` False contribute exactly 0, even if their inputs
  or cotangents are not finite (they are replaced by 0 before any product).
* It covers exactly the models 'layerwise' covers and refuses the others with the same
  ValueError (``layerwise.record``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from dpjax.privacy import layerwise, unfolding
from dpjax.privacy.compute_dtype import LossFn, PyTree

#: Which norm each eligible kernel gets: 'auto' (the cheaper, module docstring), 'ghost'
#: or 'per_example' (every eligible kernel; for tests and benchmarks).
GHOST_MODES = ("auto", "ghost", "per_example")

_HI = lax.Precision.HIGHEST


def ghost_is_cheaper(positions: int, p_in: int, p_out: int) -> bool:
    """T^2 (P_in + C_out) < T P_in C_out: the ghost norm's cost below the per-example
    gradient's (Bu et al. 2022, Sec. 3.2)."""
    return positions * (p_in + p_out) < p_in * p_out


# float32's unit roundoff, and a factor 2 of margin for matrix units whose HIGHEST
# precision is not IEEE float32 arithmetic step for step (a TPU's multi-pass bfloat16).
_UNIT_ROUNDOFF = 2.0**-24
_ROUNDOFF_MARGIN = 2.0


def _ghost_sq_norm(unfolded: unfolding.Unfolded) -> jax.Array:
    """(B,) an upper bound, under float32 rounding, on the squared norm of each example's
    kernel gradient W_i (the stack over offsets o of view(o)_i^T gg_i); float32
    operands (``Unfolded.as_float32``).

    The ghost norm sum_{t,s} (U_i U_i^T)_{ts} (g_i g_i^T)_{ts} sums terms of both signs:
    where the positions' contributions cancel (||W_i|| far below
    S_i = sum_t ||U_i[t]|| ||g_i[t]||), float32 rounding can make it far too small, even
    0, and the example would escape its clip (tests/test_ghost.py builds such a case:
    the raw sum was 8x below the exact norm). So the rounding error's worst case is
    added (Higham, "Accuracy and Stability of Numerical Algorithms", 2002, Sec. 3.1:
    a sum of n products errs by at most n u times the sum of their absolute values):
    each Gram entry by P_in u ||U_t|| ||U_s|| (resp. C_out u ||g_t|| ||g_s||), each
    times the other Gram's entry, and the sum of the T^2 products by T^2 u times their
    absolute sum. Then ghost + error >= ||W_i||^2. The clipped sum forms example i's
    share inside one product over B T positions (``_reweighted_kernel_sum``), within
    (B T + 2) u S_i of the exact W_i (backward error of that sum): that is added to the
    norm as well, so the clip factor bounds what is actually added.

    Where positions do not cancel, the bound is negligible: on the DPDM 'cpu' UNet with
    real Fashion-MNIST images, the norms of the 'auto' choice are at most 2.2e-7 above
    the reference's at init and 5.6e-7 after 360 DP steps in a micro-batch of 16, and
    1.7e-7 and 5.7e-6 in one of 649 (the 'cpu' experiment's; the share term grows with
    B T). Ghost norms forced on every kernel ('ghost' mode, 28 x 28 layers of 784
    positions included) are 1.04x to 4.0x the reference's at init and 1.08x to 1.7x
    after training: 'auto' never picks such layers (it takes a ghost norm only where
    T < min(P_in, C_out)). ``benchmarks/cpu/ghost_bound.py`` measures it.
    ||U_i[t]||^2 and ||g_i[t]||^2 are the Grams' diagonals; the bound adds a few
    elementwise passes over the (B, T, T) Grams."""
    b, t = unfolded.gg.shape[:2]
    uu = unfolded.fold(
        lambda acc, v: acc + jnp.einsum("btc,bsc->bts", v, v, precision=_HI),
        jnp.zeros((b, t, t), jnp.float32),
    )
    gg_gram = jnp.einsum("bto,bso->bts", unfolded.gg, unfolded.gg, precision=_HI)
    ghost_sq = jnp.maximum(jnp.sum(uu * gg_gram, axis=(1, 2)), 0.0)
    diag = lambda m: jnp.sqrt(jnp.maximum(jnp.diagonal(m, axis1=1, axis2=2), 0.0))  # noqa: E731
    nu, ng = diag(uu), diag(gg_gram)  # (B, T): ||U_i[t]||, ||g_i[t]||
    outer = lambda n: n[:, :, None] * n[:, None, :]  # noqa: E731
    p_in, c_out = unfolded.offsets * unfolded.c_in, unfolded.gg.shape[2]
    u = _ROUNDOFF_MARGIN * _UNIT_ROUNDOFF
    gram_error = jnp.sum(
        p_in * u * outer(nu) * jnp.abs(gg_gram)
        + c_out * u * jnp.abs(uu) * outer(ng)
        + (t * t + 2) * u * jnp.abs(uu * gg_gram),
        axis=(1, 2),
    )
    s = jnp.sum(nu * ng, axis=1)
    return jnp.square(jnp.sqrt(ghost_sq + gram_error) + (b * t + 2) * u * s)


def _reweighted_kernel_sum(
    unfolded: unfolding.Unfolded, weights: jax.Array, valid: jax.Array
) -> jax.Array:
    """(offsets, C_in, C_out): sum_i weights_i view(o)_i^T gg_i, invalid rows zeroed first."""
    keep = valid[:, None, None]
    wg = jnp.where(keep, unfolded.gg, 0.0) * weights[:, None, None]
    return unfolded.map(
        lambda v: jnp.einsum("btc,bto->co", jnp.where(keep, v, 0.0), wg, precision=_HI)
    )


def _ghost_calls(
    rec: layerwise.Recording, unfolded: list[unfolding.Unfolded | None], mode: str
) -> set[int]:
    """Indices of the calls whose kernel is ghost-normed: a Dense, Conv or ConvTranspose
    call with a trainable kernel, none of whose leaves is used by another call, and (in
    'auto') for which ``ghost_is_cheaper``."""
    if mode not in GHOST_MODES:
        raise ValueError(f"Unknown ghost mode '{mode}': use one of {list(GHOST_MODES)}.")
    uses = Counter(i for call in rec.calls for i in call.leaf_ids)
    chosen = set()
    for j, call in enumerate(rec.calls):
        if mode == "per_example" or "kernel" not in call.names:
            continue
        if not all(uses[i] == 1 for i in call.leaf_ids):
            continue
        u = unfolded[j]
        if u is None:
            continue
        positions, p_in, p_out = u.gg.shape[1], u.offsets * u.c_in, u.gg.shape[2]
        if mode == "ghost" or ghost_is_cheaper(positions, p_in, p_out):
            chosen.add(j)
    return chosen


def ghosted_fraction(
    loss_fn: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    examples: PyTree,
    mask: jax.Array,
    keys: jax.Array,
    mode: str = "auto",
) -> float:
    """The fraction of trainable parameters whose per-example gradients ``norms_and_sum``
    never forms (ghost-normed kernels), for these shapes; traced, nothing is computed."""
    holder = {}

    def trace(t, f, e, m, k):
        rec = layerwise.record(loss_fn, t, f, e, m, k)
        unfolded = [layerwise.unfold(rec, j) for j in range(len(rec.calls))]
        holder["rec"], holder["chosen"] = rec, _ghost_calls(rec, unfolded, mode)
        return 0

    jax.eval_shape(trace, trainable, frozen, examples, mask, keys)
    rec, chosen = holder["rec"], holder["chosen"]
    kernels = {dict(zip(rec.calls[j].names, rec.calls[j].leaf_ids))["kernel"] for j in chosen}
    total = sum(leaf.size for leaf in rec.leaves)
    return sum(rec.leaves[i].size for i in kernels) / max(total, 1)


def norms_and_sum(
    loss_fn: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    examples: PyTree,
    mask: jax.Array,
    keys: jax.Array,
    mode: str = "auto",
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array, Callable[[jax.Array, jax.Array], PyTree]]:
    """Per-example losses, aux values and gradient norms, and the clipped summer.

    Args:
      loss_fn, trainable, frozen, examples, mask, keys: as in ``clipping.clipped_grad_sum``.
      mode: one of ``GHOST_MODES``.

    Returns:
      (loss (B,), aux {name: (B,)}, norms (B,) float32, summer) where
      ``summer(weights (B,), valid (B,) bool)`` returns the float32 pytree
      sum_i weights_i grad_i over rows with valid True (see the module docstring).

    Raises:
      ValueError: an unknown mode, or a model 'layerwise' cannot cover.
    """
    if mode not in GHOST_MODES:  # before tracing anything
        raise ValueError(f"Unknown ghost mode '{mode}': use one of {list(GHOST_MODES)}.")
    rec = layerwise.record(loss_fn, trainable, frozen, examples, mask, keys)
    unfolded = [layerwise.unfold(rec, j) for j in range(len(rec.calls))]
    chosen = _ghost_calls(rec, unfolded, mode)
    sq = jnp.zeros(rec.loss.shape, jnp.float32)
    per_example: dict[int, jax.Array] = {}  # leaf index -> (B, *shape), summed over calls
    ghosts: list[tuple[int, unfolding.Unfolded]] = []  # (kernel leaf, its layer's input)
    for j, call in enumerate(rec.calls):
        names = dict(zip(call.names, call.leaf_ids))
        if j in chosen:
            # Widened (exactly) to float32: the rounding bound of ``_ghost_sq_norm`` and
            # the reweighted cotangent of ``_reweighted_kernel_sum`` are float32's.
            u = unfolded[j].as_float32()
            sq = sq + _ghost_sq_norm(u)
            ghosts.append((names["kernel"], u))
            if "bias" in names:  # the bias gradient of example i is sum_t g_i[t]
                per_example[names["bias"]] = jnp.sum(u.gg, axis=1)
            continue
        for name, g in layerwise.call_grads(rec, j, unfolded[j]).items():
            i = names[name]
            per_example[i] = per_example[i] + g if i in per_example else g
    for g in per_example.values():
        sq = sq + jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1)

    def summer(weights: jax.Array, valid: jax.Array) -> PyTree:
        out: list[jax.Array | None] = [None] * len(rec.leaves)
        for i, g in per_example.items():
            keep = valid.reshape((-1,) + (1,) * (g.ndim - 1))
            out[i] = jnp.einsum("b,b...->...", weights, jnp.where(keep, g, 0.0), precision=_HI)
        for i, u in ghosts:
            kernel = _reweighted_kernel_sum(u, weights, valid)
            out[i] = kernel.reshape(rec.leaves[i].shape)
        return jax.tree_util.tree_unflatten(rec.treedef, out)

    return rec.loss, rec.aux, jnp.sqrt(sq), summer
