"""make_train_step: the one jitted update every DP-SGD method uses.

One call of the returned step function performs exactly one DP-SGD step of the plan
(Abadi et al. 2016, Alg. 1, with Poisson sampling):

1. gathers the Poisson batch (indices from ``sampling.PoissonSampler``; padding -1),
2. per-example gradients of ``method.loss_per_example`` w.r.t. the trainable subtree,
   clipped to C over all trained leaves and summed (``clipping.clipped_grad_sum``),
   padding and non-finite rows contributing 0,
3. adds N(0, (sigma C)^2) from the noise stream (``fold_in(noise, step)``),
4. divides by the public expected batch size N*q (never the realized size),
5. adds the gradient of ``method.public_loss`` (data-independent), applies the optax
   update and the EMA.

With ``plan.enabled == False`` (public pre-training) steps 2-4 become the plain mean
gradient over the real examples, through the same code.

Data parallel (``mesh`` given, a ``jax.sharding.Mesh`` with a ``'data'`` axis): only
step 2 is distributed. Each device runs ``clipping.clipped_grad_sum`` on its shard of
the padded batch (its own count of real rows for the early stop), then the sums and
counts are ``psum``-ed over ``'data'``. Steps 3-5 run on the replicated sum inside the
same jit, so the Gaussian noise is drawn ONCE per logical step from the same noise key
as on one device, never once per device. Guarantees on S devices, for the same state,
streams and Poisson batch (its rows dealt to the devices in any way that leaves each
device's real rows before its padding, as ``parallel.deal_batch`` does: the
micro-batch loop stops after a device's last real row, so a padding row before a real
one would leave that real row out):
the same per-example clipping, the same sensitivity, the same single noise draw and
the same division by N*q as on one device, so the same accounting; the update equals
the one-device update up to float summation order, and rounding in the compute dtype
(with ``dp.compute_dtype=bfloat16`` the sharded and one-device programs are fused
differently: about 1e-4 relative, against about 1e-7 in float32, in the replay audit).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpjax.methods.base import to_model_range
from dpjax.privacy import clipping, private_gradient
from dpjax.privacy.compute_dtype import check_compute_dtype
from dpjax.privacy.microbatch_loop import unroll_setting
from dpjax.privacy.plan import DPPlan
from dpjax.randomness import Streams
from dpjax.state import TrainState, ema_decay

PyTree = Any
DATA_AXIS = "data"


def example_keys(step_key: jax.Array, indices: jax.Array) -> jax.Array:
    """One key per example, depending only on (step key, dataset index)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, indices.astype(jnp.uint32))


def gather_examples(images: jax.Array, labels: jax.Array, indices: jax.Array) -> dict:
    """Examples at ``indices`` (padding -1 reads row 0; the mask removes it), images in [-1, 1]."""
    safe = jnp.maximum(indices, 0)
    x = to_model_range(images[safe])
    return {"image": x, "label": labels[safe].astype(jnp.int32)}


def public_loss_and_grad(
    method: Any, trainable: PyTree, frozen: PyTree, key: jax.Array
) -> tuple[tuple[jax.Array, dict[str, jax.Array]], PyTree]:
    """((loss, metrics), gradient) of ``method.public_loss`` (zeros if it has none).

    The public loss never sees private data, so its gradient is added without clipping
    or noise (post-processing)."""

    def public(tr):
        out = method.public_loss(tr, frozen, key)
        if out is None:
            return jnp.zeros(()), {}
        return out if isinstance(out, tuple) else (out, {})

    return jax.value_and_grad(public, has_aux=True)(trainable)


def _clipped_sum_fn(
    method: Any,
    clip: float | None,
    microbatch_size: int,
    clipping_impl: str,
    compute_dtype: str = "float32",
    unroll: bool | None = None,
) -> Callable[..., clipping.ClipResult]:
    """``f(trainable, frozen, images, labels, indices, mask, num_real, loss_key)``: the
    clipped-gradient sum of the examples at ``indices`` (one device's work)."""

    def clipped_sum(trainable, frozen, images, labels, indices, mask, num_real, loss_key):
        examples = gather_examples(images, labels, indices)
        keys = example_keys(loss_key, indices)
        return clipping.clipped_grad_sum(
            method.loss_per_example,
            trainable,
            frozen,
            examples,
            mask,
            keys,
            clip_norm=clip,
            microbatch_size=microbatch_size,
            num_real=num_real,
            impl=clipping_impl,
            compute_dtype=compute_dtype,
            unroll=unroll,
            routing=clipping.routing_of(method),
        )

    return clipped_sum


def _sharded(clipped_sum: Callable[..., clipping.ClipResult], mesh: Mesh) -> Callable[..., Any]:
    """``clipped_sum`` data-parallel over ``mesh``'s 'data' axis, psum-ed to a replicated sum.

    Each device sees its (P/S,) slice of ``indices``/``mask`` and counts its own real rows
    (real rows must come first within each slice; ``parallel.deal_batch`` and a plain
    contiguous split of a real-rows-first batch both guarantee it).
    """

    def local(trainable, frozen, images, labels, indices, mask, loss_key):
        # Mark the replicated parameters device-varying BEFORE differentiating: with
        # shard_map's replication checking on, the gradient w.r.t. a replicated input is
        # transposed into a psum over devices, which would sum example b of every device
        # before clipping (wrong gradients, broken sensitivity). With check_vma=False
        # (below) this is a no-op, kept so that turning the checker on stays correct.
        trainable = lax.pcast(trainable, DATA_AXIS, to="varying")
        num_local = jnp.sum(mask.astype(jnp.int32))
        res = clipped_sum(trainable, frozen, images, labels, indices, mask, num_local, loss_key)
        summed = lax.psum(
            (
                res.grad_sum,
                res.loss_sum,
                res.aux_sum,
                res.num_valid,
                res.num_clipped,
                res.num_nonfinite,
            ),
            DATA_AXIS,
        )
        grad_sum, loss_sum, aux_sum, num_valid, num_clipped, num_nonfinite = summed
        return clipping.ClipResult(
            grad_sum, loss_sum, aux_sum, res.norms, num_valid, num_clipped, num_nonfinite
        )

    out_specs = clipping.ClipResult(
        grad_sum=P(),
        loss_sum=P(),
        aux_sum=P(),
        norms=P(DATA_AXIS),
        num_valid=P(),
        num_clipped=P(),
        num_nonfinite=P(),
    )
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(), P(DATA_AXIS), P(DATA_AXIS), P()),
        out_specs=out_specs,
        # The clipped sum's fori_loop starts from replicated zeros and accumulates
        # per-device values, which the replication checker rejects; the outputs are made
        # replicated explicitly by the psum above (and the test suite checks the result
        # against the one-device step).
        check_vma=False,
    )


def make_train_step(
    method: Any,
    optimizer: optax.GradientTransformation,
    plan: DPPlan,
    *,
    microbatch_size: int,
    ema_rate: float,
    ema_warmup: bool = True,
    clipping_impl: str = "vmap",
    mesh: Mesh | None = None,
    compute_dtype: str = "float32",
    microbatch_loop: str = "auto",
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Returns ``step(state, images, labels, indices, mask, num_real, streams)``.

    ``images`` (N, H, W, C) uint8 and ``labels`` (N,) are the whole private dataset on
    device; ``indices``/``mask`` (P,) come from the Poisson sampler. The function is
    pure and jitted; the state's ``step`` selects the keys.

    With ``mesh`` (a ``jax.sharding.Mesh`` with a ``'data'`` axis of S devices), the
    per-example work is split over the devices (see the module docstring): P must be a
    multiple of S * ``microbatch_size``, ``indices``/``mask`` should be sharded over
    ``'data'`` (``parallel.shard_batch``) and everything else replicated
    (``parallel.replicate``); the new state and the metrics come back replicated.
    ``num_real`` is then unused: each device counts the real rows of its own slice.

    ``compute_dtype`` ('float32' or 'bfloat16') is the arithmetic dtype of the
    per-example losses and their backward pass; parameters, per-example gradients,
    clipping, the sum, the noise and the update stay float32 (``clipping.py``).
    """
    clip = plan.clip_norm if plan.enabled else None
    noise_std = plan.noise_std if plan.enabled else 0.0
    # Before the first step's trace, so that a bad setting fails at build time.
    check_compute_dtype(compute_dtype)
    unroll = unroll_setting(microbatch_loop)
    clipped_sum = _clipped_sum_fn(
        method, clip, microbatch_size, clipping_impl, compute_dtype, unroll
    )
    if mesh is not None:
        if DATA_AXIS not in mesh.axis_names:
            raise ValueError(f"The mesh needs a '{DATA_AXIS}' axis; it has {mesh.axis_names}.")
        sharded_sum = _sharded(clipped_sum, mesh)

    def step(state: TrainState, images, labels, indices, mask, num_real, streams: Streams):
        t = state.step
        loss_key = jax.random.fold_in(streams.loss, t)
        if mesh is None:
            res = clipped_sum(
                state.trainable, state.frozen, images, labels, indices, mask, num_real, loss_key
            )
        else:
            if mask.shape[0] % (mesh.shape[DATA_AXIS] * microbatch_size):
                raise ValueError(
                    f"Padded batch {mask.shape[0]} is not a multiple of devices x micro-batch "
                    f"({mesh.shape[DATA_AXIS]} x {microbatch_size}); build the sampler with "
                    "multiple=devices*microbatch_size."
                )
            res = sharded_sum(
                state.trainable, state.frozen, images, labels, indices, mask, loss_key
            )
        # From here on every value is replicated: ONE noise draw per logical step.
        if plan.enabled:
            grads = private_gradient.noised_mean(
                res.grad_sum, jax.random.fold_in(streams.noise, t), plan
            )
        else:
            denom = jnp.maximum(res.num_valid, 1).astype(jnp.float32)
            grads = jax.tree_util.tree_map(lambda g: g / denom, res.grad_sum)

        (pub_loss, pub_aux), pub_grads = public_loss_and_grad(
            method, state.trainable, state.frozen, jax.random.fold_in(streams.extra, t)
        )
        grads = jax.tree_util.tree_map(
            lambda g, p, w: (g + p).astype(w.dtype), grads, pub_grads, state.trainable
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        decay = ema_decay(ema_rate, t + 1, ema_warmup)  # Step t is update t + 1.
        ema = jax.tree_util.tree_map(
            lambda e, p: decay * e + (1.0 - decay) * p, state.ema, trainable
        )
        valid = jnp.maximum(res.num_valid, 1)
        # Diagnostics. Those of the private rows (the realized batch size, clipping and
        # non-finite counts, norm quantiles, losses) are NOT differentially private:
        # metrics.jsonl and TensorBoard are never exported (README, "Workdir contents").
        # The losses carry a '_nonprivate' suffix as the likeliest to be copied into a
        # paper or a dashboard.
        metrics = {
            "batch_size": res.num_valid,
            "nonfinite_examples": res.num_nonfinite,
            "frac_clipped": res.num_clipped / valid,
            "grad_norm_median": jnp.nanquantile(res.norms, 0.5),
            "grad_norm_p90": jnp.nanquantile(res.norms, 0.9),
            "noise_std_on_mean": jnp.asarray(noise_std / plan.expected_batch_size),
            "update_norm": optax.global_norm(updates),
            "public_loss": pub_loss,
            # NaN, not 0, when no row counted (an empty batch, or every row non-finite):
            # a mean of nothing is no loss of 0.
            "private_loss_nonprivate": jnp.where(res.num_valid > 0, res.loss_sum / valid, jnp.nan),
            **{f"private_{k}_nonprivate": jnp.where(res.num_valid > 0, v / valid, jnp.nan)
               for k, v in res.aux_sum.items()},
            **{f"public_{k}": v for k, v in pub_aux.items()},
        }
        new = TrainState(t + 1, trainable, state.frozen, opt_state, ema)
        return new, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    return jax.jit(step, donate_argnums=(0,), out_shardings=NamedSharding(mesh, P()))
