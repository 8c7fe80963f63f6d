"""A deliberately small method that drives the core in tests and smoke runs.

It learns one mean image per class by DP-SGD on the loss
``mean_k ||x + s n_k - mu_y||^2 / D`` (K noise draws averaged inside the per-example
loss, like DPDM's noise multiplicity) plus a per-class log-scale trained jointly, so the
engine is exercised with K > 1 and with two parameter groups under one clip.
Sampling draws ``mu_y + exp(log_scale_y) * z``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dpjax.methods.base import DataSpec, Method, Params


@dataclasses.dataclass(frozen=True)
class Config:
    """Toy method settings."""

    noise_multiplicity: int = 2
    input_noise: float = 0.1


class Toy(Method):
    """Per-class Gaussian fitted by DP-SGD."""

    name = "toy"

    def __init__(self, config: Config, spec: DataSpec):
        self.config = config
        self.spec = spec
        self.num_classes = max(spec.num_classes, 1)

    def init(self, key: jax.Array, spec: DataSpec) -> Params:
        del key
        h, w, c = spec.image_shape
        return Params(
            trainable={
                "mean": jnp.zeros((self.num_classes, h, w, c), jnp.float32),
                "log_scale": jnp.zeros((self.num_classes,), jnp.float32),
            },
            frozen={},
        )

    def loss_per_example(self, trainable, frozen, example, key):
        del frozen
        y = jnp.clip(example["label"], 0, self.num_classes - 1)
        k = self.config.noise_multiplicity
        n = jax.random.normal(key, (k, *example["image"].shape))
        x = example["image"][None] + self.config.input_noise * n
        mu = trainable["mean"][y]
        log_s = trainable["log_scale"][y]
        # Gaussian negative log-likelihood per pixel, averaged over the K draws.
        sq = jnp.mean(jnp.square(x - mu[None]), axis=(1, 2, 3))
        nll = 0.5 * sq * jnp.exp(-2 * log_s) + log_s
        loss = jnp.mean(nll)
        return loss, {"mse": jnp.mean(sq)}

    def sample(self, params: Params, key, n, labels=None):
        k1, k2 = jax.random.split(key)
        if labels is None:
            labels = jax.random.randint(k1, (n,), 0, self.num_classes)
        mu = params.trainable["mean"][labels]
        s = jnp.exp(params.trainable["log_scale"][labels])[:, None, None, None]
        return jnp.clip(mu + s * jax.random.normal(k2, mu.shape), -1.0, 1.0)


def make(config: Config, spec: DataSpec) -> Toy:
    return Toy(config, spec)
