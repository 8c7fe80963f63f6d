"""Tests of the preconditioning (EDM, v) and of the samplers on analytically solvable data."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.diffusion import precond, samplers

SD = math.sqrt(1.0 / 3.0)


def random_sigma(n=64, seed=0):
    return jnp.asarray(np.exp(np.random.default_rng(seed).normal(-1.2, 2.0, n)), jnp.float32)


def test_edm_coefficients_match_karras_table_1():
    s = np.asarray(random_sigma(), np.float64)
    c = precond.edm_coefficients(jnp.asarray(s), SD)
    np.testing.assert_allclose(c.c_skip, SD**2 / (s**2 + SD**2), rtol=1e-5)
    np.testing.assert_allclose(c.c_out, s * SD / np.sqrt(SD**2 + s**2), rtol=1e-5)
    np.testing.assert_allclose(c.c_in, 1 / np.sqrt(SD**2 + s**2), rtol=1e-5)
    np.testing.assert_allclose(c.c_noise, np.log(s) / 4, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        precond.edm_loss_weight(jnp.asarray(s), SD), (s**2 + SD**2) / (s * SD) ** 2, rtol=1e-5
    )
    # EDM's design goal: unit-variance effective training target, c_out^2 * lambda = 1.
    np.testing.assert_allclose(c.c_out**2 * precond.edm_loss_weight(s, SD), 1.0, rtol=1e-5)


def test_v_coefficients_and_noise_distribution():
    s = np.asarray(random_sigma(), np.float64)
    c = precond.v_coefficients(jnp.asarray(s))
    np.testing.assert_allclose(c.c_skip, 1 / (s**2 + 1), rtol=1e-5)
    np.testing.assert_allclose(c.c_out, s / np.sqrt(1 + s**2), rtol=1e-5)
    np.testing.assert_allclose(c.c_in, 1 / np.sqrt(1 + s**2), rtol=1e-5)
    np.testing.assert_allclose(c.c_noise, 2 / np.pi * np.arccos(1 / np.sqrt(1 + s**2)), rtol=1e-4)
    np.testing.assert_allclose(precond.v_loss_weight(jnp.asarray(s)), (s**2 + 1) / s**2, rtol=1e-5)
    # t(logsnr) inverts the schedule: sigma(t(l)) = exp(-l / 2).
    for logsnr in (-9.0, 0.0, 13.0):
        t = precond.v_time_given_logsnr(logsnr)
        np.testing.assert_allclose(precond.v_sigma(jnp.asarray(t)), math.exp(-logsnr / 2), 1e-3)
    draws = precond.v_sample_sigma(jax.random.key(0), (4096,))
    logsnr = -2 * np.log(np.asarray(draws))
    assert logsnr.min() >= -9.0 - 1e-3 and logsnr.max() <= 13.0 + 1e-3
    assert logsnr.min() < -7 and logsnr.max() > 10


def test_edm_training_sigma_is_lognormal():
    log_s = np.log(np.asarray(precond.edm_sample_sigma(jax.random.key(1), (20000,))))
    assert abs(log_s.mean() + 1.2) < 0.05 and abs(log_s.std() - 1.2) < 0.05


@pytest.mark.parametrize("kind", ["edm", "v"])
def test_denoise_and_loss_follow_the_equations(kind):
    p = precond.Preconditioning(kind=kind)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 4, 4, 2)).astype(np.float32)
    noise = rng.normal(size=x.shape).astype(np.float32)
    labels = np.arange(6, dtype=np.int32)
    s = np.asarray(random_sigma(6, seed=3))
    net = lambda xin, c_noise, y: (
        jnp.tanh(xin) * 2 + c_noise[:, None, None, None] + y[:, None, None, None]
    )
    c = p.coefficients(jnp.asarray(s))
    b = lambda a: np.asarray(a)[:, None, None, None]
    f = np.tanh(b(c.c_in) * x) * 2 + b(c.c_noise) + b(labels)
    expected_d = b(c.c_skip) * x + b(c.c_out) * f
    np.testing.assert_allclose(p.denoise(net, x, s, labels), expected_d, rtol=1e-5, atol=1e-5)

    xn = x + b(s) * noise
    f_n = np.tanh(b(c.c_in) * xn) * 2 + b(c.c_noise) + b(labels)
    d_n = b(c.c_skip) * xn + b(c.c_out) * f_n
    expected_loss = np.asarray(p.loss_weight(s)) * ((d_n - x) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(p.loss(net, x, labels, s, noise), expected_loss, rtol=1e-4)


def test_karras_grid():
    sig = np.asarray(samplers.karras_sigmas(5, 0.002, 80.0, 7.0), np.float64)
    ramp = np.linspace(0, 1, 5)
    expected = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sig, expected, rtol=1e-5)
    assert np.all(np.diff(sig) < 0)


MU, S = 0.4, 0.5


def gaussian_denoiser(x, sigma, labels):
    """The exact denoiser of data ~ N(MU, S^2) per pixel: E[x0 | x_sigma]."""
    del labels
    s2 = sigma[:, None, None, None] ** 2
    return MU + S**2 / (S**2 + s2) * (x - MU)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sampler="ddim", num_steps=200),
        dict(sampler="heun", num_steps=50),
        dict(sampler="heun", num_steps=100, s_churn=10.0, s_min=0.01, s_max=50.0),
        dict(sampler="euler_stochastic", num_steps=500),
    ],
    ids=["euler", "heun", "heun_churn", "euler_stochastic"],
)
def test_samplers_recover_gaussian_data(kwargs):
    """With the exact denoiser, samples follow the data law N(MU, S^2) up to discretisation.

    (Step counts are chosen so that the discretisation error is below 2%: churn with a
    large gamma or Euler with few steps are visibly biased on this problem.)
    """
    run = jax.jit(lambda key: samplers.sample(gaussian_denoiser, key, (2048, 4, 4, 1), **kwargs))
    x = np.asarray(run(jax.random.key(3)), np.float64)
    # 32768 values: the standard error of the mean is 0.003, of the std 0.4%.
    assert abs(x.mean() - MU) < 0.02, x.mean()
    assert abs(x.std() / S - 1.0) < 0.03, x.std()


def test_guidance():
    def denoise(x, sigma, labels):
        return (
            0.5 * x + labels[:, None, None, None].astype(jnp.float32) + sigma[:, None, None, None]
        )

    x = jnp.ones((3, 2, 2, 1))
    sigma = jnp.array([0.1, 1.0, 10.0])
    labels = jnp.array([0, 1, 2])
    assert samplers.guided(denoise, 0.0, null_label=5) is denoise
    w = 2.0
    expected = (1 + w) * denoise(x, sigma, labels) - w * denoise(x, sigma, jnp.full((3,), 5))
    np.testing.assert_allclose(samplers.guided(denoise, w, 5)(x, sigma, labels), expected)
    # In a sampler: w = 0 gives exactly the conditional samples.
    run = lambda w: samplers.sample(
        denoise, jax.random.key(0), (3, 2, 2, 1), labels, num_steps=4, guidance=w, null_label=5
    )
    cond = samplers.sample(denoise, jax.random.key(0), (3, 2, 2, 1), labels, num_steps=4)
    np.testing.assert_array_equal(run(0.0), cond)
    assert not np.allclose(run(1.0), cond)


def test_guidance_needs_null_label_and_unknown_sampler_fails():
    with pytest.raises(ValueError, match="null_label"):
        samplers.sample(gaussian_denoiser, jax.random.key(0), (1, 1, 1, 1), guidance=1.0)
    with pytest.raises(ValueError, match="Unknown sampler"):
        samplers.sample(gaussian_denoiser, jax.random.key(0), (1, 1, 1, 1), sampler="dpm")


@pytest.mark.parametrize("config_cls", ["dpdm", "dpsad", "ldm"])
def test_every_diffusion_config_validates_its_sampler_when_built(config_cls):
    """The sampling fields are one definition (``SamplerSettings``) for all methods."""
    from dpjax.methods import dpdm, dpsad, ldm

    cls = {"dpdm": dpdm.Config, "dpsad": dpsad.Config, "ldm": ldm.Config}[config_cls]
    cfg = cls(sampler="heun", num_steps=7, s_churn=2.0)
    assert cfg.sample_kwargs()["sampler"] == "heun" and "sample_batch" not in cfg.sample_kwargs()
    assert cfg.sampler_settings()["num_steps"] == 7
    for bad, match in (
        ({"sampler": "hune"}, "Unknown sampler 'hune'"),
        ({"num_steps": 1}, "num_steps"),
        ({"sample_batch": 0}, "sample_batch"),
        ({"sigma_min": 90.0}, "sigma_min < sigma_max"),
    ):
        with pytest.raises(ValueError, match=match):
            cls(**bad)
