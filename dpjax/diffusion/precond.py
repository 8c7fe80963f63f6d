"""Denoiser preconditioning and training noise distributions (pure functions).

Two parameterisations used by DPDM (Dockhorn et al., TMLR 2023):

* ``'edm'``: Karras et al. (NeurIPS 2022, "Elucidating the Design Space of Diffusion-Based
  Generative Models", Table 1), with DPDM's sigma_data = sqrt(1/3) (the std of U[-1, 1])
  instead of EDM's 0.5.
* ``'v'``: v-prediction (Salimans & Ho, ICLR 2022) written in the EDM form; DPDM uses it
  for its epsilon = 0.2 models.

In both, the denoiser is (EDM Eq. 7)

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), y),

and the training loss for one clean image x is (EDM Eqs. 2 and 8, Sec. 5)

    lambda(sigma) * mean_pixels (D(x + sigma n; sigma) - x)^2,  n ~ N(0, I).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

#: DPDM's data standard deviation: the std of U[-1, 1].
SIGMA_DATA = math.sqrt(1.0 / 3.0)

Kind = Literal["edm", "v"]

#: F(c_in x, c_noise, labels) -> output shaped like x; batch of N in, N out.
NetFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


class Coefficients(NamedTuple):
    """The four preconditioning functions of EDM Table 1, evaluated at sigma."""

    c_skip: jax.Array
    c_out: jax.Array
    c_in: jax.Array
    c_noise: jax.Array


def edm_coefficients(sigma: jax.Array, sigma_data: float = SIGMA_DATA) -> Coefficients:
    """EDM preconditioning (Karras et al. 2022, Table 1, "Ours" column).

    c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
    c_noise = ln(s) / 4.
    """
    var = sigma**2 + sigma_data**2
    return Coefficients(
        c_skip=sigma_data**2 / var,
        c_out=sigma * sigma_data / jnp.sqrt(var),
        c_in=1.0 / jnp.sqrt(var),
        c_noise=0.25 * jnp.log(sigma),
    )


def v_coefficients(sigma: jax.Array) -> Coefficients:
    """v-prediction in EDM form (DPDM denoiser.py VDenoiser; sigma_data = 1).

    c_skip = 1 / (s^2 + 1), c_out = s / sqrt(1 + s^2), c_in = 1 / sqrt(1 + s^2),
    c_noise = (2 / pi) arccos(1 / sqrt(1 + s^2)), i.e. the cosine-schedule time t(s).
    """
    var = sigma**2 + 1.0
    return Coefficients(
        c_skip=1.0 / var,
        c_out=sigma / jnp.sqrt(var),
        c_in=1.0 / jnp.sqrt(var),
        # arccos(1 / sqrt(1 + s^2)) = arctan(s); arctan is exact in float32 at small sigma.
        c_noise=(2.0 / jnp.pi) * jnp.arctan(sigma),
    )


def edm_loss_weight(sigma: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
    """EDM loss weight lambda(sigma) = (s^2 + sd^2) / (s sd)^2 (Karras et al. 2022, Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def v_loss_weight(sigma: jax.Array) -> jax.Array:
    """v-prediction loss weight (s^2 + 1) / s^2 (DPDM score_losses.py VLoss)."""
    return (sigma**2 + 1.0) / sigma**2


def edm_sample_sigma(
    key: jax.Array, shape: tuple[int, ...], p_mean: float = -1.2, p_std: float = 1.2
) -> jax.Array:
    """Training noise levels of EDM: ln(sigma) ~ N(P_mean, P_std^2) (Karras et al., Table 1)."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, shape))


def v_time_given_logsnr(logsnr: float) -> float:
    """Cosine-schedule time t at which log(alpha^2 / sigma^2) = logsnr.

    t = (2 / pi) arccos(1 / sqrt(1 + exp(-logsnr))) (DPDM score_losses.py VLoss).
    """
    return 2.0 * math.acos(1.0 / math.sqrt(1.0 + math.exp(-logsnr))) / math.pi


def v_sigma(t: jax.Array) -> jax.Array:
    """EDM-form noise level of the cosine schedule: sigma(t) = sqrt(cos(pi t / 2)^-2 - 1).

    Computed as the identical tan(pi t / 2), which does not cancel in float32 at small t.
    """
    return jnp.tan(jnp.pi * t / 2.0)


def v_sample_sigma(
    key: jax.Array, shape: tuple[int, ...], logsnr_min: float = -9.0, logsnr_max: float = 13.0
) -> jax.Array:
    """Training noise levels of the v loss: t ~ U[t(logsnr_max), t(logsnr_min)], sigma(t)."""
    t_lo, t_hi = v_time_given_logsnr(logsnr_max), v_time_given_logsnr(logsnr_min)
    return v_sigma(jax.random.uniform(key, shape, minval=t_lo, maxval=t_hi))


@dataclasses.dataclass(frozen=True)
class Preconditioning:
    """One parameterisation ('edm' or 'v') with its training noise distribution and weight.

    Attributes:
      kind: 'edm' (Karras et al. 2022) or 'v' (v-prediction).
      sigma_data: data std for 'edm' (DPDM: sqrt(1/3)); 'v' implies 1.
      p_mean, p_std: log-normal training sigma of 'edm'.
      logsnr_min, logsnr_max: range of the training log-SNR of 'v'.
    """

    kind: Kind = "edm"
    sigma_data: float = SIGMA_DATA
    p_mean: float = -1.2
    p_std: float = 1.2
    logsnr_min: float = -9.0
    logsnr_max: float = 13.0

    def __post_init__(self) -> None:
        if self.kind not in ("edm", "v"):
            raise ValueError(f"Unknown preconditioning '{self.kind}'; expected 'edm' or 'v'.")

    def coefficients(self, sigma: jax.Array) -> Coefficients:
        """c_skip, c_out, c_in, c_noise at ``sigma``."""
        if self.kind == "edm":
            return edm_coefficients(sigma, self.sigma_data)
        return v_coefficients(sigma)

    def loss_weight(self, sigma: jax.Array) -> jax.Array:
        """lambda(sigma)."""
        if self.kind == "edm":
            return edm_loss_weight(sigma, self.sigma_data)
        return v_loss_weight(sigma)

    def sample_sigma(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Noise levels drawn from the training distribution p(sigma)."""
        if self.kind == "edm":
            return edm_sample_sigma(key, shape, self.p_mean, self.p_std)
        return v_sample_sigma(key, shape, self.logsnr_min, self.logsnr_max)

    def denoise(
        self, net: NetFn, x: jax.Array, sigma: jax.Array, labels: jax.Array | None
    ) -> jax.Array:
        """D(x; sigma, y) = c_skip x + c_out F(c_in x, c_noise, y) (EDM Eq. 7).

        Args:
          net: the raw network F.
          x: (N, H, W, C) noisy images.
          sigma: (N,) noise levels.
          labels: (N,) class labels or None.
        """
        c = self.coefficients(sigma)
        b = lambda a: a.reshape(a.shape + (1,) * (x.ndim - a.ndim))
        out = net(b(c.c_in) * x, c.c_noise, labels)
        return b(c.c_skip) * x + b(c.c_out) * out

    def loss(
        self,
        net: NetFn,
        x: jax.Array,
        labels: jax.Array | None,
        sigma: jax.Array,
        noise: jax.Array,
    ) -> jax.Array:
        """Weighted denoising loss per row: lambda(s) mean_pixels (D(x + s n; s) - x)^2.

        Args:
          net: the raw network F.
          x: (N, H, W, C) clean images.
          labels: (N,) labels (or None).
          sigma: (N,) noise levels.
          noise: (N, H, W, C) standard normal noise.

        Returns:
          (N,) losses (EDM Eqs. 2 and 8, one draw of sigma and n per row).
        """
        b = lambda a: a.reshape(a.shape + (1,) * (x.ndim - a.ndim))
        denoised = self.denoise(net, x + b(sigma) * noise, sigma, labels)
        sq = jnp.mean(((denoised - x) ** 2).reshape(x.shape[0], -1), axis=-1)
        return self.loss_weight(sigma) * sq
