"""Tests of the DPDM method object: config, per-example loss, label dropout, sampling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax import typed_config
from dpjax.methods import base, dpdm, get_method_module
from dpjax.models import ncsnpp

SPEC = base.DataSpec(image_shape=(8, 8, 1), num_classes=2)
TINY = dpdm.Config(
    unet="custom", nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
    noise_multiplicity=4, num_steps=12, sample_batch=8,
)  # fmt: skip
K = TINY.noise_multiplicity


@pytest.fixture(scope="module")
def method():
    return dpdm.make(TINY, SPEC)


def numpy_params(unet_config: ncsnpp.UNetConfig, seed: int = 0) -> dict:
    """LeCun-normal kernels, unit GroupNorm scales, zero biases, drawn with NumPy.

    Stands in for ``method.init`` (checked separately with jax.eval_shape) because
    compiling the PRNG-based initialisers is slow on CPU; unlike the real init, the output
    layer is not zero, so the labels matter from the start.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = path[-1].key
        if name in ("scale", "bias"):
            return jnp.full(shape.shape, 1.0 if name == "scale" else 0.0, jnp.float32)
        std = 1.0 / np.sqrt(np.prod(shape.shape[:-1]))
        return jnp.asarray(rng.normal(0.0, std, shape.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, ncsnpp.param_shapes(unet_config))


@pytest.fixture(scope="module")
def params(method):
    return base.Params(trainable=numpy_params(method.unet_config), frozen={})


@pytest.fixture(scope="module")
def per_example_grads(method):
    """Per-example (loss, aux) and gradients of a batch, as the DP step computes them."""
    grad_fn = jax.value_and_grad(method.loss_per_example, has_aux=True)
    # XLA's CPU backend optimisations double the compile time of this small program and
    # save less than they cost over the 100 training steps below.
    return jax.jit(
        jax.vmap(grad_fn, in_axes=(None, None, 0, 0)),
        compiler_options={"xla_backend_optimization_level": 0},
    )


# The batch every per-example-gradient call uses (one compilation for all tests).
BATCH_LABELS = jnp.arange(8, dtype=jnp.int32) % 2
BATCH = {
    "image": jnp.where(BATCH_LABELS[:, None, None, None] == 1, 0.8, -0.8)
    * jnp.ones((8, *SPEC.image_shape)),
    "label": BATCH_LABELS,
}


def example(label=1, value=0.5):
    return {"image": jnp.full(SPEC.image_shape, value, jnp.float32), "label": jnp.int32(label)}


class RecordingNet:
    """A stand-in for the UNet that records what the loss feeds it (eager mode only)."""

    def __init__(self):
        self.calls = []

    def __call__(self, trainable, frozen=None, train=False, dropout_key=None):
        def net(x, c_noise, labels):
            self.calls.append((np.asarray(x), np.asarray(c_noise), np.asarray(labels)))
            return jnp.zeros_like(x)

        return net


def recorded_call(config, label, key):
    m = dpdm.make(config, SPEC)
    m.net = RecordingNet()
    m.loss_per_example({}, {}, example(label), key)
    (call,) = m.net.calls
    return call


def test_registry_and_typed_config():
    assert get_method_module("dpdm") is dpdm
    cfg = typed_config.from_configdict(dpdm.Config, {"noise_multiplicity": 8, "ch_mult": [1, 2]})
    assert cfg.noise_multiplicity == 8 and cfg.ch_mult == (1, 2)
    with pytest.raises(typed_config.ConfigError, match="noise_multiplicity"):
        typed_config.from_configdict(dpdm.Config, {"noise_multiplicty": 8})
    with pytest.raises(ValueError):
        dpdm.Config(sampler="dpm")


def test_unet_presets_are_resolved_from_the_data():
    mnist = dpdm.resolve_unet(dpdm.Config(), base.DataSpec((28, 28, 1), 10))
    assert mnist == ncsnpp.preset("mnist_28")
    celeba = dpdm.resolve_unet(dpdm.Config(), base.DataSpec((64, 64, 3), 0))
    assert celeba == ncsnpp.preset("celeba_64")
    assert dpdm.resolve_unet(TINY, SPEC).nf == 8
    with pytest.raises(ValueError, match="preset"):
        dpdm.resolve_unet(dpdm.Config(), base.DataSpec((12, 12, 1), 10))
    with pytest.raises(ValueError, match="cifar10_32"):
        dpdm.resolve_unet(dpdm.Config(unet="cifar10_32"), base.DataSpec((28, 28, 1), 10))


def test_init_all_trainable(method):
    params = jax.eval_shape(lambda key: method.init(key, SPEC), jax.random.key(0))
    assert params.frozen == {}
    assert base.count_params(params.trainable) == base.count_params(
        ncsnpp.param_shapes(method.unet_config)
    )
    with pytest.raises(ValueError, match="built for"):
        method.init(jax.random.key(0), base.DataSpec((8, 8, 1), 3))


def test_per_example_losses_and_gradients(params, per_example_grads):
    """Finite scalar losses and gradients; example i's loss and gradient do not change
    when another example of the batch changes (no cross-example statistic)."""
    keys = jax.random.split(jax.random.key(1), 8)
    (loss, aux), grads = per_example_grads(params.trainable, {}, BATCH, keys)
    assert loss.shape == (8,) and bool(jnp.all(jnp.isfinite(loss))) and bool(jnp.all(loss > 0))
    np.testing.assert_array_equal(aux["loss"], loss)
    norms = np.sqrt(sum(np.sum(np.reshape(g, (8, -1)) ** 2, 1) for g in jax.tree.leaves(grads)))
    assert np.all(np.isfinite(norms)) and np.all(norms > 0)

    batch2 = {"image": BATCH["image"].at[5].set(0.1), "label": BATCH["label"].at[5].set(0)}
    (loss2, _), grads2 = per_example_grads(params.trainable, {}, batch2, keys)
    others = np.array([0, 1, 2, 3, 4, 6, 7])
    np.testing.assert_allclose(loss2[others], loss[others], rtol=1e-6)
    for g, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
        np.testing.assert_allclose(g2[others], g[others], rtol=1e-5, atol=1e-7)
    assert float(loss2[5]) != float(loss[5])


def test_k_copies_share_the_label_and_draw_independent_noise():
    key = jax.random.key(2)
    x, c_noise, labels = recorded_call(TINY, 1, key)
    assert x.shape == (K, *SPEC.image_shape) and labels.shape == (K,)
    assert len(set(c_noise.tolist())) == K  # K independent sigma draws
    assert np.all(labels == 1)  # p = 0.1 kept it for this key; see the tests below
    # label_dropout=1: every copy gets the null class; 0: every copy keeps the label.
    _, _, dropped = recorded_call(dataclasses.replace(TINY, label_dropout=1.0), 1, key)
    np.testing.assert_array_equal(dropped, np.full(K, SPEC.num_classes))
    _, _, kept = recorded_call(dataclasses.replace(TINY, label_dropout=0.0), 0, key)
    np.testing.assert_array_equal(kept, np.zeros(K))


def test_label_dropout_is_one_draw_per_example():
    m = dpdm.make(dataclasses.replace(TINY, label_dropout=0.5), SPEC)
    keys = jax.random.split(jax.random.key(3), 200)
    labels = np.asarray(jax.vmap(lambda k: m.copy_labels(jnp.int32(1), k))(keys))
    assert labels.shape == (200, K)
    assert np.all(labels == labels[:, :1])  # all K copies agree, for every example
    dropped = np.mean(labels[:, 0] == SPEC.num_classes)
    assert 0.35 < dropped < 0.65


def test_unconditional_loss_ignores_labels():
    m = dpdm.make(TINY, base.DataSpec((8, 8, 1), 0))
    m.net = RecordingNet()
    m.loss_per_example({}, {}, example(0), jax.random.key(4))
    assert m.net.calls[0][2].shape == ()  # labels=None reached the network


def test_sample_shapes_ranges_and_labels(method, params):
    images, labels = method.sample_labelled(params, jax.random.key(6), 10)
    assert images.shape == (10, 8, 8, 1)
    assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
    assert labels.shape == (10,) and set(np.asarray(labels).tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="labels"):
        method.sample(params, jax.random.key(6), 2, jnp.array([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        method.sample(params, jax.random.key(6), 2, jnp.array([0, 1, 1]))
    # Traceable with traced labels, as under dpjax.sample.generate's outer jit.
    traced = jax.eval_shape(
        lambda p, k, y: method.sample(p, k, 10, y),
        params,
        jax.random.key(6),
        jnp.zeros((10,), jnp.int32),
    )
    assert traced.shape == (10, 8, 8, 1)


def test_labels_steer_a_trained_conditional_model(method, params, per_example_grads):
    """Non-private Adam on two classes of constant images (-0.8 and +0.8): class-conditional
    samples must land on their class's value."""
    opt = optax.adam(3e-3)
    update = jax.jit(lambda t, s, g: _apply(opt, t, s, jax.tree.map(lambda x: x.mean(axis=0), g)))
    trainable, opt_state = params.trainable, opt.init(params.trainable)
    first = None
    for i in range(100):
        keys = jax.random.split(jax.random.fold_in(jax.random.key(7), i), 8)
        (loss, _), grads = per_example_grads(trainable, {}, BATCH, keys)
        first = float(loss.mean()) if first is None else first
        trainable, opt_state = update(trainable, opt_state, grads)
    assert float(loss.mean()) < 0.5 * first

    wanted = jnp.array([0] * 8 + [1] * 8, jnp.int32)
    trained = base.Params(trainable=trainable, frozen={})
    samples, got = method.sample_labelled(trained, jax.random.key(8), 16, wanted)
    np.testing.assert_array_equal(got, wanted)
    means = np.asarray(samples.mean(axis=(1, 2, 3)))
    assert np.all(means[:8] < -0.5), means
    assert np.all(means[8:] > 0.5), means


def _apply(opt, trainable, opt_state, grads):
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state


def test_unconditional_sampling_returns_no_labels():
    m = dpdm.make(
        dataclasses.replace(TINY, num_steps=2, sample_batch=3), base.DataSpec((8, 8, 1), 0)
    )
    p = base.Params(
        trainable=jax.tree.map(lambda s: jnp.zeros(s.shape), ncsnpp.param_shapes(m.unet_config))
    )
    images, labels = m.sample_labelled(p, jax.random.key(9), 4)
    assert images.shape == (4, 8, 8, 1) and labels is None
    # Placeholder labels (as a generic caller passes them) are ignored.
    same = m.sample(p, jax.random.key(9), 4, jnp.zeros(4, jnp.int32))
    np.testing.assert_array_equal(same, images)


def test_paper_configuration_traces():
    """DPDM's MNIST setting (1.75M-parameter UNet, K=32) traces through per-example grads."""
    spec = base.DataSpec((28, 28, 1), 10)
    m = dpdm.make(dpdm.Config(), spec)
    params = jax.eval_shape(lambda key: m.init(key, spec), jax.random.key(0))
    assert base.count_params(params.trainable) == 1_753_345
    batch = {"image": jnp.zeros((2, 28, 28, 1)), "label": jnp.zeros((2,), jnp.int32)}
    grad_fn = jax.vmap(
        jax.value_and_grad(m.loss_per_example, has_aux=True), in_axes=(None, None, 0, 0)
    )
    (loss, _), grads = jax.eval_shape(
        grad_fn, params.trainable, {}, batch, jax.random.split(jax.random.key(0), 2)
    )
    assert loss.shape == (2,)
    assert jax.tree.map(lambda g: g.shape[1:], grads) == jax.tree.map(
        lambda p: p.shape, params.trainable
    )
