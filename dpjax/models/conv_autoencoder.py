"""DP-LFlow's convolutional autoencoder: strided convolutions, no normalization layers.

Encoder (DP-LFlow ``autoencoder.py``): n strided 3x3 convolutions without bias (width
h / 2^(n-1-i), ReLU for 28x28 images, LeakyReLU otherwise), then a dense layer to the
code. Decoder: the mirror image with transposed convolutions, ending in pixel logits.
n = 2 for 28x28 (7x7 at the bottom), 3 for 32x32 (4x4). No BatchNorm or GroupNorm: the
model is trained with per-example clipping on private data, and no statistic may cross
examples.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def num_downsamples(image_size: int) -> int:
    """2 for 28x28 (-> 7x7), 3 for 32x32 (-> 4x4), enough halvings to reach <= 8 otherwise."""
    n = 0
    while image_size > 8:
        image_size = (image_size + 1) // 2
        n += 1
    return max(n, 1)


class ConvAutoencoder(nn.Module):
    """``encode`` (H, W, C) images in [-1, 1] -> codes; ``decode`` codes -> pixel logits.

    Attributes:
      image_shape: (H, W, C).
      latent_dim: code size (DP-LFlow: 20 for MNIST/FMNIST, 32 for CelebA-32).
      width: h, channels of the deepest convolution (DP-LFlow: 64 for MNIST, 256 CelebA).
    """

    image_shape: tuple[int, int, int]
    latent_dim: int = 20
    width: int = 64

    def setup(self) -> None:
        h, w, c = self.image_shape
        self.n = num_downsamples(max(h, w))
        widths = [self.width // 2 ** (self.n - 1 - i) for i in range(self.n)]
        self.enc = [
            nn.Conv(f, (3, 3), strides=2, padding="SAME", use_bias=False, name=f"enc_conv_{i}")
            for i, f in enumerate(widths)
        ]
        self.to_code = nn.Dense(self.latent_dim, name="to_code")
        self.bottom = (-(-h // 2**self.n), -(-w // 2**self.n))
        self.from_code = nn.Dense(self.bottom[0] * self.bottom[1] * self.width, name="from_code")
        out_widths = list(reversed(widths))[1:] + [c]
        self.dec = [
            nn.ConvTranspose(f, (3, 3), strides=(2, 2), padding="SAME", name=f"dec_conv_{i}")
            for i, f in enumerate(out_widths)
        ]
        self.act = nn.relu if h == 28 else (lambda x: nn.leaky_relu(x, 0.2))

    def encode(self, x: jax.Array) -> jax.Array:
        for conv in self.enc:
            x = self.act(conv(x))
        return self.to_code(x.reshape(*x.shape[:-3], -1))

    def decode(self, z: jax.Array) -> jax.Array:
        h, w, _ = self.image_shape
        x = self.from_code(z).reshape(*z.shape[:-1], *self.bottom, self.width)
        for conv in self.dec:
            x = conv(self.act(x))
        # Transposed convolutions overshoot odd sizes (28 -> 7 -> 14 -> 28 is exact; 7x7
        # bottoms of odd sizes are cropped back to the image size).
        return x[..., :h, :w, :]

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        z = self.encode(x)
        return z, self.decode(z)


def bernoulli_nll(logits: jax.Array, x01: jax.Array) -> jax.Array:
    """Sum over pixels of the binary cross-entropy of targets in [0, 1] (nats)."""
    per_pixel = jnp.maximum(logits, 0) - logits * x01 + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return jnp.sum(per_pixel, axis=(-3, -2, -1))


#: Grey levels of an 8-bit image (the Binomial's number of trials is LEVELS - 1).
LEVELS = 256


def binomial_log_prob(logits: jax.Array, x01: jax.Array) -> jax.Array:
    """Sum over pixels of log Binomial(k | 255, sigmoid(logits)), k = round(255 x01) (nats).

    The normalized distribution over the 256 grey levels whose negative log-likelihood is
    255 x ``bernoulli_nll(logits, k / 255)`` minus log C(255, k): the Bernoulli
    cross-entropy on grey levels that DP-LFlow trains with is, up to that scale and a
    term without parameters, this likelihood, so the trained decoder is its maximum-
    likelihood fit. Summed over k = 0..255 its probabilities are 1 for every logit.
    """
    n = LEVELS - 1
    k = jnp.round(jnp.clip(x01, 0.0, 1.0) * n)
    log_choose = (
        jax.lax.lgamma(jnp.float32(n + 1)) - jax.lax.lgamma(k + 1.0) - jax.lax.lgamma(n - k + 1.0)
    )
    per_pixel = log_choose + k * jax.nn.log_sigmoid(logits) + (n - k) * jax.nn.log_sigmoid(-logits)
    return jnp.sum(per_pixel, axis=(-3, -2, -1))


def continuous_bernoulli_log_prob(logits: jax.Array, x01: jax.Array) -> jax.Array:
    """Sum over pixels of log P(grey level k | lambda), lambda = sigmoid(logits) (nats).

    The decoder's own density: the continuous Bernoulli on [0, 1] (Loaiza-Ganem and
    Cunningham 2019, eq. 2), p(x | lambda) = C(lambda) lambda^x (1 - lambda)^(1 - x), whose
    log is minus the Bernoulli cross-entropy on grey levels the model trains with plus
    the normalizer log C(lambda). An 8-bit level k = round(255 x01) gets the mass of its
    bin [k/256, (k+1)/256] (uniform dequantization), in closed form from the CDF
    F(x) = (lambda^x (1 - lambda)^(1 - x) + lambda - 1) / (2 lambda - 1):

        P(k) = sigmoid(-l) e^(a l) expm1(w l) / tanh(l / 2),  a = k / 256, w = 1 / 256,

    -> w as l -> 0 (the uniform). Summed over the 256 levels it is 1 for every logit.
    """
    w = 1.0 / LEVELS
    a = jnp.round(jnp.clip(x01, 0.0, 1.0) * (LEVELS - 1)) * w
    small = jnp.abs(logits) < 1e-4
    safe = jnp.where(small, 1.0, logits)  # Keeps the unused branch's gradient finite.
    exact = jnp.log(jnp.abs(jnp.expm1(w * safe))) - jnp.log(jnp.abs(jnp.tanh(0.5 * safe)))
    # expm1(w l) / tanh(l / 2) = 2 w (1 + w l / 2 + O(l^2)) near 0.
    ratio = jnp.where(small, jnp.log(2.0 * w) + 0.5 * w * logits, exact)
    per_pixel = jax.nn.log_sigmoid(-logits) + a * logits + ratio
    return jnp.sum(per_pixel, axis=(-3, -2, -1))


#: Normalized pixel likelihoods of 8-bit images given decoder logits (``pixel_model``).
PIXEL_MODELS = {
    "continuous_bernoulli": continuous_bernoulli_log_prob,
    "binomial": binomial_log_prob,
}
