"""The DP engine as a library: private_gradient on a user's own model and loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.privacy import clipping, noise, private_gradient
from dpjax.privacy.plan import make_plan
from dpjax.privacy.sampling import PoissonSampler

N, D = 200, 5


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = (x @ np.arange(1, D + 1, dtype=np.float32) + 0.1 * rng.normal(size=N)).astype(np.float32)
    return {"x": x, "y": y}


def _loss(params, frozen, example, key):
    del frozen, key
    pred = example["x"] @ params["w"] + params["b"]
    return (pred - example["y"]) ** 2, {"abs_err": jnp.abs(pred - example["y"])}


def _plan(**kw):
    return make_plan(num_examples=N, batch_size=20, delta=1e-5, clip_norm=1.0, **kw)


def test_the_docstring_loop_trains_a_regression_and_spends_the_plans_epsilon():
    data = _data()
    plan = _plan(epochs=10, epsilon=8.0)
    params = {"w": jnp.zeros((D,)), "b": jnp.zeros(())}
    # Fixed seeds keep the test reproducible; a real run draws them secretly (docstring).
    sampler = PoissonSampler(N, plan.sampling_rate, seed=0, multiple=8)
    loss_key, noise_key = jax.random.split(jax.random.PRNGKey(1))
    start = float(np.mean([_loss(params, {}, {"x": x, "y": y}, None)[0]
                           for x, y in zip(data["x"], data["y"])]))
    for t in range(plan.steps):
        b = sampler.batch(t)
        rows = np.maximum(b.indices, 0)  # Padding (-1) reads row 0, masked out.
        examples = jax.tree_util.tree_map(lambda a, rows=rows: a[rows], data)
        keys = jax.random.split(jax.random.fold_in(loss_key, t), len(b.indices))
        grads, info = private_gradient.private_gradient(
            _loss, params, {}, examples, b.mask, keys, jax.random.fold_in(noise_key, t), plan,
            microbatch_size=8, num_real=b.num_real)
        assert int(info.num_valid) == b.num_real
        params = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grads)
    end = float(np.mean([_loss(params, {}, {"x": x, "y": y}, None)[0]
                         for x, y in zip(data["x"], data["y"])]))
    assert end < 0.5 * start  # It learns, through clipping and noise.
    assert plan.steps == 100 and 7.9 < plan.epsilon() <= 8.0


def test_it_is_the_clipped_sum_plus_sigma_c_noise_over_n_q_and_one_example_moves_it_by_c():
    data, plan = _data(), _plan(steps=10, noise_multiplier=1.3)
    params = {"w": jnp.ones((D,)), "b": jnp.zeros(())}
    examples = jax.tree_util.tree_map(lambda a: a[:16], data)
    mask = np.arange(16) < 12
    keys = jax.random.split(jax.random.PRNGKey(0), 16)
    nkey = jax.random.PRNGKey(7)
    grads, info = private_gradient.private_gradient(
        _loss, params, {}, examples, mask, keys, nkey, plan, microbatch_size=4)
    ref = clipping.clipped_grad_sum(_loss, params, {}, examples, jnp.asarray(mask), keys,
                                    clip_norm=1.0, microbatch_size=4)
    want = noise.add_gaussian_noise(ref.grad_sum, nkey, 1.3 * 1.0)
    for g, w in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w / plan.expected_batch_size, rtol=1e-6)
    assert int(info.num_valid) == 12
    # Removing one example (its row becomes padding), same noise: the unnormalized output
    # moves by at most C, the sensitivity the accountant assumes.
    fewer = mask.copy()
    fewer[11] = False
    other, _ = private_gradient.private_gradient(
        _loss, params, {}, examples, fewer, keys, nkey, plan, microbatch_size=4)
    moved = jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(
        jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(other))))
    assert 0.5 < float(moved) * plan.expected_batch_size <= 1.0 + 1e-5


def test_misuse_is_one_clear_error():
    data, plan = _data(), _plan(steps=10, noise_multiplier=1.0)
    params = {"w": jnp.ones((D,)), "b": jnp.zeros(())}
    examples = jax.tree_util.tree_map(lambda a: a[:8], data)
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    nkey = jax.random.PRNGKey(1)
    mask = np.ones(8, bool)

    def no_aux(p, f, e, k):
        return _loss(p, f, e, k)[0]

    with pytest.raises(TypeError, match=r"must return \(loss, aux\)"):
        private_gradient.private_gradient(no_aux, params, {}, examples, mask, keys, nkey, plan)
    for bad in (np.arange(8) > 2, jnp.arange(8) > 2):  # NumPy or a concrete JAX array.
        with pytest.raises(ValueError, match="real examples must come first"):
            private_gradient.private_gradient(_loss, params, {}, examples, bad, keys, nkey, plan)
    public = _plan(steps=10, noise_multiplier=1.0, enabled=False)
    with pytest.raises(ValueError, match="needs an enabled DP-SGD plan"):
        private_gradient.private_gradient(_loss, params, {}, examples, mask, keys, nkey, public)
