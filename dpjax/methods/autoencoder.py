"""The first stage of DP-LDM: a KL autoencoder trained NON-privately on public data.

DP-LDM (Lyu et al., TMLR 2024) pre-trains the autoencoder of a latent diffusion
model (Rombach et al., CVPR 2022, Sec. 3.1) on a public dataset, freezes it, and only
then touches private data. This method trains that autoencoder through the same train
loop as every other method, with ``dp.enabled=False`` on public data
(experiments/ae_mnist.py); its workdir is then the ``autoencoder_from`` of the latent
diffusion method (``dpjax/methods/ldm.py``), which refuses an autoencoder run with DP
enabled (its data would then be private, and statistics of it a release).

Objective per example, LDM's ``LPIPSWithDiscriminator`` without the perceptual and
adversarial terms (no pre-trained LPIPS network or discriminator is available offline):

    L(x) = mean_pixels |x - D(z)|  (or squared)  +  kl_weight * KL(q(z|x) || N(0, I)) / P,

z ~ q(z | x) (or its mean), P the number of pixel values. LDM sums both terms over the
pixels; dividing both by P keeps the meaning of ``kl_weight`` (LDM: 1e-6). The loss is
per example with no batch statistic (GroupNorm only), so it is also DP-SGD compatible.

``sample`` decodes latents drawn from the KL prior N(0, I): with LDM's tiny kl_weight
the encoder's latents are far from that prior, so these are a diagnostic of the latent
space (and what the loop's sample grid shows), not samples of a generative model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.methods import base
from dpjax.models import kl_autoencoder


@dataclasses.dataclass(frozen=True)
class Config:
    """KL autoencoder settings (architecture: ``kl_autoencoder.AEConfig``).

    Attributes:
      downsample: spatial downsampling factor f (2, 4 or 8).
      z_channels: latent channels.
      ch, ch_mult, num_res_blocks, mid_attention: the encoder/decoder widths and depth.
      recon: 'l1' (LDM's reconstruction loss) or 'l2'.
      kl_weight: weight of the KL term (LDM: 1e-6).
      sample_posterior: decode a sample of q(z|x) in the loss (LDM) rather than its mean.
    """

    downsample: int = 4
    z_channels: int = 3
    ch: int = 64
    ch_mult: tuple[int, ...] = ()
    num_res_blocks: int = 1
    mid_attention: bool = True
    recon: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6
    sample_posterior: bool = True

    def __post_init__(self) -> None:
        if self.recon not in ("l1", "l2"):
            raise ValueError(f"recon must be 'l1' or 'l2', got '{self.recon}'.")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}.")


def model_config(config: Config, spec: base.DataSpec) -> kl_autoencoder.AEConfig:
    """The autoencoder architecture of ``config`` for images of ``spec``."""
    height, width, channels = spec.image_shape
    if height != width:
        raise ValueError(f"The KL autoencoder needs square images, got {spec.image_shape}.")
    return kl_autoencoder.AEConfig(
        image_size=height,
        channels=channels,
        downsample=config.downsample,
        z_channels=config.z_channels,
        ch=config.ch,
        ch_mult=tuple(config.ch_mult),
        num_res_blocks=config.num_res_blocks,
        mid_attention=config.mid_attention,
    )


class Autoencoder(base.Method):
    """The KL autoencoder as a method: all parameters trainable, nothing frozen."""

    name = "autoencoder"
    samples_follow_labels = False  # Decodings of prior draws: labels are ignored.

    def __init__(self, config: Config, spec: base.DataSpec) -> None:
        self.config = config
        self.spec = spec
        self.model_config = model_config(config, spec)
        self.network = kl_autoencoder.KLAutoencoder(self.model_config)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(H/f, W/f, z_channels)."""
        return self.model_config.latent_shape

    def init(self, key: jax.Array, spec: base.DataSpec) -> base.Params:
        if spec.image_shape != self.spec.image_shape:
            raise ValueError(f"Autoencoder built for {self.spec}, init was given {spec}.")
        return base.Params(trainable=kl_autoencoder.init_params(self.model_config, key))

    def encode(self, weights: base.PyTree, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, logvar) of q(z | x) for images x (N, H, W, C) in [-1, 1]."""
        return self.network.apply({"params": weights}, x, method="encode")

    def decode(self, weights: base.PyTree, z: jax.Array) -> jax.Array:
        """Images (N, H, W, C) (not clipped) for latents z (N, H/f, W/f, z_channels)."""
        return self.network.apply({"params": weights}, z, method="decode")

    def loss_per_example(
        self, trainable: base.PyTree, frozen: base.PyTree, example: base.Example, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Reconstruction + kl_weight * KL / P of ONE example (see the module docstring).

        Returns:
          (loss, {'recon': per-pixel reconstruction error, 'kl': KL summed over latents}).
        """
        del frozen
        x = jnp.asarray(example["image"], jnp.float32)
        if x.shape != self.spec.image_shape:
            raise ValueError(f"Expected an image of shape {self.spec.image_shape}, got {x.shape}.")
        mean, logvar = self.encode(trainable, x[None])
        z = mean
        if self.config.sample_posterior:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        err = self.decode(trainable, z)[0] - x
        recon = jnp.mean(jnp.abs(err)) if self.config.recon == "l1" else jnp.mean(err**2)
        kl = kl_autoencoder.kl_to_standard_normal(mean, logvar)[0]
        loss = recon + self.config.kl_weight * kl / math.prod(x.shape)
        return loss, {"recon": recon, "kl": kl}

    def sample(
        self, params: base.Params, key: jax.Array, n: int, labels: jax.Array | None = None
    ) -> jax.Array:
        """Decodings of n latents z ~ N(0, I) (the KL prior), clipped to [-1, 1].

        A diagnostic only (see the module docstring); labels are ignored.
        """
        del labels
        z = jax.random.normal(key, (n, *self.latent_shape))
        return jnp.clip(self.decode(params.trainable, z), -1.0, 1.0)

    def latents(
        self,
        weights: base.PyTree,
        images: np.ndarray,
        key: jax.Array,
        sample_posterior: bool = False,
        chunk: int = 256,
    ) -> np.ndarray:
        """Latents (N, H/f, W/f, z) of uint8 images (N, H, W, C): q(z|x)'s means, or a
        draw of it; encoded in jitted chunks of the same static size (one compilation)."""
        size = min(chunk, len(images))

        @jax.jit
        def encode(w, x, k):
            mean, logvar = self.encode(w, base.to_model_range(x))
            if not sample_posterior:
                return mean
            return mean + jnp.exp(0.5 * logvar) * jax.random.normal(k, mean.shape)

        out = []
        for i, start in enumerate(range(0, len(images), size)):
            part = images[start : start + size]
            count = len(part)
            part = np.concatenate([part, np.zeros((size - count, *part.shape[1:]), part.dtype)])
            out.append(np.asarray(encode(weights, part, jax.random.fold_in(key, i)))[:count])
        return np.concatenate(out)

    def random_weights(self, rng: np.random.Generator) -> dict:
        """Random weights for smoke tests, drawn with NumPy (no initialiser to compile):
        LeCun-normal kernels, unit GroupNorm scales, zero biases."""
        shapes = jax.eval_shape(lambda: self.init(jax.random.key(0), self.spec).trainable)

        def leaf(path: tuple, shape: jax.ShapeDtypeStruct) -> np.ndarray:
            name = path[-1].key
            if name in ("scale", "bias"):
                return np.full(shape.shape, 1.0 if name == "scale" else 0.0, np.float32)
            fan_in = math.prod(shape.shape[:-1])
            return rng.normal(0.0, 1.0 / math.sqrt(fan_in), shape.shape).astype(np.float32)

        return jax.tree_util.tree_map_with_path(leaf, shapes)

    def reconstruct(self, params: base.Params, x: jax.Array) -> jax.Array:
        """decode(mean(encode(x))) for images x (N, H, W, C), clipped to [-1, 1]."""
        mean, _ = self.encode(params.trainable, x)
        return jnp.clip(self.decode(params.trainable, mean), -1.0, 1.0)


def make(config: Config, spec: base.DataSpec) -> Autoencoder:
    """Builds the KL autoencoder method for images described by ``spec``."""
    return Autoencoder(config, spec)
