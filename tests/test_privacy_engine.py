"""The DP engine's guarantees: clipping, sensitivity, masking, noise, scaling, sampling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax.methods import toy
from dpjax.methods.base import DataSpec
from dpjax.privacy import clipping, microbatch_loop, noise
from dpjax.privacy.dp_step import example_keys, make_train_step
from dpjax.privacy.plan import DPPlan
from dpjax.privacy.sampling import PoissonSampler
from dpjax.randomness import Streams
from dpjax.state import TrainState

C = 0.5
SPEC = DataSpec((4, 4, 1), 3)


def _method(k=4):
    return toy.make(toy.Config(noise_multiplicity=k, input_noise=0.3), SPEC)


def _params(method, seed=0):
    p = method.init(jax.random.key(0), SPEC)
    rng = np.random.default_rng(seed)
    # Random parameters so that gradients are large and differ per example.
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape) * 2, x.dtype), p.trainable
    )


def _data(n=8, seed=1, scale=3.0):
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.normal(size=(n, 4, 4, 1)) * scale, jnp.float32),
        "label": jnp.asarray(rng.integers(0, 3, size=n), jnp.int32),
    }


def _keys(n, offset=0):
    return example_keys(jax.random.key(7), jnp.arange(offset, offset + n))


def _flat(tree):
    return jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(tree)])


def _sum(method, trainable, ex, mask, keys, m=4, clip=C):
    return clipping.clipped_grad_sum(
        method.loss_per_example, trainable, {}, ex, mask, keys, clip_norm=clip, microbatch_size=m
    )


def _contribution(method, trainable, ex, keys, i):
    """Example i's clipped gradient alone (mask selects only row i)."""
    n = ex["label"].shape[0]
    mask = jnp.arange(n) == i
    return _flat(_sum(method, trainable, ex, mask, keys).grad_sum)


def test_every_clipped_per_example_norm_is_at_most_c():
    method = _method()
    tr = _params(method)
    ex = _data()
    keys = _keys(8)
    res = _sum(method, tr, ex, jnp.ones(8, bool), keys)
    assert 0 < int(res.num_clipped) < 8, "test needs gradients above and below C"
    for i in range(8):
        n = float(jnp.linalg.norm(_contribution(method, tr, ex, keys, i)))
        assert n <= C * (1 + 1e-5), (i, n)
        # Clipped rows have norm exactly C; the others keep their own norm.
        assert n == pytest.approx(min(C, float(res.norms[i])), rel=1e-4)


@pytest.mark.parametrize("k", [1, 4])
def test_sensitivity_replace_remove_pad(k):
    """Two parameter groups (mean, log_scale) under ONE clip, K noise draws inside the loss."""
    method = _method(k)
    tr = _params(method)
    assert len(jax.tree_util.tree_leaves(tr)) == 2
    ex = _data()
    keys = _keys(8)
    full = _flat(_sum(method, tr, ex, jnp.ones(8, bool), keys).grad_sum)
    # Remove example 3 (add/remove neighbour): keys of the others are unchanged.
    keep = np.array([i for i in range(8) if i != 3])
    ex_rm = jax.tree_util.tree_map(lambda x: jnp.concatenate([x[keep], x[:1]]), ex)
    keys_rm = jnp.concatenate([keys[keep], keys[:1]])
    mask_rm = jnp.arange(8) < 7
    removed = _flat(_sum(method, tr, ex_rm, mask_rm, keys_rm).grad_sum)
    assert float(jnp.linalg.norm(full - removed)) <= clipping.sensitivity(C) * (1 + 1e-5)
    # Pad out example 3 (zero-out / replace-special neighbour).
    mask_pad = jnp.arange(8) != 3
    padded = _flat(_sum(method, tr, ex, mask_pad, keys).grad_sum)
    assert float(jnp.linalg.norm(full - padded)) <= C * (1 + 1e-5)
    # Replace example 3 by a wildly different one.
    ex_rep = {
        "image": ex["image"].at[3].set(-50.0),
        "label": ex["label"].at[3].set((ex["label"][3] + 1) % 3),
    }
    replaced = _flat(_sum(method, tr, ex_rep, jnp.ones(8, bool), keys).grad_sum)
    diff = float(jnp.linalg.norm(full - replaced))
    assert diff <= clipping.sensitivity(C, "replace_one") * (1 + 1e-5)
    assert diff > C * 0.5  # The replaced example did change the sum.


def test_perturbing_one_example_leaves_the_others_unchanged():
    method = _method()
    tr = _params(method)
    ex = _data()
    keys = _keys(8)
    ex2 = {"image": ex["image"].at[5].multiply(-7.0), "label": ex["label"]}
    for i in range(8):
        a = _contribution(method, tr, ex, keys, i)
        b = _contribution(method, tr, ex2, keys, i)
        if i == 5:
            assert not np.allclose(a, b)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_padding_and_nan_rows_contribute_exactly_zero():
    method = _method()
    tr = _params(method)
    ex = _data()
    keys = _keys(8)
    mask = jnp.arange(8) < 5
    ref = _sum(method, tr, ex, mask, keys)
    garbage = {"image": ex["image"].at[5:].set(1e30), "label": ex["label"]}
    out = _sum(method, tr, garbage, mask, keys)
    np.testing.assert_array_equal(np.asarray(_flat(ref.grad_sum)), np.asarray(_flat(out.grad_sum)))
    # A NaN example among real ones is dropped, reported, and equals a padded row.
    nan_ex = {"image": ex["image"].at[2].set(jnp.nan), "label": ex["label"]}
    res_nan = _sum(method, tr, nan_ex, jnp.ones(8, bool), keys)
    res_pad = _sum(method, tr, ex, jnp.arange(8) != 2, keys)
    assert int(res_nan.num_nonfinite) == 1 and int(res_nan.num_valid) == 7
    assert bool(jnp.all(jnp.isfinite(_flat(res_nan.grad_sum))))
    np.testing.assert_array_equal(
        np.asarray(_flat(res_nan.grad_sum)), np.asarray(_flat(res_pad.grad_sum))
    )


def test_a_gradient_whose_float32_norm_overflows_is_dropped_not_scaled():
    # Entries of 1e20 are finite float32, but their square is not: the row's norm is Inf.
    grads = {"w": jnp.array([[3.0, 4.0], [1e20, 0.0], [0.0, 0.5]])}
    loss = jnp.zeros(3)
    res = clipping._clip_and_sum(loss, {}, grads, jnp.ones(3, bool), clip_norm=1.0)
    assert np.isinf(float(res.norms[1]))
    assert int(res.num_nonfinite) == 1 and int(res.num_valid) == 2
    # Row 0 clipped to norm 1, row 1 adds nothing, row 2 (norm 0.5) unclipped.
    np.testing.assert_allclose(np.asarray(res.grad_sum["w"]), [0.6, 1.3], rtol=1e-6)


def test_a_non_finite_row_adds_nothing_to_its_class_slice_of_a_routed_sum():
    # Per-class routing (DP-LFlow's per_class): 0 * NaN is NaN, so the dropped row must be
    # zeroed before it is weighted, as on the unrouted path.
    grads = {"w": jnp.array([[3.0, 4.0], [jnp.nan, 0.0], [0.0, 2.0]])}
    res = clipping._clip_and_sum(jnp.zeros(3), {}, grads, jnp.ones(3, bool), clip_norm=1.0,
                                 routes=jnp.array([0, 1, 1]), num_routes=2)
    assert int(res.num_nonfinite) == 1
    np.testing.assert_allclose(np.asarray(res.grad_sum["w"]), [[0.6, 0.8], [0.0, 1.0]],
                               rtol=1e-6)


def test_microbatching_equals_one_big_batch():
    method = _method()
    tr = _params(method)
    ex = _data(n=12)
    keys = _keys(12)
    mask = jnp.arange(12) < 10
    a = _sum(method, tr, ex, mask, keys, m=12)
    b = _sum(method, tr, ex, mask, keys, m=2)
    c = clipping.clipped_grad_sum(
        method.loss_per_example, tr, {}, ex, mask, keys, clip_norm=C, microbatch_size=2, num_real=10
    )
    for r in (b, c):
        np.testing.assert_allclose(_flat(a.grad_sum), _flat(r.grad_sum), rtol=1e-5, atol=1e-6)
        assert int(r.num_valid) == 10
    np.testing.assert_allclose(a.norms[:10], c.norms[:10], rtol=1e-5)
    assert bool(jnp.all(jnp.isnan(c.norms[10:])))


@pytest.mark.parametrize("clip", [C, None])
def test_unrolled_micro_batches_equal_the_loop(clip):
    """The CPU default (micro-batches unrolled: XLA:CPU's loop bodies run convolutions on
    a slow path) gives the loop's sum, counts and norms, with an all-padding micro-batch
    that the loop skips and the unrolled version computes and masks out."""
    method = _method()
    tr = _params(method)
    ex, keys = _data(n=12), _keys(12)
    mask = jnp.arange(12) < 7
    results = {}
    for unroll in (True, False):
        fn = jax.jit(lambda t, e, mk, k, unroll=unroll: clipping.clipped_grad_sum(
            method.loss_per_example, t, {}, e, mk, k, clip_norm=clip, microbatch_size=3,
            num_real=7, unroll=unroll,
        ))  # fmt: skip
        has_loop = "while[" in str(jax.make_jaxpr(fn)(tr, ex, mask, keys))
        assert has_loop == (not unroll)
        results[unroll] = fn(tr, ex, mask, keys)
    a, b = results[True], results[False]
    np.testing.assert_allclose(_flat(a.grad_sum), _flat(b.grad_sum), rtol=1e-5, atol=1e-6)
    assert int(a.num_valid) == int(b.num_valid) == 7
    assert int(a.num_clipped) == int(b.num_clipped)
    np.testing.assert_array_equal(np.isnan(a.norms), np.isnan(b.norms))
    np.testing.assert_allclose(a.norms[:7], b.norms[:7], rtol=1e-5)
    # On this (CPU) backend the default is the unrolled form; elsewhere the loop.
    assert microbatch_loop.unroll_by_default(4) == (jax.default_backend() == "cpu")
    assert not microbatch_loop.unroll_by_default(microbatch_loop.MAX_UNROLLED_MICROBATCHES + 1)


def test_unclipped_sum_is_the_sum_of_per_example_gradients():
    """Public training (no clip) takes one backward pass of the summed loss; it equals
    the sum of the real rows' per-example gradients, padding excluded."""
    method = _method()
    tr = _params(method)
    ex = _data(n=12)
    keys = _keys(12)
    mask = jnp.arange(12) < 9
    got = _sum(method, tr, ex, mask, keys, m=4, clip=None)
    per_example = jax.vmap(
        jax.grad(lambda t, e, k: method.loss_per_example(t, {}, e, k)[0]), in_axes=(None, 0, 0)
    )(tr, ex, keys)
    want = jax.tree_util.tree_map(lambda g: jnp.sum(g[:9], axis=0), per_example)
    np.testing.assert_allclose(_flat(got.grad_sum), _flat(want), rtol=1e-5, atol=1e-6)
    assert int(got.num_valid) == 9 and int(got.num_clipped) == 0


def test_noise_std_is_sigma_times_c():
    sigma = 1.7
    zeros = {"a": jnp.zeros((50, 40)), "b": jnp.zeros((1000,))}
    draws = jnp.stack(
        [_flat(noise.add_gaussian_noise(zeros, jax.random.key(i), sigma * C)) for i in range(40)]
    )
    assert float(jnp.std(draws)) == pytest.approx(sigma * C, rel=0.01)
    assert abs(float(jnp.mean(draws))) < 0.01
    # Different keys give different noise; the same key the same noise.
    a = noise.add_gaussian_noise(zeros, jax.random.key(1), 1.0)
    b = noise.add_gaussian_noise(zeros, jax.random.key(1), 1.0)
    np.testing.assert_array_equal(_flat(a), _flat(b))
    assert not np.allclose(_flat(a), draws[2] / (sigma * C))


@pytest.mark.parametrize("size", [2, 7, 20_001])
def test_standard_normal_pieces_are_independent_and_cover_the_vector(size):
    """The flat draw is NOISE_CHUNKS pieces from fold_in(key, i). Reusing one key for
    every piece would repeat the noise (correlated coordinates: the sum's sensitivity is
    then not what the accountant assumes), and a piece too short would leave zeros."""
    z = np.asarray(noise.standard_normal(jax.random.key(3), size))
    assert z.shape == (size,) and z.dtype == np.float32 and np.all(z != 0)
    piece = -(-size // noise.NOISE_CHUNKS)
    first, second = z[:piece], z[piece : 2 * piece]
    assert not np.any(first[: len(second)] == second)
    if size > 1000:
        assert abs(np.corrcoef(first[: len(second)], second)[0, 1]) < 0.05
        assert np.std(z) == pytest.approx(1.0, rel=0.02)


def test_noise_transform_is_compiled_once_not_per_leaf():
    """Compile time: the normal's inverse-erf transform must not be fused into every
    leaf's add (it was: 289 copies for the DPDM UNet, 12x the compiled instructions of
    the noise). Counted in the compiled program's text, where each copy names its op."""
    tree = [jnp.zeros((100,)) for _ in range(48)]
    add = jax.jit(lambda t, k: noise.add_gaussian_noise(t, k, 1.0))
    text = add.lower(tree, jax.random.key(0)).compile().as_text()
    one_leaf = add.lower(tree[:1], jax.random.key(0)).compile().as_text()
    # 48 leaves may add slices and adds, but not 47 more transforms.
    assert text.count("erf") <= 2 * max(one_leaf.count("erf"), 1)


def _step_setup(sigma, n=40, q=0.25):
    method = _method()
    plan = DPPlan(
        num_examples=n, sampling_rate=q, noise_multiplier=sigma, clip_norm=C, steps=10, delta=1e-5
    )
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, size=(n, 4, 4, 1)), jnp.uint8)
    labels = jnp.asarray(rng.integers(0, 3, size=n), jnp.int32)
    tr = _params(method)
    opt = optax.sgd(1.0)
    state = TrainState.create(jax.tree_util.tree_map(jnp.copy, tr), {}, opt.init(tr))
    step = make_train_step(method, opt, plan, microbatch_size=4, ema_rate=0.9)
    sampler = PoissonSampler(n, q, seed=3, multiple=4)
    return method, plan, images, labels, tr, state, step, sampler


def test_update_divides_by_expected_batch_size_not_realized():
    method, plan, images, labels, tr, state, step, sampler = _step_setup(sigma=0.0)
    batch = next(b for b in map(sampler.batch, range(20)) if b.num_real != 10)
    assert batch.num_real != plan.expected_batch_size
    streams = Streams.from_seed(0)
    new, metrics = step(state, images, labels, batch.indices, batch.mask, batch.num_real, streams)
    from dpjax.privacy.dp_step import gather_examples

    ex = gather_examples(images, labels, jnp.asarray(batch.indices))
    keys = example_keys(jax.random.fold_in(streams.loss, 0), jnp.asarray(batch.indices))
    ref = _sum(method, tr, ex, jnp.asarray(batch.mask), keys).grad_sum
    expected = jax.tree_util.tree_map(lambda p, g: p - g / plan.expected_batch_size, tr, ref)
    np.testing.assert_allclose(_flat(new.trainable), _flat(expected), rtol=1e-5, atol=1e-6)
    assert int(metrics["batch_size"]) == batch.num_real


def test_ema_warm_up_counts_the_update_being_made_as_dpdm_does():
    """DPDM's EMA: decay min(rate, (1 + n) / (10 + n)) with n = 1 at the first update
    (its counter is incremented first), so EMA_1 = 2/11 init + 9/11 params_1."""
    method, plan, images, labels, tr, state, step, sampler = _step_setup(sigma=1.0)
    streams = Streams.from_seed(0)
    first = _flat(state.ema)
    for t in range(3):
        batch = sampler.batch(t)
        before = jax.tree_util.tree_map(np.array, state.ema)  # The step donates the state.
        state, _ = step(state, images, labels, batch.indices, batch.mask, batch.num_real,
                        streams)
        decay = min(0.9, (2 + t) / (11 + t))
        expected = jax.tree_util.tree_map(lambda e, p, d=decay: d * e + (1 - d) * p, before,
                                          state.trainable)
        np.testing.assert_allclose(_flat(state.ema), _flat(expected), rtol=1e-6, atol=1e-7)
    assert not np.allclose(_flat(state.ema), first)


def test_step_micro_batch_loop_setting_gives_the_same_update():
    """``dp.microbatch_loop`` changes how the step runs, not what it computes."""
    method, plan, images, labels, tr, _, _, sampler = _step_setup(sigma=1.0)
    batch = sampler.batch(0)
    assert batch.indices.shape[0] // 4 > 1  # Several micro-batches of 4.
    updates = []
    for loop in ("loop", "unroll", "auto"):
        step = make_train_step(
            method, optax.sgd(1.0), plan, microbatch_size=4, ema_rate=0.9, microbatch_loop=loop
        )
        # A fresh state each time: the step donates its input state.
        state = TrainState.create(jax.tree_util.tree_map(jnp.copy, tr), {}, optax.sgd(1.0).init(tr))
        new, _ = step(state, images, labels, batch.indices, batch.mask, batch.num_real,
                      Streams.from_seed(0))  # fmt: skip
        updates.append(_flat(new.trainable))
    for u in updates[1:]:
        np.testing.assert_allclose(u, updates[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dp.microbatch_loop must be one of"):
        make_train_step(method, optax.sgd(1.0), plan, microbatch_size=4, ema_rate=0.9,
                        microbatch_loop="unrolled")  # fmt: skip


def test_step_noise_has_std_sigma_c_over_nq():
    sigma = 3.0
    method, plan, images, labels, tr, state, step, sampler = _step_setup(sigma=sigma)
    batch = sampler.batch(0)
    # Same state and batch, noise seed varies through the streams: the update's spread is
    # the noise alone.
    ups = []
    for s in range(12):
        st = TrainState.create(jax.tree_util.tree_map(jnp.copy, tr), {}, optax.sgd(1.0).init(tr))
        streams = Streams.from_seed(0)
        streams = Streams(
            streams.init, streams.loss, jax.random.key(100 + s), streams.sample, streams.extra
        )
        new, _ = step(st, images, labels, batch.indices, batch.mask, batch.num_real, streams)
        ups.append(_flat(new.trainable))
    spread = float(jnp.std(jnp.stack(ups), axis=0).mean())
    expected = sigma * C / plan.expected_batch_size
    assert spread == pytest.approx(expected * np.sqrt(11 / 12), rel=0.1)
    # Exactly: update(sigma) - update(0) is -lr times ONE draw of N(0, (sigma C)^2) from
    # fold_in(noise stream, step) over N q (the spread above allows a 10% wrong scale).
    *_, step0, _ = _step_setup(sigma=0.0)
    streams = Streams.from_seed(0)
    fresh = lambda: TrainState.create(  # noqa: E731 - each step donates its state.
        jax.tree_util.tree_map(jnp.copy, tr), {}, optax.sgd(1.0).init(tr))
    args = (images, labels, batch.indices, batch.mask, batch.num_real, streams)
    noisy, clean = step(fresh(), *args)[0], step0(fresh(), *args)[0]
    zeros = jax.tree_util.tree_map(jnp.zeros_like, tr)
    draw = noise.add_gaussian_noise(zeros, jax.random.fold_in(streams.noise, 0), sigma * C)
    np.testing.assert_allclose(_flat(noisy.trainable) - _flat(clean.trainable),
                               -_flat(draw) / plan.expected_batch_size, rtol=1e-4, atol=1e-6)


def test_each_step_draws_fresh_noise_and_a_replayed_step_the_same():
    """The noise key is fold_in(noise stream, step): two steps never share a draw (a
    reused draw adds the same noise twice, which the accountant does not cover), and a
    replayed step (a resumed run) draws the same noise."""
    sigma = 1000.0  # The noise dominates the update (the clipped mean is at most C).
    method, plan, images, labels, tr, _, step, sampler = _step_setup(sigma=sigma)
    batch = sampler.batch(0)

    def update_at(t):
        copy = jax.tree_util.tree_map(jnp.copy, tr)
        st = dataclasses.replace(
            TrainState.create(copy, {}, optax.sgd(1.0).init(copy)), step=jnp.asarray(t, jnp.int32)
        )
        new, _ = step(
            st, images, labels, batch.indices, batch.mask, batch.num_real, Streams.from_seed(0)
        )
        return np.asarray(_flat(new.trainable) - _flat(tr))

    u0, u1 = update_at(0), update_at(1)
    np.testing.assert_array_equal(update_at(0), u0)
    # Independent draws: u0 - u1 has std sqrt(2) sigma C / (N q); a shared draw gives
    # about C / (N q) at most (the gradients differ only through the loss keys). The
    # bounds are loose for 51 parameters (about 3.5 standard errors).
    std = sigma * C / plan.expected_batch_size
    assert np.std(u0 - u1) > std
    assert abs(np.corrcoef(u0, u1)[0, 1]) < 0.5


def test_sampler_rate_padding_and_determinism():
    n, q = 5000, 0.03
    s = PoissonSampler(n, q, seed=11, multiple=32)
    sizes = [s.batch(t).num_real for t in range(300)]
    assert np.mean(sizes) == pytest.approx(n * q, rel=0.02)
    counts = np.zeros(n)
    for t in range(300):
        counts[s.indices(t)] += 1
    # Each example on its own is in each batch with probability q, independently: its
    # count over 300 steps is Binomial(300, q), whose variance over the examples checks
    # that no example is favoured (a sampler drawing half the data at rate 2q keeps the
    # mean, but its count variance is about 10x), and the batch sizes' variance
    # n q (1 - q) that they are Poisson, not a fixed size (variance 0). Seeded, so not
    # flaky; the tolerances are about 7 and 4 standard errors.
    assert np.var(counts) == pytest.approx(300 * q * (1 - q), rel=0.15)
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.35)
    for t in (0, 17, 299):
        idx = s.indices(t)
        assert len(np.unique(idx)) == len(idx) and idx.min() >= 0 and idx.max() < n
    b = s.batch(17)
    assert b.indices.shape[0] % 32 == 0 and b.indices.shape[0] >= b.num_real
    assert np.all(b.indices[b.num_real :] == -1) and not b.mask[b.num_real :].any()
    np.testing.assert_array_equal(
        b.indices, PoissonSampler(n, q, seed=11, multiple=32).batch(17).indices
    )
    assert not np.array_equal(s.indices(17), s.indices(18))
    assert not np.array_equal(s.indices(17), PoissonSampler(n, q, seed=12).indices(17))
    # Every padded batch shape is the same except with negligible probability.
    assert len({s.batch(t).indices.shape for t in range(300)}) == 1
    # A batch larger than the base size is padded up, never truncated.
    assert s.padded_size(s.base_size + 1) == s.base_size + 32
