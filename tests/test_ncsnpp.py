"""Tests of the DDPM++/NCSN++ UNet: DPDM's parameter counts, shapes, per-example isolation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.methods.base import count_params
from dpjax.models import ncsnpp

# method_details.md 1.1: our count of nv-tlabs/DPDM's NCSNpp (the paper's "1.75M").
DPDM_PARAM_COUNTS = {
    "mnist_28": 1_753_345,
    "fmnist_28": 1_753_345,
    "cifar10_32": 1_754_499,
    "celeba_32": 1_804_451,
    "celeba_64": 1_999_907,
}

TINY = ncsnpp.UNetConfig(
    nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_classes=3,
    image_size=8, channels=2,
)  # fmt: skip


def random_params(config: ncsnpp.UNetConfig, seed: int = 0) -> dict:
    """Random values of the right shapes (the real init zeroes the output conv, which would
    hide any coupling); no PRNG compilation needed."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), jnp.float32),
        ncsnpp.param_shapes(config),
    )


def inputs(config: ncsnpp.UNetConfig, n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    s, c = config.image_size, config.channels
    x = jnp.asarray(rng.normal(size=(n, s, s, c)), jnp.float32)
    c_noise = jnp.asarray(rng.normal(size=(n,)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, config.num_classes + 1, size=(n,)), jnp.int32)
    return x, c_noise, labels


@pytest.fixture(scope="module")
def tiny_apply():
    params = random_params(TINY)
    net = ncsnpp.NCSNpp(TINY)
    return jax.jit(lambda x, c, y: net.apply({"params": params}, x, c, y))


@pytest.mark.parametrize("name", sorted(DPDM_PARAM_COUNTS))
def test_param_counts_match_dpdm(name):
    shapes = ncsnpp.param_shapes(ncsnpp.preset(name))
    assert count_params(shapes) == DPDM_PARAM_COUNTS[name]


def test_label_embedding_has_null_class_and_unconditional_has_none():
    shapes = ncsnpp.param_shapes(ncsnpp.preset("cifar10_32"))
    assert shapes["label_embed"]["embedding"].shape == (11, 32)  # 10 classes + null
    assert "label_embed" not in ncsnpp.param_shapes(ncsnpp.preset("celeba_32"))


def test_output_shape_and_finite(tiny_apply):
    x, c, y = inputs(TINY, 5)
    out = tiny_apply(x, c, y)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


def test_no_batch_coupling(tiny_apply):
    """Changing example j (image, noise level and label) leaves every other output unchanged."""
    x, c, y = inputs(TINY, 5)
    out = tiny_apply(x, c, y)
    j = 3
    x2 = x.at[j].set(-2.0 * x[j] + 1.0)
    c2 = c.at[j].add(3.0)
    y2 = y.at[j].set((y[j] + 1) % (TINY.num_classes + 1))
    out2 = tiny_apply(x2, c2, y2)
    others = np.array([i for i in range(5) if i != j])
    np.testing.assert_allclose(out2[others], out[others], rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(out2[j] - out[j]))) > 1e-3


def test_vmap_of_single_examples_matches_batch(tiny_apply):
    x, c, y = inputs(TINY, 5)
    one = lambda xi, ci, yi: tiny_apply(xi[None], ci[None], yi[None])[0]
    np.testing.assert_allclose(jax.vmap(one)(x, c, y), tiny_apply(x, c, y), rtol=1e-4, atol=1e-5)


def test_unconditional_model_takes_no_labels():
    config = ncsnpp.UNetConfig(nf=4, ch_mult=(1,), num_res_blocks=1, image_size=4, channels=1)
    apply = jax.jit(lambda p, x, c: ncsnpp.NCSNpp(config).apply({"params": p}, x, c, None))
    out = apply(random_params(config), jnp.ones((2, 4, 4, 1)), jnp.zeros((2,)))
    assert out.shape == (2, 4, 4, 1)


def test_sinusoidal_embedding_formula():
    emb = ncsnpp.sinusoidal_embedding(jnp.array([0.5, -1.0]), 8)
    freqs = np.exp(-math.log(10000) / 3 * np.arange(4))
    args = np.array([0.5, -1.0])[:, None] * freqs
    np.testing.assert_allclose(emb, np.concatenate([np.sin(args), np.cos(args)], 1), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(image_size=28, ch_mult=(1, 2, 2, 2)), "cannot be halved at level 2"),
        (dict(image_size=32, attn_resolutions=(4,)), "not among the UNet's resolutions"),
        (dict(nf=6 + 1), "nf must be even"),
    ],
)
def test_invalid_configs_fail_loudly(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ncsnpp.UNetConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="Known presets"):
        ncsnpp.preset("mnist")


def test_group_counts_keep_ddpmpp_and_fit_any_width():
    """min(C // 4, 32) groups wherever that divides C (every published width: the
    numbers are unchanged), else the largest smaller divisor: widths such as 18 or 132
    failed at initialization ('Number of groups (4) does not divide ... (18)')."""
    from dpjax.models import discriminator, feature_cnn, group_norm

    assert [group_norm.num_groups(c) for c in (8, 16, 32, 64, 128, 256, 512)] == [
        2, 4, 8, 16, 32, 32, 32]
    assert [group_norm.num_groups(c) for c in (1, 3, 18, 132, 50)] == [1, 1, 3, 22, 10]
    with pytest.raises(ValueError, match="at least one channel"):
        group_norm.num_groups(0)
    odd = ncsnpp.UNetConfig(nf=18, ch_mult=(1, 2), num_res_blocks=1, num_classes=3,
                            image_size=8, channels=1)
    x, c_noise, labels = inputs(odd, 2)
    out = ncsnpp.NCSNpp(odd).apply({"params": random_params(odd)}, x, c_noise, labels)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    images = jnp.ones((2, 8, 8, 1))
    for net, args in ((discriminator.Discriminator((18, 50)), (images, images)),
                      (feature_cnn.FeatureCNN(num_classes=3, widths=(2, 6)), (images,))):
        variables = net.init(jax.random.key(0), *args)
        assert all(bool(jnp.all(jnp.isfinite(v)))
                   for v in jax.tree_util.tree_leaves(net.apply(variables, *args)))
