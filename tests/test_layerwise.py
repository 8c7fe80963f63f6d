"""The fast clipping path ('layerwise') equals the reference (vmap of grad), or refuses."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.methods import base, dpdm
from dpjax.privacy import clipping, layerwise
from dpjax.privacy.compute_dtype import cast_params, in_compute_dtype


def _assert_trees_close(a, b, rtol=1e-4, atol=0.0):
    """Leaf by leaf: max |x - y| < rtol * max |x| + atol."""
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True
    ):
        x, y = np.asarray(x), np.asarray(y)
        err = float(np.max(np.abs(x - y)))
        bound = rtol * float(np.max(np.abs(x))) + atol
        assert err <= bound, f"{jax.tree_util.keystr(path)}: error {err} > {bound}"


class _Zoo(nn.Module):
    """Every layer kind the layerwise rules cover, with awkward strides and paddings."""

    @nn.compact
    def __call__(self, x, label):
        h = nn.Conv(4, (3, 3), strides=2, padding="VALID")(x)
        h = nn.Conv(5, (2, 3), padding=((1, 0), (2, 1)), kernel_dilation=(1, 2))(h)
        h = nn.LayerNorm()(h)
        h = nn.GroupNorm(num_groups=1)(nn.Conv(6, (1, 1), use_bias=False)(h))
        h = nn.ConvTranspose(3, (2, 2), strides=(2, 2))(h)
        h = nn.ConvTranspose(4, (3, 3), strides=(2, 2))(h)  # SAME with k - 1 >= s
        h = nn.ConvTranspose(3, (3, 3), strides=(2, 1), padding="VALID", kernel_dilation=(1, 2))(h)
        h = h + nn.Embed(3, 3)(label)[:, None, None, :]
        h = nn.Dense(7)(h)  # dense over the channel axis of a 4-d input
        return nn.Dense(1)(h.reshape(h.shape[0], -1))


def _zoo_loss(model):
    def loss(trainable, frozen, example, key):
        del frozen
        noise = jax.random.normal(key, (2, *example["image"].shape))
        x = example["image"][None] + 0.1 * noise  # two noisy copies, averaged (K=2)
        out = model.apply({"params": trainable}, x, jnp.stack([example["label"]] * 2))
        value = jnp.mean(jnp.tanh(out) ** 2)
        return value, {"loss": value}

    return loss


def _zoo_batch(n=5):
    images = jax.random.normal(jax.random.PRNGKey(1), (n, 9, 9, 2))
    return {"image": images, "label": jnp.arange(n) % 3}


def test_per_example_grads_match_vmap_on_every_layer_kind():
    model = _Zoo()
    ex = _zoo_batch()
    params = model.init(jax.random.PRNGKey(0), ex["image"][:1], ex["label"][:1])["params"]
    loss = _zoo_loss(model)
    keys = jax.random.split(jax.random.PRNGKey(2), 5)
    mask = jnp.array([True, True, True, True, False])
    ref = jax.vmap(jax.grad(lambda t, e, k: loss(t, None, e, k)[0]), in_axes=(None, 0, 0))(
        params, ex, keys
    )
    values, _, fast = jax.jit(
        lambda t, e, m, k: layerwise.per_example_grads(loss, t, None, e, m, k)
    )(params, ex, mask, keys)
    real = jax.tree_util.tree_map(lambda g: g[:4], ref)
    _assert_trees_close(real, jax.tree_util.tree_map(lambda g: g[:4], fast))
    # The padding row gets exactly zero gradient; the losses are the reference losses.
    for g in jax.tree_util.tree_leaves(fast):
        assert not np.any(np.asarray(g[4]))
    want = jax.vmap(lambda e, k: loss(params, None, e, k)[0])(ex, keys)
    np.testing.assert_allclose(values, want, rtol=1e-6)


def test_bf16_layers_multiply_their_bf16_operands_exactly_in_float32():
    """Under bfloat16 compute every Dense, Conv and ConvTranspose is unfolded from its
    bfloat16 input and cotangent, and the per-example products accumulate in float32:
    the same gradients as widening both operands to float32 first (bfloat16 products
    are exact in float32), up to the order of the float32 sums."""
    model = _Zoo()
    ex = _zoo_batch()
    params = model.init(jax.random.PRNGKey(0), ex["image"][:1], ex["label"][:1])["params"]
    loss = in_compute_dtype(_zoo_loss(model), "bfloat16")
    keys = jax.random.split(jax.random.PRNGKey(2), 5)
    mask = jnp.array([True, True, True, True, False])

    def both(t, e, m, k):
        rec = layerwise.record(loss, t, None, e, m, k)
        out = []
        for j in range(len(rec.calls)):
            unfolded = layerwise.unfold(rec, j)
            if unfolded is None:  # norms and embeddings: the generic rule
                continue
            assert unfolded.source.dtype == unfolded.gg.dtype == jnp.bfloat16
            out.append(
                (
                    layerwise.call_grads(rec, j, unfolded),
                    layerwise.call_grads(rec, j, unfolded.as_float32()),
                )
            )
        return out

    pairs = jax.jit(both)(cast_params(params, "bfloat16"), ex, mask, keys)
    assert len(pairs) == 8  # 3 Conv, 3 ConvTranspose, 2 Dense
    for got, widened in pairs:
        for name in got:
            assert got[name].dtype == jnp.float32
            _assert_trees_close(widened[name], got[name], rtol=1e-5)


def test_dpdm_step_sums_equal_between_paths():
    """Tiny DPDM UNet (attention, label embedding, K=3): the layerwise and ghost paths give
    the reference's norms and clipped sum.

    The batch has a NaN image (dropped by every path) and a padding row, and runs in
    micro-batches of 3 (two, unrolled on CPU), so the micro-batch sum, the finite check
    and the mask are covered.
    """
    spec = base.DataSpec((8, 8, 1), 3)
    cfg = dpdm.Config(
        unet="custom",
        nf=8,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        noise_multiplicity=3,
        dropout=0.0,
    )
    method = dpdm.make(cfg, spec)
    params = method.init(jax.random.PRNGKey(0), spec)
    images = jax.random.uniform(jax.random.PRNGKey(1), (6, 8, 8, 1), minval=-1, maxval=1)
    images = images.at[2].set(jnp.nan)
    ex = {"image": images, "label": jnp.arange(6) % 3}
    keys = jax.random.split(jax.random.PRNGKey(2), 6)
    mask = jnp.array([True, True, True, True, True, False])
    out = {}
    for impl in ("vmap", "layerwise", "ghost"):
        out[impl] = jax.jit(
            lambda t, f, e, m, k, impl=impl: clipping.clipped_grad_sum(
                method.loss_per_example,
                t,
                f,
                e,
                m,
                k,
                clip_norm=0.05,
                microbatch_size=3,
                num_real=5,
                impl=impl,
            )
        )(params.trainable, params.frozen, ex, mask, keys)
    ref = out["vmap"]
    for fast in (out["layerwise"], out["ghost"]):
        np.testing.assert_allclose(fast.norms, ref.norms, rtol=1e-4, equal_nan=True)
        assert int(fast.num_nonfinite) == int(ref.num_nonfinite) == 1
        assert int(fast.num_valid) == int(ref.num_valid) == 4
        assert int(fast.num_clipped) == int(ref.num_clipped) > 0
        # Sums of clipped gradients cancel: bound the error by the contributions' scale
        # too (each has norm C = 0.05; float32 rounding is ~1e-7 of it).
        _assert_trees_close(ref.grad_sum, fast.grad_sum, atol=1e-5 * 0.05)
        # Sensitivity: each contribution is clipped, so the sum's norm is at most 4 C.
        leaves = jax.tree_util.tree_leaves(fast.grad_sum)
        total = np.sqrt(sum(np.sum(np.square(g)) for g in leaves))
        assert total <= 4 * 0.05 * (1 + 1e-5)


class _RawParam(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return nn.Dense(1)(x * scale)


def _single_batch():
    ex = {"image": jnp.ones((2, 3)), "label": jnp.zeros((2,), jnp.int32)}
    return ex, jnp.array([True, True]), jax.random.split(jax.random.PRNGKey(0), 2)


def test_refuses_a_parameter_outside_supported_layers():
    model = _RawParam()
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]

    def loss(t, f, e, k):
        v = jnp.sum(model.apply({"params": t}, e["image"][None]))
        return v, {}

    ex, mask, keys = _single_batch()
    with pytest.raises(ValueError, match=r"(?s)_RawParam.*clipping_impl='vmap'"):
        layerwise.per_example_grads(loss, params, None, ex, mask, keys)


def test_refuses_a_parameter_also_used_outside_its_layer():
    model = nn.Dense(1)
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]

    def loss(t, f, e, k):
        # A weight penalty inside the per-example loss: the Dense rule alone would miss it.
        v = jnp.sum(model.apply({"params": t}, e["image"][None])) + jnp.sum(t["kernel"] ** 2)
        return v, {}

    ex, mask, keys = _single_batch()
    with pytest.raises(ValueError, match=r"outside their layers.*kernel"):
        layerwise.per_example_grads(loss, params, None, ex, mask, keys)


def test_a_use_through_stop_gradient_is_no_use_eagerly_and_jitted():
    """DP-SAD's pattern: a layer applied again with stopped parameters (no gradient).
    Both paths must equal vmap, also when called eagerly, where stop_gradient of a
    concrete leaf is that very leaf (record() jits its pass for that reason)."""
    model = nn.Dense(2)
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]

    def loss(t, f, e, k):
        x = e["image"][None]
        y = model.apply({"params": t}, x)
        z = model.apply({"params": jax.lax.stop_gradient(t)}, jnp.tanh(y[:, :1] + x))
        return jnp.sum(y**2) + jnp.sum(jnp.sin(z)), {}

    ex = {"image": jax.random.normal(jax.random.PRNGKey(4), (4, 3))}
    mask, keys = jnp.arange(4) < 3, jax.random.split(jax.random.PRNGKey(5), 4)

    def clipped(impl):
        return clipping.clipped_grad_sum(
            loss, params, None, ex, mask, keys, clip_norm=0.5, microbatch_size=4, impl=impl
        )

    ref = clipped("vmap")
    for impl in ("layerwise", "ghost"):
        for got in (clipped(impl), jax.jit(clipped, static_argnums=0)(impl)):
            np.testing.assert_allclose(got.norms[:3], ref.norms[:3], rtol=1e-5)
            _assert_trees_close(ref.grad_sum, got.grad_sum, rtol=1e-5)


def test_refuses_transformed_parameters():
    """A LoRA-style merge hands the layer a new array: no rule may claim the leaves."""
    model = nn.Dense(2)
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]

    def loss(t, f, e, k):
        merged = {"kernel": t["kernel"] * 1.0, "bias": t["bias"]}
        return jnp.sum(model.apply({"params": merged}, e["image"][None])), {}

    ex, mask, keys = _single_batch()
    with pytest.raises(ValueError, match=r"not.*\['kernel'\]"):
        layerwise.per_example_grads(loss, params, None, ex, mask, keys)
