"""RealNVP on flat vectors (Dinh, Sohl-Dickstein, Bengio; ICLR 2017), as in DP-LFlow.

Affine couplings with alternating ('odds'/'evens') masks, a tanh-bounded log-scale, one
MLP per coupling that outputs both the log-scale and the shift (DP-LFlow's
``single_function=True``), a fixed random permutation between couplings, and a standard
normal prior. No batch normalization: statistics across examples would break the
per-example clipping unit of DP-SGD. Optionally class-conditional: the one-hot label is
an extra input of every coupling MLP.

Guarantees: ``forward`` and ``inverse`` are inverse functions (to float rounding) for any
parameters, and ``forward``'s log-determinant is exactly log |det dz/dx| (Eq. 6 of the
paper: the sum of the log-scales), both tested against brute-force Jacobians.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _masks(dim: int, num_layers: int) -> np.ndarray:
    """(L, dim) 0/1 masks: 1 = passed through. Alternates odd and even coordinates."""
    base = (np.arange(dim) % 2).astype(np.float32)
    return np.stack([base if i % 2 == 0 else 1.0 - base for i in range(num_layers)])


def _permutations(dim: int, num_layers: int, seed: int) -> np.ndarray:
    """(L, dim) fixed random permutations applied after each coupling (part of the model)."""
    rng = np.random.RandomState(seed)
    return np.stack([rng.permutation(dim) for _ in range(num_layers)])


class Coupling(nn.Module):
    """One affine coupling: y = m*x + (1-m)*(x*exp(s) + t), (s, t) = MLP(m*x [, label])."""

    dim: int
    hidden: int
    mask: tuple[float, ...]

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array | None, reverse: bool = False):
        m = jnp.asarray(self.mask, x.dtype)
        h = x * m
        if cond is not None:
            h = jnp.concatenate([h, cond], axis=-1)
        h = nn.relu(nn.Dense(self.hidden, name="Dense_0")(h))
        h = nn.relu(nn.Dense(self.hidden, name="Dense_1")(h))
        # Zero-initialized output: every coupling starts as the identity.
        st = nn.Dense(2 * self.dim, kernel_init=nn.initializers.zeros, name="Dense_2")(h)
        s, t = jnp.split(st, 2, axis=-1)
        s = jnp.tanh(s) * (1.0 - m)  # bounded log-scale keeps exp(s) in [1/e, e]
        t = t * (1.0 - m)
        if not reverse:
            return x * m + (1.0 - m) * (x * jnp.exp(s) + t), jnp.sum(s, axis=-1)
        return x * m + (1.0 - m) * ((x - t) * jnp.exp(-s)), -jnp.sum(s, axis=-1)


class RealNVP(nn.Module):
    """A flow z = f(x) on (..., dim) vectors with a N(0, I) prior on z.

    Attributes:
      dim: vector size (the autoencoder's latent size).
      num_layers: couplings (DP-LFlow: 9 for MNIST and CelebA-32).
      hidden: width of the coupling MLPs (DP-LFlow: 200).
      num_classes: > 0 for a class-conditional flow (one-hot label into each MLP).
      seed: seed of the fixed permutations (part of the architecture, not trained).
    """

    dim: int
    num_layers: int = 9
    hidden: int = 200
    num_classes: int = 0
    seed: int = 0

    def setup(self) -> None:
        masks = _masks(self.dim, self.num_layers)
        self.couplings = [
            Coupling(self.dim, self.hidden, tuple(float(v) for v in masks[i]))
            for i in range(self.num_layers)
        ]
        self.perms = _permutations(self.dim, self.num_layers, self.seed)

    def _cond(self, labels: jax.Array | None) -> jax.Array | None:
        if self.num_classes <= 0:
            return None
        if labels is None:
            raise ValueError("A class-conditional flow needs labels.")
        return jax.nn.one_hot(labels, self.num_classes)

    def __call__(self, x: jax.Array, labels: jax.Array | None = None):
        return self.forward(x, labels)

    def forward(self, x: jax.Array, labels: jax.Array | None = None):
        """x -> (z, log|det dz/dx|)."""
        cond = self._cond(labels)
        logdet = jnp.zeros(x.shape[:-1], x.dtype)
        for i, layer in enumerate(self.couplings):
            x, ld = layer(x, cond)
            x = x[..., self.perms[i]]
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: jax.Array, labels: jax.Array | None = None):
        """z -> (x, log|det dx/dz|)."""
        cond = self._cond(labels)
        logdet = jnp.zeros(z.shape[:-1], z.dtype)
        for i in reversed(range(self.num_layers)):
            z = z[..., np.argsort(self.perms[i])]
            z, ld = self.couplings[i](z, cond, reverse=True)
            logdet = logdet + ld
        return z, logdet

    def log_prob(self, x: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        """Exact log-density of x (nats): log N(f(x); 0, I) + log|det df/dx|."""
        z, logdet = self.forward(x, labels)
        prior = -0.5 * jnp.sum(z**2, axis=-1) - 0.5 * self.dim * math.log(2 * math.pi)
        return prior + logdet
