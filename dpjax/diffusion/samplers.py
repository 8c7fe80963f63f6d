"""Samplers for EDM-form denoisers: Euler ("ddim"), stochastic Euler, Heun with churn.

All samplers integrate the variance-exploding process x_sigma = x_0 + sigma n with
sigma(t) = t (Karras et al., NeurIPS 2022, "EDM"), given a denoiser

    denoise(x, sigma, labels) -> D(x; sigma, y),   x (N, H, W, C), sigma (N,), labels (N,)

and are jittable: the loop over noise levels is a ``lax.fori_loop``, so a sampler
compiles once whatever the number of steps. They follow DPDM's ``samplers.py``
(Dockhorn et al., TMLR 2023): the same grid, the final denoising step of "ddim", the
churn limit of 1 and no second-order correction on the last Heun step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

Denoiser = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]
SamplerName = Literal["ddim", "heun", "euler_stochastic"]
SAMPLERS = ("ddim", "heun", "euler_stochastic")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """The sampling fields of a diffusion method's config (DPDM, DP-LDM, DP-SAD).

    A method's ``Config`` inherits them, so every diffusion method validates them the
    same way, when the config is built.

    Attributes:
      sampler: 'ddim' (Euler ODE), 'heun' (EDM Algorithm 2) or 'euler_stochastic'.
      num_steps, sigma_min, sigma_max, rho: the Karras sampling grid.
      s_churn, s_min, s_max, s_noise: Heun churn parameters.
      guidance: classifier-free guidance weight w (0 = none, DPDM's default).
      sample_batch: images per jitted sampling call.
    """

    sampler: SamplerName = "ddim"
    num_steps: int = 50
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    s_churn: float = 0.0
    s_min: float = 0.0
    s_max: float = math.inf
    s_noise: float = 1.0
    guidance: float = 0.0
    sample_batch: int = 256

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"Unknown sampler '{self.sampler}'; use one of {SAMPLERS}.")
        if self.num_steps < 2:
            raise ValueError(f"num_steps must be >= 2, got {self.num_steps}.")
        if self.sample_batch < 1:
            raise ValueError(f"sample_batch must be >= 1, got {self.sample_batch}.")
        if not 0.0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}."
            )
        if not self.rho > 0.0:
            raise ValueError(f"rho must be > 0, got {self.rho}.")
        if not (self.s_churn >= 0.0 and self.s_noise >= 0.0 and self.guidance >= 0.0):
            raise ValueError("s_churn, s_noise and guidance must be >= 0, got "
                             f"{self.s_churn}, {self.s_noise} and {self.guidance}.")
        if not 0.0 <= self.s_min <= self.s_max:
            raise ValueError(f"need 0 <= s_min <= s_max, got {self.s_min} and {self.s_max}.")

    def sampler_settings(self) -> dict[str, object]:
        """These fields (of this or a subclass' instance) by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplerSettings)}

    def sample_kwargs(self) -> dict[str, object]:
        """The keyword arguments of ``sample`` that these settings give."""
        out = self.sampler_settings()
        del out["sample_batch"]
        return out


@dataclasses.dataclass(frozen=True)
class SamplerOverrides:
    """Sampler fields to use instead of a trained run's (the ``eval.sampling`` section).

    ``None`` keeps the run's value. Sampling only post-processes the released weights,
    so another sampler costs no privacy (e.g. DPDM's Churn samplers, tuned once for FID
    and once for accuracy, Dockhorn et al. Sec. 5, on a model trained with "ddim").
    """

    sampler: SamplerName | None = None
    num_steps: int | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float | None = None
    s_churn: float | None = None
    s_min: float | None = None
    s_max: float | None = None
    s_noise: float | None = None
    guidance: float | None = None

    def given(self) -> dict[str, object]:
        """The fields set (not None), by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    def apply(self, settings: SamplerSettings) -> SamplerSettings:
        """``settings`` (a method's config) with these fields replaced, validated again.

        Raises:
          ValueError: the result is not a valid sampler (e.g. sigma_min >= sigma_max).
        """
        return dataclasses.replace(settings, **self.given()) if self.given() else settings


def karras_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> jax.Array:
    """The EDM noise-level grid (Karras et al. 2022, Eq. 5), decreasing, without the final 0.

    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}.")
    ramp = jnp.linspace(0.0, 1.0, num_steps)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def guided(denoise: Denoiser, guidance: float, null_label: int) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2021): D~ = (1 + w) D(x, y) - w D(x, null).

    With ``guidance == 0`` the conditional denoiser is returned unchanged (one evaluation).
    """
    if guidance == 0:
        return denoise

    def guided_denoise(x: jax.Array, sigma: jax.Array, labels: jax.Array | None) -> jax.Array:
        if labels is None:
            raise ValueError("Classifier-free guidance needs labels.")
        null = jnp.full_like(labels, null_label)
        return (1.0 + guidance) * denoise(x, sigma, labels) - guidance * denoise(x, sigma, null)

    return guided_denoise


def _full(t: jax.Array, n: int) -> jax.Array:
    return jnp.full((n,), t, dtype=jnp.float32)


def euler_sampler(
    denoise: Denoiser,
    key: jax.Array,
    shape: tuple[int, ...],
    labels: jax.Array | None,
    sigmas: jax.Array,
    stochastic: bool = False,
) -> jax.Array:
    """Euler on the probability-flow ODE ("ddim" in DPDM), or Euler-Maruyama on the SDE.

    Deterministic: dx/dsigma = (x - D(x; sigma)) / sigma (EDM Eqs. 1 and 3 with sigma(t) = t), so
    x <- x + (sigma_{i+1} - sigma_i) (x - D) / sigma_i. Stochastic: the reverse-time SDE
    (Song et al. 2021, Eq. 6) for sigma(t) = t, dx = 2 (x - D) / sigma dsigma + sqrt(2 sigma
    |dsigma|) z. After the last grid point the sample is the denoised x = D(x; sigma_min).

    Args:
      denoise: D(x, sigma, labels).
      key: randomness of the initial noise (and of the SDE noise).
      shape: (N, H, W, C).
      labels: (N,) labels or None.
      sigmas: decreasing grid, e.g. ``karras_sigmas(num_steps)``.
      stochastic: Euler-Maruyama instead of the ODE.

    Returns:
      (N, H, W, C) samples.
    """
    n = shape[0]
    init_key, loop_key = jax.random.split(key)
    x = sigmas[0] * jax.random.normal(init_key, shape)

    def step(i: int, x: jax.Array) -> jax.Array:
        t0, t1 = sigmas[i], sigmas[i + 1]
        d = denoise(x, _full(t0, n), labels)
        if not stochastic:
            return x + (t1 - t0) * (x - d) / t0
        z = jax.random.normal(jax.random.fold_in(loop_key, i), shape)
        return x + 2.0 * (t1 - t0) * (x - d) / t0 + jnp.sqrt(2.0 * jnp.abs(t1 - t0) * t0) * z

    x = jax.lax.fori_loop(0, sigmas.shape[0] - 1, step, x)
    return denoise(x, _full(sigmas[-1], n), labels)


def heun_sampler(
    denoise: Denoiser,
    key: jax.Array,
    shape: tuple[int, ...],
    labels: jax.Array | None,
    sigmas: jax.Array,
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = math.inf,
    s_noise: float = 1.0,
    churn_limit: float = 1.0,
) -> jax.Array:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2).

    At each sigma_i in [S_min, S_max] noise is first added to raise the level to
    sigma_hat = (1 + gamma) sigma_i, gamma = min(S_churn / N, churn_limit) (DPDM uses a
    limit of 1, EDM sqrt(2) - 1); then a Heun step to sigma_{i+1} with the second-order
    correction on every step except the last (sigma_N = 0), which is a plain Euler step
    and returns D(x_hat; sigma_hat). With S_churn = 0 this is the deterministic Heun
    sampler (EDM Algorithm 1).

    Args:
      denoise: D(x, sigma, labels).
      key: randomness of the initial noise and of the churn.
      shape: (N, H, W, C).
      labels: (N,) labels or None.
      sigmas: decreasing grid without the final 0, e.g. ``karras_sigmas(num_steps)``.
      s_churn, s_min, s_max, s_noise: EDM's stochasticity parameters.
      churn_limit: the largest gamma.

    Returns:
      (N, H, W, C) samples.
    """
    n = shape[0]
    num_steps = sigmas.shape[0]
    t_steps = jnp.concatenate([sigmas, jnp.zeros((1,), sigmas.dtype)])
    gamma_on = min(s_churn / num_steps, churn_limit)
    init_key, churn_key = jax.random.split(key)

    def churn_and_euler(i: int, x: jax.Array) -> tuple[jax.Array, ...]:
        t0, t1 = t_steps[i], t_steps[i + 1]
        # Algorithm 2, lines 4-6: temporarily increase the noise level.
        gamma = jnp.where((t0 >= s_min) & (t0 <= s_max), gamma_on, 0.0)
        t_hat = t0 + gamma * t0
        x_hat = x
        if gamma_on > 0:  # static: no noise is drawn at all without churn
            z = jax.random.normal(jax.random.fold_in(churn_key, i), shape)
            # sqrt(t_hat^2 - t0^2) as t0 sqrt(gamma (2 + gamma)): exactly 0 when gamma = 0.
            x_hat = x + s_noise * t0 * jnp.sqrt(gamma * (2.0 + gamma)) * z
        # Lines 7-8: Euler step from t_hat to t1.
        d_cur = (x_hat - denoise(x_hat, _full(t_hat, n), labels)) / t_hat
        return x_hat, t_hat, x_hat + (t1 - t_hat) * d_cur, d_cur

    def step(i: int, x: jax.Array) -> jax.Array:
        x_hat, t_hat, x_next, d_cur = churn_and_euler(i, x)
        # Lines 9-11: second-order (trapezoidal) correction.
        t1 = t_steps[i + 1]
        d_prime = (x_next - denoise(x_next, _full(t1, n), labels)) / t1
        return x_hat + (t1 - t_hat) * (0.5 * d_cur + 0.5 * d_prime)

    x = t_steps[0] * jax.random.normal(init_key, shape)
    x = jax.lax.fori_loop(0, num_steps - 1, step, x)
    # Last step to sigma = 0: Euler only, x_N = D(x_hat; sigma_hat).
    return churn_and_euler(num_steps - 1, x)[2]


def sample(
    denoise: Denoiser,
    key: jax.Array,
    shape: tuple[int, ...],
    labels: jax.Array | None = None,
    *,
    sampler: SamplerName = "ddim",
    num_steps: int = 50,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = math.inf,
    s_noise: float = 1.0,
    guidance: float = 0.0,
    null_label: int | None = None,
) -> jax.Array:
    """Draws ``shape[0]`` samples with the named sampler on the Karras grid.

    Args:
      denoise: D(x, sigma, labels).
      key: sampling randomness.
      shape: (N, H, W, C).
      labels: (N,) class labels, or None for an unconditional model.
      sampler: 'ddim' (Euler ODE + final denoise), 'heun' (EDM Algorithm 2) or
        'euler_stochastic' (Euler-Maruyama + final denoise).
      num_steps: number of grid points (= denoiser evaluations for 'ddim').
      sigma_min, sigma_max, rho: the grid (Karras et al. 2022, Eq. 5).
      s_churn, s_min, s_max, s_noise: Heun churn parameters (ignored by the others).
      guidance: classifier-free guidance weight w (0 = none).
      null_label: the null class index, required when ``guidance != 0``.
    """
    if guidance != 0:
        if null_label is None:
            raise ValueError("guidance != 0 needs the null_label of the model.")
        denoise = guided(denoise, guidance, null_label)
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    if sampler == "ddim":
        return euler_sampler(denoise, key, shape, labels, sigmas)
    if sampler == "euler_stochastic":
        return euler_sampler(denoise, key, shape, labels, sigmas, stochastic=True)
    if sampler == "heun":
        return heun_sampler(denoise, key, shape, labels, sigmas, s_churn, s_min, s_max, s_noise)
    raise ValueError(
        f"Unknown sampler '{sampler}'; expected one of 'ddim', 'heun', 'euler_stochastic'."
    )
