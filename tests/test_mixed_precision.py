"""bfloat16 compute (``dp.compute_dtype``): float32 gradients, clipping, sum and sensitivity."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax.methods import dpdm
from dpjax.methods.base import DataSpec
from dpjax.privacy import clipping
from dpjax.privacy.compute_dtype import in_compute_dtype
from dpjax.privacy.dp_step import example_keys, make_train_step
from dpjax.privacy.plan import DPPlan
from dpjax.randomness import Streams
from dpjax.state import TrainState

C = 0.05
SPEC = DataSpec((8, 8, 1), 3)
N = 8


@pytest.fixture(scope="module")
def setup():
    """A tiny DPDM UNet (convolutions, GroupNorm, no attention), K = 2 noise draws."""
    cfg = dpdm.Config(unet="custom", nf=8, ch_mult=(1,), num_res_blocks=1, noise_multiplicity=2)
    method = dpdm.make(cfg, SPEC)
    params = jax.jit(method.init, static_argnums=1)(jax.random.key(0), SPEC)
    rng = np.random.default_rng(0)
    examples = {
        "image": jnp.asarray(rng.uniform(-1, 1, (N, 8, 8, 1)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 3, N), jnp.int32),
    }
    keys = example_keys(jax.random.key(3), jnp.arange(N))
    return method, params, examples, keys


_JITTED = {}


def _sum(setup, mask, compute_dtype, impl="vmap"):
    """The clipped sum of the rows in ``mask``, jitted once per (dtype, impl)."""
    method, params, examples, keys = setup
    if (compute_dtype, impl) not in _JITTED:
        _JITTED[compute_dtype, impl] = jax.jit(
            functools.partial(
                clipping.clipped_grad_sum,
                method.loss_per_example,
                clip_norm=C,
                microbatch_size=4,
                impl=impl,
                compute_dtype=compute_dtype,
            )
        )
    fn = _JITTED[compute_dtype, impl]
    return fn(params.trainable, params.frozen, examples, mask, keys)


def _flat(tree):
    return jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(tree)])


def test_bf16_loss_gives_float32_gradients_close_to_float32(setup):
    method, params, examples, keys = setup
    one = jax.tree_util.tree_map(lambda x: x[0], examples)
    grads = {}
    for name in ("float32", "bfloat16"):
        loss_fn = in_compute_dtype(method.loss_per_example, name)
        (loss, aux), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
            params.trainable, params.frozen, one, keys[0]
        )
        assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in aux.values())
        assert {x.dtype for x in jax.tree_util.tree_leaves(g)} == {jnp.dtype(jnp.float32)}
        grads[name] = _flat(g)
    # bf16 has an 8-bit mantissa: the gradient direction agrees, not the last digits.
    cos = jnp.dot(grads["float32"], grads["bfloat16"]) / (
        jnp.linalg.norm(grads["float32"]) * jnp.linalg.norm(grads["bfloat16"])
    )
    assert float(cos) > 0.98, float(cos)
    assert not np.array_equal(grads["float32"], grads["bfloat16"])  # bf16 really ran.


def _matmul_operand_dtypes(fn, *args, result=False) -> collections.Counter:
    """(lhs dtype, rhs dtype) of every convolution and dot in ``fn``'s jaxpr, nested too;
    with ``result``, (lhs, rhs, result dtype)."""
    counts: collections.Counter = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
                kept = [*eqn.invars[:2], *eqn.outvars[: int(result)]]
                counts[tuple(str(v.aval.dtype) for v in kept)] += 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return counts


@pytest.mark.parametrize("name", ["float32", "bfloat16"])
def test_every_convolution_and_matmul_runs_in_the_compute_dtype(setup, name):
    """Forward AND backward: the noise the loss draws in float32 must not promote the
    UNet back to float32 (autocast of the layers' inputs)."""
    method, params, examples, keys = setup
    one = jax.tree_util.tree_map(lambda x: x[0], examples)
    loss_fn = in_compute_dtype(method.loss_per_example, name)
    grad = jax.grad(lambda t: loss_fn(t, params.frozen, one, keys[0])[0])
    counts = _matmul_operand_dtypes(grad, params.trainable)
    assert sum(counts.values()) > 20, counts  # Forward and backward of the UNet.
    assert set(counts) == {(name, name)}, counts


@pytest.mark.parametrize("impl", ["vmap", "layerwise", "ghost"])
def test_bf16_clipped_sum_keeps_the_sensitivity(setup, impl):
    full = _sum(setup, jnp.ones(N, bool), "bfloat16", impl)
    assert {x.dtype for x in jax.tree_util.tree_leaves(full.grad_sum)} == {jnp.dtype(jnp.float32)}
    assert int(full.num_clipped) == N, "the test needs every example above C"
    for i in range(N):
        alone = _flat(_sum(setup, jnp.arange(N) == i, "bfloat16", impl).grad_sum)
        assert float(jnp.linalg.norm(alone)) <= C * (1 + 1e-6)
        without = _flat(_sum(setup, jnp.arange(N) != i, "bfloat16", impl).grad_sum)
        assert float(jnp.linalg.norm(_flat(full.grad_sum) - without)) <= C * (1 + 1e-5)


@pytest.mark.parametrize("impl", ["layerwise", "ghost"])
def test_bf16_fast_paths_match_the_bf16_reference(setup, impl):
    """The layerwise and ghost paths under bfloat16: the model's forward and backward in
    bfloat16, the per-example products of the layers' bfloat16 inputs and cotangents
    accumulated in float32 (ghost norms and sums in float32). The reference forms its
    weight gradients in bfloat16, so the two agree to bfloat16's precision, not
    float32's (0.2% on this UNet, as far as the bfloat16 and float32 reference paths
    are apart: 0.5%)."""
    mask = jnp.arange(N) < N - 1  # One padding row.
    ref = _sum(setup, mask, "bfloat16")
    got = _sum(setup, mask, "bfloat16", impl)
    assert {x.dtype for x in jax.tree_util.tree_leaves(got.grad_sum)} == {jnp.dtype(jnp.float32)}
    assert int(got.num_clipped) == int(ref.num_clipped) == N - 1
    np.testing.assert_allclose(got.norms[: N - 1], ref.norms[: N - 1], rtol=1e-2)
    a, b = _flat(ref.grad_sum), _flat(got.grad_sum)
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 1e-2  # Measured 0.2%.
    # bfloat16 really ran: the float32 fast path differs from it by more than rounding.
    f32 = _flat(_sum(setup, mask, "float32", impl).grad_sum)
    assert float(jnp.linalg.norm(b - f32) / jnp.linalg.norm(f32)) > 1e-4
    method, params, examples, keys = setup
    counts = _matmul_operand_dtypes(
        lambda t: clipping.clipped_grad_sum(
            method.loss_per_example, t, params.frozen, examples, mask, keys, clip_norm=C,
            microbatch_size=4, impl=impl, compute_dtype="bfloat16").grad_sum,
        params.trainable,
        result=True,
    )  # fmt: skip
    bf16, f32 = "bfloat16", "float32"
    assert counts[bf16, bf16, bf16] > 10, counts  # The UNet's forward and input gradients.
    # The per-example products: bfloat16 operands, float32 results.
    assert counts[bf16, bf16, f32] > 0, counts
    if impl == "layerwise":
        # No product widens its operands to float32: the only float32 contractions are
        # the clip-weighted sums, one per leaf in each of the 2 micro-batches.
        assert set(counts) == {(bf16, bf16, bf16), (bf16, bf16, f32), (f32, f32, f32)}
        assert counts[f32, f32, f32] == 2 * len(jax.tree_util.tree_leaves(params.trainable))


def test_unknown_compute_dtypes_are_refused(setup):
    with pytest.raises(ValueError, match="Unknown compute dtype 'float16'"):
        _sum(setup, jnp.ones(N, bool), "float16")
    with pytest.raises(ValueError, match="Unknown compute dtype 'float16'"):
        _sum(setup, jnp.ones(N, bool), "float16", impl="layerwise")
    method, params, _, _ = setup
    plan = DPPlan(
        num_examples=N, sampling_rate=0.5, noise_multiplier=1.0, clip_norm=C, steps=2,
        delta=1e-5, target_epsilon=None,
    )  # fmt: skip
    kw = dict(microbatch_size=4, ema_rate=0.9)
    with pytest.raises(ValueError, match="Unknown compute dtype"):
        make_train_step(method, optax.sgd(1.0), plan, compute_dtype="fp8", **kw)


def test_bf16_train_step_keeps_float32_state(setup):
    method, params, examples, _ = setup
    plan = DPPlan(
        num_examples=N, sampling_rate=0.5, noise_multiplier=1.0, clip_norm=C, steps=2,
        delta=1e-5, target_epsilon=None,
    )  # fmt: skip
    opt = optax.adam(1e-3)
    state = TrainState.create(params.trainable, params.frozen, opt.init(params.trainable))
    step = make_train_step(
        method, opt, plan, microbatch_size=4, ema_rate=0.9, compute_dtype="bfloat16"
    )
    images = jnp.asarray(np.asarray((examples["image"] + 1) * 127.5, np.uint8))
    indices = jnp.arange(N, dtype=jnp.int32)
    new, metrics = step(
        state, images, examples["label"], indices, jnp.ones(N, bool), N, Streams.from_seed(0)
    )
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(new)):
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert np.isfinite(float(metrics["update_norm"])) and float(metrics["update_norm"]) > 0
