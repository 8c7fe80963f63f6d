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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dpjax.privacy import clipping, noise
from dpjax.privacy.plan import DPPlan
from dpjax.randomness import Streams
from dpjax.state import TrainState, ema_decay

PyTree = Any


def example_keys(step_key: jax.Array, indices: jax.Array) -> jax.Array:
    """One key per example, depending only on (step key, dataset index)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, indices.astype(jnp.uint32))


def gather_examples(images: jax.Array, labels: jax.Array, indices: jax.Array) -> dict:
    """Examples at ``indices`` (padding -1 reads row 0; the mask removes it), images in [-1, 1]."""
    safe = jnp.maximum(indices, 0)
    x = images[safe].astype(jnp.float32) / 127.5 - 1.0
    return {"image": x, "label": labels[safe].astype(jnp.int32)}


def make_train_step(
    method: Any,
    optimizer: optax.GradientTransformation,
    plan: DPPlan,
    *,
    microbatch_size: int,
    ema_rate: float,
    ema_warmup: bool = True,
    clipping_impl: str = "vmap",
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Returns ``step(state, images, labels, indices, mask, num_real, streams)``.

    ``images`` (N, H, W, C) uint8 and ``labels`` (N,) are the whole private dataset on
    device; ``indices``/``mask`` (P,) come from the Poisson sampler. The function is
    pure and jitted; the state's ``step`` selects the keys.
    """
    clip = plan.clip_norm if plan.enabled else None
    noise_std = plan.noise_std if plan.enabled else 0.0

    def step(state: TrainState, images, labels, indices, mask, num_real, streams: Streams):
        t = state.step
        examples = gather_examples(images, labels, indices)
        keys = example_keys(jax.random.fold_in(streams.loss, t), indices)
        res = clipping.clipped_grad_sum(
            method.loss_per_example,
            state.trainable,
            state.frozen,
            examples,
            mask,
            keys,
            clip_norm=clip,
            microbatch_size=microbatch_size,
            num_real=num_real,
            impl=clipping_impl,
        )
        if plan.enabled:
            noisy = noise.add_gaussian_noise(
                res.grad_sum, jax.random.fold_in(streams.noise, t), noise_std
            )
            denom = plan.expected_batch_size
        else:
            noisy = res.grad_sum
            denom = jnp.maximum(res.num_valid, 1).astype(jnp.float32)
        grads = jax.tree_util.tree_map(lambda g: g / denom, noisy)

        def public(tr):
            out = method.public_loss(tr, state.frozen, jax.random.fold_in(streams.extra, t))
            return jnp.zeros(()) if out is None else out

        pub_loss, pub_grads = jax.value_and_grad(public)(state.trainable)
        grads = jax.tree_util.tree_map(
            lambda g, p, w: (g + p).astype(w.dtype), grads, pub_grads, state.trainable
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        decay = ema_decay(ema_rate, t, ema_warmup)
        ema = jax.tree_util.tree_map(
            lambda e, p: decay * e + (1.0 - decay) * p, state.ema, trainable
        )
        valid = jnp.maximum(res.num_valid, 1)
        metrics = {
            "batch_size": res.num_valid,
            "nonfinite_examples": res.num_nonfinite,
            "frac_clipped": res.num_clipped / valid,
            "grad_norm_median": jnp.nanquantile(res.norms, 0.5),
            "grad_norm_p90": jnp.nanquantile(res.norms, 0.9),
            "noise_std_on_mean": jnp.asarray(noise_std / plan.expected_batch_size),
            "update_norm": optax.global_norm(updates),
            "public_loss": pub_loss,
            # Loss on private rows: itself a release; logged as non-private, never exported.
            "private_loss_nonprivate": res.loss_sum / valid,
            **{f"private_{k}_nonprivate": v / valid for k, v in res.aux_sum.items()},
        }
        new = TrainState(t + 1, trainable, state.frozen, opt_state, ema)
        return new, metrics

    return jax.jit(step, donate_argnums=(0,))
