"""The anchor benchmark's UNet denoiser as a dpjax method, for like-for-like timings.

The team's anchor benchmark (``../shared/bench/unet_jax.py`` and ``unet_torch.py``, the
latter timed with Opacus) trains a DPDM-sized UNet denoiser (6.3M parameters at the
default width) on 28x28x1 images with the EDM loss and noise multiplicity K. This module
is the same architecture written as a flax module in dpjax's style, wrapped in a method
object that satisfies the contract ``dpjax.privacy.dp_step.make_train_step`` uses
(``init``, ``loss_per_example``, ``public_loss``), so that ``benchmarks/dp_step.py`` times
dpjax's real DP step on exactly the model the anchor numbers were measured on.

Architecture (as in the anchor, parameter for parameter):

* a sinusoidal embedding of ``log(sigma) / 4`` (``ch`` features) followed by two Dense
  layers of width ``4 ch`` (SiLU between them);
* an input 3x3 convolution to ``ch`` channels;
* down path: for each channel multiplier ``m``, ``num_res_blocks`` ResBlocks of
  ``ch * m`` channels, then (except at the lowest resolution) a stride-2 3x3 convolution;
* middle: two ResBlocks;
* up path: for each multiplier in reverse, ``num_res_blocks + 1`` ResBlocks on the
  concatenation with the matching skip, then (except at the top) a 4x4 stride-2
  transposed convolution;
* GroupNorm, SiLU and a 3x3 output convolution.

A ResBlock is GroupNorm-SiLU-Conv3x3, plus a Dense projection of the embedding,
GroupNorm-SiLU-Conv3x3, and a residual (a 1x1 convolution when the width changes);
GroupNorm has ``min(32, channels // 4)`` groups. There is no attention, no dropout and
no class conditioning (labels are ignored), as in the anchor.

The loss of one example is the anchor's: K noised copies with ln sigma ~ N(-1.2, 1.2^2),
EDM preconditioning with sigma_data = 0.5 and weight (sigma^2 + sd^2) / (sigma sd)^2,
averaged over the copies and the pixels.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.methods import base

SIGMA_DATA = 0.5
MNIST_SPEC = base.DataSpec((28, 28, 1), 10)
P_MEAN = -1.2
P_STD = 1.2


def _groups(channels: int) -> int:
    """The anchor's GroupNorm group count: min(32, channels // 4)."""
    return min(32, channels // 4)


class ResBlock(nn.Module):
    """The anchor's residual block with an additive embedding projection.

    Attributes:
      features: output channels.
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        """x (N, H, W, C_in), emb (N, E) -> (N, H, W, features)."""
        in_ch = x.shape[-1]
        h = nn.Conv(self.features, (3, 3))(nn.silu(nn.GroupNorm(_groups(in_ch))(x)))
        h = h + nn.Dense(self.features)(emb)[:, None, None, :]
        h = nn.Conv(self.features, (3, 3))(nn.silu(nn.GroupNorm(_groups(self.features))(h)))
        if in_ch != self.features:
            x = nn.Conv(self.features, (1, 1))(x)
        return x + h


class AnchorUNet(nn.Module):
    """The anchor's UNet denoiser F(x, sigma).

    Attributes:
      ch: base channel count (anchor: 64).
      ch_mult: channel multiplier of each resolution (anchor: (1, 2, 2)).
      num_res_blocks: ResBlocks per resolution on the down path (anchor: 2).
    """

    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2

    @nn.compact
    def __call__(self, x: jax.Array, sigma: jax.Array) -> jax.Array:
        """x (N, H, W, C), sigma (N,) > 0 -> (N, H, W, C)."""
        half = self.ch // 2
        freqs = jnp.exp(-math.log(10000) * jnp.arange(half) / half)
        angles = jnp.log(sigma)[:, None] * 0.25 * freqs[None]
        emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
        emb = nn.Dense(self.ch * 4)(nn.silu(nn.Dense(self.ch * 4)(emb)))

        h = nn.Conv(self.ch, (3, 3))(x)
        skips = [h]
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = ResBlock(self.ch * mult)(h, emb)
                skips.append(h)
            if level < len(self.ch_mult) - 1:
                h = nn.Conv(h.shape[-1], (3, 3), strides=2)(h)
                skips.append(h)
        h = ResBlock(h.shape[-1])(h, emb)
        h = ResBlock(h.shape[-1])(h, emb)
        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = ResBlock(self.ch * mult)(jnp.concatenate([h, skips.pop()], axis=-1), emb)
            if level > 0:
                h = nn.ConvTranspose(h.shape[-1], (4, 4), strides=(2, 2), padding="SAME")(h)
        h = nn.silu(nn.GroupNorm(_groups(h.shape[-1]))(h))
        return nn.Conv(x.shape[-1], (3, 3))(h)


class AnchorMethod(base.Method):
    """The anchor UNet trained with the anchor's EDM loss, as a dpjax method.

    Only what the DP step needs is implemented (no sampling): this is a benchmark model.
    """

    name = "anchor_unet"

    def __init__(
        self,
        noise_multiplicity: int,
        spec: base.DataSpec,
        *,
        ch: int = 64,
        ch_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
    ) -> None:
        if noise_multiplicity < 1:
            raise ValueError(f"noise_multiplicity must be >= 1, got {noise_multiplicity}.")
        self.noise_multiplicity = noise_multiplicity
        self.spec = spec
        self.network = AnchorUNet(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks)

    def init(self, key: jax.Array, spec: base.DataSpec) -> base.Params:
        """Fresh UNet parameters (flax default initializers, as the anchor), all trainable."""
        x = jnp.zeros((1, *spec.image_shape), jnp.float32)
        variables = self.network.init(key, x, jnp.ones((1,), jnp.float32))
        return base.Params(trainable=variables["params"], frozen={})

    def loss_per_example(
        self, trainable: base.PyTree, frozen: base.PyTree, example: base.Example, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The anchor's loss of one example, averaged over its K noised copies.

        Args:
          trainable: UNet parameters.
          frozen: unused.
          example: {'image': (H, W, C) in [-1, 1], 'label': () int (ignored)}.
          key: this example's randomness.

        Returns:
          (loss, {'loss': loss}).
        """
        del frozen
        x = jnp.asarray(example["image"], jnp.float32)
        num = self.noise_multiplicity
        k_sigma, k_noise = jax.random.split(key)
        sigma = jnp.exp(jax.random.normal(k_sigma, (num,)) * P_STD + P_MEAN)
        copies = jnp.broadcast_to(x, (num, *x.shape))
        noisy = copies + jax.random.normal(k_noise, copies.shape) * sigma[:, None, None, None]
        sd2 = SIGMA_DATA**2
        b = lambda v: v[:, None, None, None]
        c_in = 1.0 / jnp.sqrt(sigma**2 + sd2)
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * SIGMA_DATA / jnp.sqrt(sigma**2 + sd2)
        out = self.network.apply({"params": trainable}, b(c_in) * noisy, sigma)
        denoised = b(c_skip) * noisy + b(c_out) * out
        weight = (sigma**2 + sd2) / (sigma * SIGMA_DATA) ** 2
        loss = jnp.mean(b(weight) * jnp.square(denoised - copies))
        return loss, {"loss": loss}


def make(
    noise_multiplicity: int,
    spec: base.DataSpec = MNIST_SPEC,
    *,
    tiny: bool = False,
) -> AnchorMethod:
    """The anchor model (6.3M parameters), or with ``tiny`` a CPU-sized one of the same shape."""
    if tiny:
        return AnchorMethod(noise_multiplicity, spec, ch=8, ch_mult=(1, 2), num_res_blocks=1)
    return AnchorMethod(noise_multiplicity, spec)
