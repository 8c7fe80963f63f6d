"""DP-SAD's discriminator backbone (Liu, Wang, Ge; ECCV 2024): a small GroupNorm conv net.

The discriminator sees the channel-wise concatenation C(a, b) of two denoiser outputs
of the same noisy image (the paper's C(x_psi, x_theta)) and returns one logit per
image: "a is the teacher's output and b the student's". Feeding both orders, (teacher,
student) and (student, teacher), gives the two classes. Optionally the noise level
enters as one more constant channel, so the network can judge outputs whose
sharpness depends on sigma.

No losses here (``dpjax.methods.dpsad`` owns them). GroupNorm, never BatchNorm: the
network is trained with per-example clipping on private data, so no statistic may cross
examples (DPDM's min(C // 4, 32) groups).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.models import group_norm


class Discriminator(nn.Module):
    """logit(a is the teacher's output) for pairs of images (N, H, W, C).

    Attributes:
      features: channels of each level; every level is a 3x3 convolution, GroupNorm,
        LeakyReLU(0.2), then a stride-2 3x3 convolution, GroupNorm, LeakyReLU(0.2).
    """

    features: tuple[int, ...] = (32, 64)

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array, c_noise: jax.Array | None = None) -> jax.Array:
        """Returns (N,) logits.

        Args:
          a, b: (N, H, W, C) images in data space (denoiser outputs).
          c_noise: (N,) noise-level code (the denoiser's c_noise), or None for none.
        """
        if a.shape != b.shape or a.ndim != 4:
            raise ValueError(
                f"Expected two (N, H, W, C) arrays of one shape, got {a.shape}, {b.shape}."
            )
        h = jnp.concatenate([a, b], axis=-1)
        if c_noise is not None:
            level = jnp.broadcast_to(
                jnp.asarray(c_noise, h.dtype).reshape(-1, 1, 1, 1), (*h.shape[:3], 1)
            )
            h = jnp.concatenate([h, level], axis=-1)
        for i, f in enumerate(self.features):
            for j, stride in enumerate((1, 2)):
                h = nn.Conv(
                    f, (3, 3), strides=(stride, stride), padding="SAME", name=f"conv_{i}_{j}"
                )(h)
                h = nn.GroupNorm(num_groups=group_norm.num_groups(f), name=f"norm_{i}_{j}")(h)
                h = nn.leaky_relu(h, 0.2)
        h = jnp.mean(h, axis=(1, 2))  # Per-image pooling: no statistic across examples.
        return nn.Dense(1, name="logit")(h)[:, 0]
