"""The ghost clipping path equals the reference (vmap of grad) and forms no per-example
gradients for the layers it ghost-norms."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.methods import base, dpdm
from dpjax.privacy import clipping, ghost, unfolding
from tests.test_layerwise import _assert_trees_close, _Zoo, _zoo_batch, _zoo_loss

CLIP = 0.05


def _reference(loss, params, ex, mask, keys, clip_norm=CLIP):
    return clipping.clipped_grad_sum(
        loss, params, None, ex, mask, keys, clip_norm=clip_norm, microbatch_size=mask.shape[0]
    )


def _ghost(loss, params, ex, mask, keys, mode, clip_norm=CLIP):
    def run(t, e, m, k):
        out_loss, aux, norms, summer = ghost.norms_and_sum(loss, t, None, e, m, k, mode=mode)
        return clipping._finish(out_loss, aux, norms, m, clip_norm, summer)

    return jax.jit(run)(params, ex, mask, keys)


def _check_equal(ref, got, num_real):
    np.testing.assert_allclose(got.norms, ref.norms, rtol=1e-4, equal_nan=True)
    assert int(got.num_valid) == int(ref.num_valid)
    assert int(got.num_nonfinite) == int(ref.num_nonfinite)
    assert int(got.num_clipped) == int(ref.num_clipped) > 0
    # The contributions (norm <= C each) partly cancel: bound the error by their scale too.
    _assert_trees_close(ref.grad_sum, got.grad_sum, atol=1e-5 * CLIP)
    total = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree_util.tree_leaves(got.grad_sum)))
    assert total <= num_real * CLIP * (1 + 1e-5)


def _check_bound_and_sum(loss, params, ex, mask, keys, ref, got, num_real, frozen=None,
                         clip=CLIP):
    """Forced ghost norms on layers of many positions: the rounding bound that
    ``_ghost_sq_norm`` adds makes them larger than the reference's (never smaller) but
    only slightly (measured 1.01x on the zoo: a wrong Gram term, e.g. a doubled
    diagonal, is far outside 1.05x), and the clipped sum is the reference's per-example
    gradients weighted by the factors of those norms."""
    real = np.asarray(mask) & np.isfinite(np.asarray(ref.norms))
    got_norms, ref_norms = np.asarray(got.norms)[real], np.asarray(ref.norms)[real]
    assert np.all(got_norms >= ref_norms * (1 - 1e-6))
    assert np.all(got_norms <= ref_norms * 1.05), got_norms / ref_norms
    assert int(got.num_valid) == int(ref.num_valid) and int(got.num_clipped) > 0
    grads = jax.vmap(jax.grad(lambda t, e, k: loss(t, frozen, e, k)[0]), in_axes=(None, 0, 0))(
        params, ex, keys)
    valid = mask & jnp.isfinite(ref.norms)
    factors = clipping.clip_factors(got.norms, valid, clip)
    _assert_trees_close(clipping.weighted_sum(grads, factors, valid), got.grad_sum,
                        atol=1e-5 * clip)
    total = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree_util.tree_leaves(got.grad_sum)))
    assert total <= num_real * clip * (1 + 1e-5)


@pytest.mark.parametrize("mode", ghost.GHOST_MODES)
def test_every_layer_kind_matches_the_reference(mode):
    """Dense, strided/dilated/padded Conv and ConvTranspose, norms and an embedding, two
    noisy copies per example, a NaN example and a padding row. In 'auto' (what training
    uses) the rounding bound of the ghost norms is below float32 noise here; 'ghost'
    forces them on layers of 1,056 positions, where it is not (``_check_bound_and_sum``).
    The zoo's layers have many positions, so 'auto' ghosts none of them and runs the
    per-example route: ghost norms chosen by 'auto' are checked on the DPDM UNet
    (``test_ghost_holds_no_per_example_kernel_gradients``)."""
    model = _Zoo()
    ex = _zoo_batch(6)
    ex["image"] = ex["image"].at[1].set(jnp.nan)
    params = model.init(jax.random.PRNGKey(0), ex["image"][:1], ex["label"][:1])["params"]
    loss = _zoo_loss(model)
    keys = jax.random.split(jax.random.PRNGKey(2), 6)
    mask = jnp.array([True, True, True, True, True, False])
    ref = _reference(loss, params, ex, mask, keys)
    got = _ghost(loss, params, ex, mask, keys, mode)
    assert int(ref.num_nonfinite) == 1
    fraction = ghost.ghosted_fraction(loss, params, None, ex, mask, keys, mode=mode)
    assert fraction > 0.9 if mode == "ghost" else fraction == 0.0, (mode, fraction)
    if mode == "ghost":
        _check_bound_and_sum(loss, params, ex, mask, keys, ref, got, 4)
    else:
        _check_equal(ref, got, 4)
    # A NaN row contributes exactly nothing: its where() comes before every product.
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(got.grad_sum))


def _squared_output_loss(model, reduce):
    """A per-example loss ``reduce(model(x)^2)`` in the clipping paths' signature."""

    def loss(t, frozen, example, key):
        del frozen, key
        return reduce(model.apply({"params": t}, example) ** 2), {}

    return loss


class _Shared(nn.Module):
    """One Dense applied twice (weight sharing) beside an ordinary wide Dense."""

    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(16)
        h = jnp.tanh(shared(x))
        h = jnp.tanh(nn.Dense(16)(h))
        return nn.Dense(1)(shared(h))


def test_a_layer_called_twice_gets_the_norm_of_its_summed_gradient():
    """Per-call ghost norms would miss the cross term between the two calls' gradients;
    the shared kernel must take the per-example route even when ghost is forced."""
    model = _Shared()
    x = jax.random.normal(jax.random.PRNGKey(3), (5, 3, 16))
    params = model.init(jax.random.PRNGKey(0), x[0])["params"]

    loss = _squared_output_loss(model, jnp.mean)
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    mask = jnp.ones(5, bool)
    ref = _reference(loss, params, x, mask, keys, clip_norm=1e-3)
    got = _ghost(loss, params, x, mask, keys, "ghost", clip_norm=1e-3)
    np.testing.assert_allclose(got.norms, ref.norms, rtol=1e-4)
    _assert_trees_close(ref.grad_sum, got.grad_sum, atol=1e-8)


# The tiny DPDM UNet through ``clipped_grad_sum(impl='ghost')`` in micro-batches:
# tests/test_layerwise.py::test_dpdm_step_sums_equal_between_paths.


def test_ghost_is_chosen_only_where_cheaper():
    # A 3x3 convolution 128 -> 128 at 8x8: T (P_in + C_out) = 64 * 1280 < 1152 * 128.
    assert ghost.ghost_is_cheaper(64, 9 * 128, 128)
    # The same at 32x32 with 32 noise copies: per-example gradients are cheaper.
    assert not ghost.ghost_is_cheaper(32 * 32 * 32, 9 * 128, 128)
    # An embedding projection (one position) is always ghost-normed.
    assert ghost.ghost_is_cheaper(1, 512, 512)
    with pytest.raises(ValueError, match="Unknown ghost mode"):
        ghost.norms_and_sum(None, {}, None, {}, jnp.ones(1, bool), None, mode="fast")


class _Wide(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(3):
            x = jnp.tanh(nn.Dense(256)(x))
        return nn.Dense(1)(x)


def test_ghost_holds_no_per_example_kernel_gradients():
    """Compiled temporary memory: 'layerwise' holds B x P floats of per-example
    gradients (64 x 197k x 4 bytes = 50 MB); 'ghost' must stay far below that."""
    model = _Wide()
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 256))
    params = model.init(jax.random.PRNGKey(1), x[0])["params"]
    num_params = sum(p.size for p in jax.tree_util.tree_leaves(params))

    loss = _squared_output_loss(model, jnp.sum)
    keys = jax.random.split(jax.random.PRNGKey(2), 64)
    mask = jnp.ones(64, bool)
    temp = {}
    for impl in ("layerwise", "ghost"):
        step = jax.jit(
            lambda t, e, m, k, impl=impl: clipping.clipped_grad_sum(
                loss, t, None, e, m, k, clip_norm=1.0, microbatch_size=64, impl=impl
            ).grad_sum
        )
        analysis = step.lower(params, x, mask, keys).compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        temp[impl] = analysis.temp_size_in_bytes
    # The three 256 x 256 kernels are ghost-normed (T = 1); the 256 x 1 output is not.
    fraction = ghost.ghosted_fraction(loss, params, None, x, mask, keys)
    assert fraction == 3 * 256 * 256 / num_params
    assert ghost.ghosted_fraction(loss, params, None, x, mask, keys, mode="per_example") == 0
    per_example_bytes = 64 * num_params * 4
    assert temp["layerwise"] >= 0.9 * per_example_bytes
    assert temp["ghost"] < per_example_bytes / 8, temp


def _dot_precisions(fn, *args):
    """The precision of every dot_general ``fn`` traces, inside scans and loops too."""

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "dot_general":
                yield e.params["precision"]
            for v in e.params.values():
                for sub in v if isinstance(v, (tuple, list)) else (v,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from walk(inner)

    found = list(walk(jax.make_jaxpr(fn)(*args).jaxpr))
    assert found, "no contraction traced"
    return found


def test_norms_and_clipped_sums_contract_at_highest_precision():
    """A GPU's default (TF32) matmuls would make the summed contribution differ from the
    gradient whose norm was clipped by ~1e-3 relative: the sums and the ghost Grams must
    ask for float32 ('highest') contractions."""
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    g = {"w": jnp.ones((4, 3, 2))}
    weights, valid = jnp.ones(4), jnp.ones(4, bool)
    conv = nn.Conv(2, (3, 3))
    unfold = lambda a, g: unfolding.conv_unfold(conv, (a,), g)  # noqa: E731
    a, gg = jnp.ones((4, 5, 5, 3)), jnp.ones((4, 5, 5, 2))
    for name, fn, args in (
        ("weighted_sum", clipping.weighted_sum, (g, weights, valid)),
        ("reweighted kernel sum",
         lambda a, gg: ghost._reweighted_kernel_sum(unfold(a, gg), weights, valid), (a, gg)),
        ("ghost norm", lambda a, gg: ghost._ghost_sq_norm(unfold(a, gg)), (a, gg)),
    ):  # fmt: skip
        assert all(p == highest for p in _dot_precisions(fn, *args)), name


def test_dp_lora_adapters_take_the_fast_paths():
    """DP-LoRA (adapters on the attention projections and a trained label embedding, K=2):
    the adapters are applied as two bias-free Dense layers, so 'layerwise' and 'ghost'
    cover them and give the reference's norms and clipped sum."""
    spec = base.DataSpec((8, 8, 1), 3)
    cfg = dpdm.Config(unet="custom", nf=8, ch_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(4,), noise_multiplicity=2, dropout=0.0,
                      trainable=("label_embed",), lora_rank=2,
                      lora_targets=("attn",))  # fmt: skip
    method = dpdm.make(cfg, spec)
    params = method.init(jax.random.PRNGKey(0), spec)
    # B = 0 at initialization would leave A without gradient: perturb every adapter.
    rng = np.random.default_rng(4)
    trainable = jax.tree.map(
        lambda x: x + jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), params.trainable
    )
    assert trainable["lora"]
    images = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 1), minval=-1, maxval=1)
    ex = {"image": images, "label": jnp.arange(4) % 3}
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    mask = jnp.array([True, True, True, False])
    run = lambda impl, c: clipping.clipped_grad_sum(  # noqa: E731
        method.loss_per_example, trainable, params.frozen, ex, mask, keys,
        clip_norm=c, microbatch_size=4, impl=impl,
    )  # fmt: skip
    clip = float(np.nanmedian(np.asarray(jax.jit(lambda: run("vmap", 1e30))().norms)))
    ref = jax.jit(lambda: run("vmap", clip))()
    for impl in ("layerwise", "ghost"):
        got = jax.jit(lambda impl=impl: run(impl, clip))()
        np.testing.assert_allclose(got.norms, ref.norms, rtol=1e-4, equal_nan=True)
        assert int(got.num_clipped) == int(ref.num_clipped) > 0
        _assert_trees_close(ref.grad_sum, got.grad_sum, atol=1e-5 * clip)
    # 'auto' ghosts nothing in a model this small; forced, the ghost norms and the
    # reweighted products run on the adapters too.
    loss = method.loss_per_example
    forced = ghost.ghosted_fraction(loss, trainable, params.frozen, ex, mask, keys, mode="ghost")
    assert forced > 0.5, forced

    def ghosted(t, e, m, k):
        out_loss, aux, norms, summer = ghost.norms_and_sum(
            loss, t, params.frozen, e, m, k, mode="ghost")
        return clipping._finish(out_loss, aux, norms, m, clip, summer)

    got = jax.jit(ghosted)(trainable, ex, mask, keys)
    _check_bound_and_sum(loss, trainable, ex, mask, keys, ref, got, 3, frozen=params.frozen,
                         clip=clip)


def test_a_ghost_norm_whose_positions_cancel_still_bounds_the_gradient():
    """Positions whose contributions nearly cancel (an input constant over positions, an
    output cotangent summing to ~0 over them) make the Gram sum lose all its digits in
    float32: the raw estimate falls far below the true norm (even to 0), and the example
    would be added unclipped. With the rounding bound, the ghost norm is never below the
    exact (float64) norm of the gradient (review of the ghost path, 2026-12-06)."""
    rng = np.random.default_rng(1)
    b, t, c_in, c_out = 16, 64, 256, 256
    raw_ratios, ratios = [], []
    for scale in (3e2, 1e3, 3e3):
        s = rng.normal(size=(b, t, 1))
        s = (s - s.mean(axis=1, keepdims=True)) * scale
        a = (rng.normal(size=(b, 1, c_in)) + 1e-3 * rng.normal(size=(b, t, c_in)))
        g = s * rng.normal(size=(b, 1, c_out)) + rng.normal(size=(b, t, c_out))
        exact = np.sqrt(np.sum(np.square(np.einsum("btc,bto->bco", a, g)), axis=(1, 2)))
        a32, g32 = jnp.asarray(a, jnp.float32), jnp.asarray(g, jnp.float32)
        sq_norm = jax.jit(lambda a, g: ghost._ghost_sq_norm(unfolding.dense_unfold(None, (a,), g)))
        bound = np.sqrt(np.asarray(sq_norm(a32, g32), np.float64))
        uu = np.einsum("btc,bsc->bts", np.asarray(a32), np.asarray(a32))
        gg = np.einsum("bto,bso->bts", np.asarray(g32), np.asarray(g32))
        raw = np.sqrt(np.maximum(np.sum(uu * gg, axis=(1, 2)), 0.0))  # float32, no bound
        raw_ratios.append(exact / np.maximum(raw, 1e-30))
        ratios.append(bound / exact)
    assert np.max(raw_ratios) > 1.1  # The case is real: the raw Gram sum underestimates.
    assert np.min(ratios) >= 1.0
