"""The step of a one-release method (DP-MEPF) after its release: post-processing only.

``make_public_step`` returns a jitted update that differentiates ``method.public_loss``
and nothing else: it takes no private data as input, so nothing it computes can depend
on the private data except through ``state.frozen['release']``, which is already public
(noised and accounted for). The privacy guarantee of such a run is that of its release.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from dpjax.privacy.dp_step import public_loss_and_grad
from dpjax.randomness import Streams
from dpjax.state import TrainState, ema_decay


def make_public_step(
    method: Any,
    optimizer: optax.GradientTransformation,
    *,
    ema_rate: float,
    ema_warmup: bool = True,
) -> Callable[[TrainState, Streams], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns ``step(state, streams) -> (state, metrics)``: one optimizer step on the
    public loss (key ``fold_in(streams.extra, step)``, as the DP step's public term),
    then the EMA. Pure and jitted; the state is donated."""

    def step(state: TrainState, streams: Streams):
        t = state.step
        (loss, aux), grads = public_loss_and_grad(
            method, state.trainable, state.frozen, jax.random.fold_in(streams.extra, t)
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        decay = ema_decay(ema_rate, t + 1, ema_warmup)  # Step t is update t + 1.
        ema = jax.tree_util.tree_map(
            lambda e, p: decay * e + (1.0 - decay) * p, state.ema, trainable
        )
        metrics = {
            "public_loss": loss,
            "update_norm": optax.global_norm(updates),
            **{f"public_{k}": v for k, v in aux.items()},
        }
        return TrainState(t + 1, trainable, state.frozen, opt_state, ema), metrics

    return jax.jit(step, donate_argnums=(0,))
