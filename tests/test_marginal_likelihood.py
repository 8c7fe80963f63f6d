"""The importance-sampled marginal likelihood and DP-LFlow's image likelihood are exact
where the exact value is known: a linear-Gaussian model (closed form) and a 2-d latent
(quadrature on a grid)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import multivariate_normal

from dpjax.eval import marginal_likelihood as ml
from dpjax.methods import base, dplflow
from dpjax.models import conv_autoencoder
from tests.tree_utils import jittered


@pytest.mark.parametrize("model", sorted(conv_autoencoder.PIXEL_MODELS))
def test_pixel_likelihoods_are_normalized_over_the_256_levels(model):
    k = jnp.arange(256.0).reshape(256, 1, 1, 1) / 255
    for logit in (-30.0, -7.0, -1.3, -1e-5, 0.0, 3e-5, 0.4, 5.0, 40.0):
        lp = conv_autoencoder.PIXEL_MODELS[model](jnp.full((256, 1, 1, 1), logit), k)
        assert float(jnp.sum(jnp.exp(lp))) == pytest.approx(1.0, abs=1e-4)


def test_continuous_bernoulli_level_mass_is_the_integral_of_its_density():
    """P(k) = integral over [k/256, (k+1)/256] of C(lambda) lambda^x (1 - lambda)^(1 - x),
    integrated numerically, with C(lambda) = 2 atanh(1 - 2 lambda) / (1 - 2 lambda)."""
    for logit in (-6.0, -0.7, 2.5):
        lam = 1 / (1 + math.exp(-logit))
        c = 2 * math.atanh(1 - 2 * lam) / (1 - 2 * lam)
        for level in (0, 37, 128, 255):
            x = np.linspace(level / 256, (level + 1) / 256, 2001)
            dens = c * lam**x * (1 - lam) ** (1 - x)
            mass = float(np.sum((dens[1:] + dens[:-1]) / 2 * np.diff(x)))
            got = conv_autoencoder.continuous_bernoulli_log_prob(
                jnp.full((1, 1, 1, 1), logit), jnp.full((1, 1, 1, 1), level / 255)
            )
            assert float(got[0]) == pytest.approx(math.log(mass), abs=1e-4)


def test_binomial_pixel_likelihood_is_the_scaled_bce():
    # -log p = 255 BCE(k/255) - log C(255, k): the training loss up to scale and a constant.
    x01 = jnp.array([0.0, 17 / 255, 0.5 + 0.5 / 255, 1.0]).reshape(4, 1, 1, 1)
    lg = jnp.full_like(x01, 0.7)
    log_choose = np.array([math.log(math.comb(255, round(float(v) * 255))) for v in x01.ravel()])
    np.testing.assert_allclose(
        -conv_autoencoder.binomial_log_prob(lg, x01),
        255 * conv_autoencoder.bernoulli_nll(lg, x01) - log_choose,
        rtol=1e-5,
    )


def test_log_marginal_of_a_linear_gaussian_model_is_the_closed_form():
    """x | z ~ N(Az + b, s^2 I), z ~ N(0, I): p(x) = N(x; b, A A^T + s^2 I). The Laplace
    proposal is then the posterior itself, so with no inflation every weight is equal
    and the estimate is exact; inflated, it still converges to it."""
    d, n, s = 3, 6, 0.3
    a = jax.random.normal(jax.random.PRNGKey(0), (n, d))
    b = jax.random.normal(jax.random.PRNGKey(1), (n,))
    x = jax.random.normal(jax.random.PRNGKey(2), (n,)) * 2.0

    def log_joint(z):
        prior = multivariate_normal.logpdf(z, jnp.zeros(d), jnp.eye(d))
        return multivariate_normal.logpdf(x, a @ z + b, s**2 * jnp.eye(n)) + prior

    exact = float(multivariate_normal.logpdf(x, b, a @ a.T + s**2 * jnp.eye(n)))
    far = jnp.full((d,), 3.0)  # the mode search must get there
    est, diag = jax.jit(lambda k: ml.log_marginal(
        log_joint, far, k, ml.Settings(num_samples=64, inflate=1.0, mode_steps=50)))(
        jax.random.PRNGKey(3))  # fmt: skip
    assert float(est) == pytest.approx(exact, abs=2e-3)
    assert float(diag["ess"]) == pytest.approx(64, rel=1e-2)
    est, diag = jax.jit(lambda k: ml.log_marginal(
        log_joint, far, k, ml.Settings(num_samples=4096, inflate=1.5, mode_steps=50)))(
        jax.random.PRNGKey(4))  # fmt: skip
    assert float(est) == pytest.approx(exact, abs=0.02)
    assert 1 < float(diag["ess"]) < 4096


@pytest.mark.parametrize("pixel_model", sorted(conv_autoencoder.PIXEL_MODELS))
def test_dplflow_image_likelihood_equals_quadrature_over_a_2d_latent(pixel_model):
    """log p(x) of DP-LFlow (flow prior x the decoder's pixel model) against the integral
    computed on a grid over the whole latent plane; bits/dim is -log2 p(x) / (H W C)."""
    spec = base.DataSpec((8, 8, 1), 3)
    cfg = dplflow.Config(latent_dim=2, width=4, flow_layers=2, flow_hidden=8, conditional=True,
                         pixel_model=pixel_model)  # fmt: skip
    method = dplflow.make(cfg, spec)
    params = method.init(jax.random.PRNGKey(0), spec)
    # Fresh flows are the identity (zero output layers): jitter every weight.
    params = base.Params(jittered(params.trainable, seed=1, scale=0.2))
    images = jnp.round(jax.random.uniform(jax.random.PRNGKey(5), (2, 8, 8, 1)) * 255) / 255 * 2 - 1
    labels = jnp.array([1, 2])
    settings = ml.Settings(num_samples=4096)
    log_p, diag = jax.jit(lambda p: method.log_likelihood(p, images, labels, settings=settings))(
        params
    )
    tr = params.trainable
    grid = jnp.linspace(-8.0, 8.0, 801)
    step = float(grid[1] - grid[0])
    z = jnp.stack(jnp.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    for i in range(2):
        x01 = (images[i : i + 1] + 1) / 2

        def log_joint(zz, x01=x01, i=i):
            logits = method.ae.apply({"params": tr["ae"]}, zz[None], method="decode")
            log_pz = method.flow.apply({"params": tr["flow"]}, zz[None], labels[i : i + 1],
                                       method="log_prob")  # fmt: skip
            pixels = conv_autoencoder.PIXEL_MODELS[pixel_model](logits, x01)
            return pixels[0] + log_pz[0]

        values = jax.jit(jax.vmap(log_joint))(z)
        exact = float(jax.nn.logsumexp(values)) + 2 * math.log(step)
        assert float(log_p[i]) == pytest.approx(exact, abs=0.1)
        assert 1 < float(diag["ess"][i]) <= 4096
    bpd = jax.jit(lambda p: method.bits_per_dim(p, images, labels, settings=settings))(params)
    np.testing.assert_allclose(bpd, -log_p / (64 * math.log(2)), rtol=1e-6)
    with pytest.raises(ValueError, match="needs the images' labels"):
        method.log_likelihood(params, images)
