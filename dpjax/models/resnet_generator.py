"""DP-MEPF's ResNet generator (GFMN-style ``ResnetG``), with GroupNorm.

Architecture (DP-MEPF ``ResnetG``): z (and a one-hot label) -> dense to an s0 x s0 map
of ngf * 2^k channels -> k residual up-blocks (nearest 2x upsampling, two 3x3
convolutions, the channels halving each block) -> norm, ReLU, 3x3 convolution, tanh.
s0 is the bottom size reached by halving the image size k times (7 for 28x28, 4 for
32x32 and 64x64). DP-MEPF uses BatchNorm, which is allowed there because the generator
never sees private data; dpjax uses GroupNorm so that an image never depends on the
other images of its batch (samples are then the same whatever the sampling batch size).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.models import group_norm


def up_blocks(image_size: int) -> int:
    """Number of 2x up-blocks k: halve the size while it is even and its half is at least
    4 (28 -> 7: k = 2; 32 -> 4: k = 3; 64 -> 4: k = 4)."""
    k = 0
    while image_size % 2 == 0 and image_size // 2 >= 4:
        image_size //= 2
        k += 1
    if k == 0:
        raise ValueError(f"The generator needs an even image size >= 8, got {image_size}.")
    return k


class UpBlock(nn.Module):
    """Residual block: upsample 2x, (norm, ReLU, conv3x3) twice, plus a 1x1 shortcut."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")
        y = nn.relu(nn.GroupNorm(group_norm.num_groups(c), name="norm_0")(x))
        y = nn.Conv(self.features, (3, 3), padding="SAME", name="conv_0")(y)
        y = nn.relu(nn.GroupNorm(group_norm.num_groups(self.features), name="norm_1")(y))
        y = nn.Conv(self.features, (3, 3), padding="SAME", name="conv_1")(y)
        return y + nn.Conv(self.features, (1, 1), name="skip")(x)


class ResNetGenerator(nn.Module):
    """``__call__(z, labels) -> images`` (N, H, W, C) in [-1, 1].

    Attributes:
      image_shape: (H, W, C).
      num_classes: 0 for unconditional; else a one-hot label is concatenated to z.
      ngf: channels of the last up-block (doubling toward the bottom, as ResnetG).
    """

    image_shape: tuple[int, int, int]
    num_classes: int = 0
    ngf: int = 64

    @nn.compact
    def __call__(self, z: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        h, w, c = self.image_shape
        if h != w:
            raise ValueError(f"The generator makes square images, got {self.image_shape}.")
        k = up_blocks(h)
        s0 = h // 2**k
        if self.num_classes > 0:
            if labels is None:
                raise ValueError("A class-conditional generator needs labels.")
            z = jnp.concatenate([z, jax.nn.one_hot(labels, self.num_classes)], axis=-1)
        width = self.ngf * 2**k
        x = nn.Dense(s0 * s0 * width, name="from_z")(z).reshape(-1, s0, s0, width)
        for i in range(k):
            width //= 2
            x = UpBlock(width, name=f"up_{i}")(x)
        x = nn.relu(nn.GroupNorm(group_norm.num_groups(width), name="norm_out")(x))
        return jnp.tanh(nn.Conv(c, (3, 3), padding="SAME", name="to_image")(x))
