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
