"""The KL-regularized convolutional autoencoder of latent diffusion, in flax.linen.

The first stage of latent diffusion models (Rombach et al., CVPR 2022, Sec. 3.1;
``AutoencoderKL`` with the ``Encoder``/``Decoder`` of
ldm/modules/diffusionmodules/model.py), as DP-LDM (Lyu et al., TMLR 2024) pre-trains it
on public data and then keeps it frozen:

    Encoder: conv_in; per level l: num_res_blocks ResBlocks at ch * ch_mult[l], then a
             stride-2 3x3 convolution (except at the last level); mid: ResBlock
             (+ self-attention), ResBlock; GroupNorm, SiLU, conv_out to 2 z_channels
             = (mean, log-variance) of a diagonal Gaussian q(z | x).
    Decoder: conv_in from z_channels; mid as above; per level (reversed):
             num_res_blocks + 1 ResBlocks, then nearest-neighbour 2x up-sampling and a
             3x3 convolution (except at level 0); GroupNorm, SiLU, conv_out to the image.

A downsampling factor f in {2, 4, 8} means log2(f) stride-2 stages, so ``len(ch_mult)
= log2(f) + 1`` and an (H, W, C) image has an (H/f, W/f, z_channels) latent.

Privacy note: every normalisation is a GroupNorm (statistics of one example only), so
the encoder can run inside a per-example DP-SGD loss on private data (it does, frozen,
in the latent diffusion method).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.models import group_norm

# The clamp of LDM's DiagonalGaussianDistribution, which keeps exp(logvar) finite.
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class AEConfig:
    """Hyper-parameters of the KL autoencoder.

    Attributes:
      image_size: height (= width) of the images; divisible by ``downsample``.
      channels: image channels.
      downsample: the spatial downsampling factor f, one of 2, 4, 8.
      z_channels: latent channels.
      ch: base channel count.
      ch_mult: channel multiplier per level, ``log2(f) + 1`` entries; () means
        (1, 2, 2, ...) (the first level at ``ch``, the others at ``2 ch``).
      num_res_blocks: residual blocks per level in the encoder (one more in the decoder);
        0 leaves only the resampling convolutions and the middle blocks in the encoder.
      mid_attention: a single-head self-attention block in the middle of both nets (LDM).
    """

    image_size: int = 32
    channels: int = 3
    downsample: int = 4
    z_channels: int = 3
    ch: int = 64
    ch_mult: tuple[int, ...] = ()
    num_res_blocks: int = 1
    mid_attention: bool = True

    def __post_init__(self) -> None:
        if self.downsample not in (2, 4, 8):
            raise ValueError(f"downsample must be 2, 4 or 8, got {self.downsample}.")
        if self.image_size % self.downsample:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by downsample "
                f"{self.downsample} (resize the images, e.g. MNIST to 32 for f=8)."
            )
        if self.ch_mult and len(self.ch_mult) != self.num_levels:
            raise ValueError(
                f"ch_mult {self.ch_mult} needs log2({self.downsample}) + 1 = "
                f"{self.num_levels} entries."
            )
        if self.ch < 4 or self.ch % 4 or self.z_channels < 1 or self.num_res_blocks < 0:
            raise ValueError(
                f"Need ch >= 4 and divisible by 4, z_channels >= 1 and num_res_blocks >= 0; "
                f"got ch={self.ch}, z_channels={self.z_channels}, "
                f"num_res_blocks={self.num_res_blocks}."
            )

    @property
    def num_levels(self) -> int:
        """Resolution levels: log2(downsample) + 1."""
        return int(math.log2(self.downsample)) + 1

    @property
    def multipliers(self) -> tuple[int, ...]:
        """``ch_mult``, or its default (1, 2, 2, ...)."""
        return self.ch_mult or (1,) + (2,) * (self.num_levels - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(H/f, W/f, z_channels)."""
        s = self.image_size // self.downsample
        return (s, s, self.z_channels)


def _group_norm(channels: int, name: str) -> nn.GroupNorm:
    # eps 1e-6 as LDM, whose Normalize always takes 32 groups; here DDPM++'s rule
    # (group_norm.num_groups: min(C // 4, 32), e.g. 16 at the default ch=64), kept so
    # that trained autoencoders compute what they were trained with.
    return nn.GroupNorm(num_groups=group_norm.num_groups(channels), epsilon=1e-6, name=name)


def _conv(features: int, kernel: int, name: str, stride: int = 1) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME", name=name)


class ResBlock(nn.Module):
    """LDM's ResnetBlock without time embedding: x + Conv(SiLU(GN(Conv(SiLU(GN(x))))))."""

    out_ch: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _conv(self.out_ch, 3, "Conv_0")(nn.silu(_group_norm(x.shape[-1], "GroupNorm_0")(x)))
        h = _conv(self.out_ch, 3, "Conv_1")(nn.silu(_group_norm(self.out_ch, "GroupNorm_1")(h)))
        if x.shape[-1] != self.out_ch:
            x = _conv(self.out_ch, 1, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """LDM's single-head spatial self-attention (GN, q/k/v/proj_out 1x1), per example."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, height, width, c = x.shape
        h = _group_norm(c, "GroupNorm_0")(x).reshape(n, height * width, c)
        q, k, v = (nn.Dense(c, name=name)(h) for name in ("q", "k", "v"))
        weights = jax.nn.softmax(jnp.einsum("nqc,nkc->nqk", q, k) * (c**-0.5), axis=-1)
        h = jnp.einsum("nqk,nkc->nqc", weights, v)
        return x + nn.Dense(c, name="proj_out")(h).reshape(n, height, width, c)


def _mid(x: jax.Array, config: AEConfig) -> jax.Array:
    c = x.shape[-1]
    x = ResBlock(c, name="mid_res_0")(x)
    if config.mid_attention:
        x = AttnBlock(name="mid_attn")(x)
    return ResBlock(c, name="mid_res_1")(x)


class Encoder(nn.Module):
    """Images (N, H, W, C) in [-1, 1] -> (mean, logvar), each (N, H/f, W/f, z_channels)."""

    config: AEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        mult = cfg.multipliers
        h = _conv(cfg.ch * mult[0], 3, "conv_in")(x)
        for level in range(cfg.num_levels):
            for i in range(cfg.num_res_blocks):
                h = ResBlock(cfg.ch * mult[level], name=f"down_{level}_res_{i}")(h)
            if level != cfg.num_levels - 1:
                # LDM pads (0, 1) on each spatial axis, then a 3x3 stride-2 conv: "SAME" here.
                h = _conv(h.shape[-1], 3, f"down_{level}_downsample", stride=2)(h)
        h = _mid(h, cfg)
        h = nn.silu(_group_norm(h.shape[-1], "norm_out")(h))
        moments = _conv(2 * cfg.z_channels, 3, "conv_out")(h)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)


class Decoder(nn.Module):
    """Latents (N, H/f, W/f, z_channels) -> images (N, H, W, C) (unbounded; ~[-1, 1])."""

    config: AEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        mult = cfg.multipliers
        h = _conv(cfg.ch * mult[-1], 3, "conv_in")(z)
        h = _mid(h, cfg)
        for level in reversed(range(cfg.num_levels)):
            for i in range(cfg.num_res_blocks + 1):
                h = ResBlock(cfg.ch * mult[level], name=f"up_{level}_res_{i}")(h)
            if level != 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = _conv(h.shape[-1], 3, f"up_{level}_upsample")(h)
        h = nn.silu(_group_norm(h.shape[-1], "norm_out")(h))
        return _conv(cfg.channels, 3, "conv_out")(h)


class KLAutoencoder(nn.Module):
    """``encode`` x -> (mean, logvar) of q(z | x); ``decode`` z -> x; ``__call__`` both."""

    config: AEConfig

    def setup(self) -> None:
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def _check(self, x: jax.Array, shape: tuple[int, ...], what: str) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
            raise ValueError(f"KLAutoencoder.{what} expects (N, {shape}), got {x.shape}.")

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        self._check(x, (cfg.image_size, cfg.image_size, cfg.channels), "encode")
        return self.encoder(x)

    def decode(self, z: jax.Array) -> jax.Array:
        self._check(z, self.config.latent_shape, "decode")
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(decode(mean), mean, logvar)."""
        mean, logvar = self.encode(x)
        return self.decode(mean), mean, logvar


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch axis (LDM's kl)."""
    terms = mean**2 + jnp.exp(logvar) - 1.0 - logvar
    return 0.5 * jnp.sum(terms.reshape(terms.shape[0], -1), axis=-1)


def init_params(config: AEConfig, key: jax.Array) -> dict:
    """Initial parameters of ``KLAutoencoder(config)`` (a batch of one dummy image)."""
    s = config.image_size
    x = jnp.zeros((1, s, s, config.channels), jnp.float32)
    return KLAutoencoder(config).init(key, x)["params"]
