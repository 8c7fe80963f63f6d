"""DP-LFlow: the flow is exact and invertible; the joint step clips once over both parts."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.eval import marginal_likelihood
from dpjax.methods import base, dplflow
from dpjax.models import realnvp
from dpjax.privacy import clipping
from tests.test_layerwise import _assert_trees_close
from tests.tree_utils import jittered


def _flow(num_classes=0, dim=6):
    flow = realnvp.RealNVP(dim, num_layers=4, hidden=16, num_classes=num_classes, seed=3)
    z = jnp.zeros((1, dim))
    y = jnp.zeros((1,), jnp.int32) if num_classes else None
    params = flow.init(jax.random.PRNGKey(0), z, y)["params"]
    # Zero-initialized output layers make the flow the identity: randomize them.
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [0.3 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)]
    return flow, jax.tree_util.tree_unflatten(tree, leaves)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_flow_is_invertible_and_its_logdet_is_the_jacobian(num_classes):
    flow, params = _flow(num_classes)
    x = jax.random.normal(jax.random.PRNGKey(2), (5, 6))
    y = jnp.arange(5) % 3 if num_classes else None
    z, logdet = flow.apply({"params": params}, x, y, method="forward")
    back, inv_logdet = flow.apply({"params": params}, z, y, method="inverse")
    np.testing.assert_allclose(back, x, atol=1e-5)
    np.testing.assert_allclose(inv_logdet, -logdet, atol=1e-5)
    assert float(jnp.max(jnp.abs(z - x))) > 0.1  # the flow is not the identity
    for i in range(5):
        yi = None if y is None else y[i : i + 1]
        f = lambda v, yi=yi: flow.apply({"params": params}, v[None], yi, method="forward")[0][0]
        jac = jax.jacfwd(f)(x[i])
        _, brute = jnp.linalg.slogdet(jac)
        np.testing.assert_allclose(logdet[i], brute, atol=1e-4)


def test_log_prob_integrates_to_one_in_one_dimension_pairs():
    """A 2-d flow's density integrates to ~1 on a grid (exact likelihood, not a bound)."""
    flow, params = _flow(dim=2)
    g = jnp.linspace(-8, 8, 401)
    xx, yy = jnp.meshgrid(g, g)
    pts = jnp.stack([xx.ravel(), yy.ravel()], -1)
    dens = jnp.exp(flow.apply({"params": params}, pts, method="log_prob"))
    total = float(jnp.sum(dens) * (g[1] - g[0]) ** 2)
    assert abs(total - 1.0) < 0.01


def _method(conditional=True):
    spec = base.DataSpec((28, 28, 1), 3)
    cfg = dplflow.Config(latent_dim=4, width=8, flow_layers=2, flow_hidden=8,
                         conditional=conditional)  # fmt: skip
    method = dplflow.make(cfg, spec)
    return method, method.init(jax.random.PRNGKey(0), spec), spec


def test_joint_step_clips_autoencoder_and_flow_together():
    """One norm over both parts: each example's clipped gradient has norm <= C in total,
    and both parts receive gradient (the flow's NLL reaches the encoder too)."""
    method, params, _ = _method()
    n = 4
    ex = {
        "image": jax.random.uniform(jax.random.PRNGKey(1), (n, 28, 28, 1), minval=-1, maxval=1),
        "label": jnp.arange(n) % 3,
    }
    keys = jax.random.split(jax.random.PRNGKey(2), n)
    mask = jnp.ones((n,), bool)
    clip = 0.1
    grads = jax.jit(jax.vmap(jax.grad(lambda t, e, k: method.loss_per_example(t, {}, e, k)[0]),
                             in_axes=(None, 0, 0)))(params.trainable, ex, keys)  # fmt: skip
    sq = {part: sum(float(jnp.sum(g[0] ** 2)) for g in jax.tree_util.tree_leaves(grads[part]))
          for part in ("ae", "flow")}  # fmt: skip
    assert sq["ae"] > 0 and sq["flow"] > 0
    # Sensitivity: each example alone, clipped, has norm <= C over ALL parameters.
    one_example = jax.jit(
        lambda e, k: clipping.clipped_grad_sum(method.loss_per_example, params.trainable, {}, e,
                                               mask[:1], k, clip_norm=clip, microbatch_size=1)
    )  # fmt: skip
    for i in range(n):
        one = jax.tree_util.tree_map(lambda x, i=i: x[i : i + 1], ex)
        res = one_example(one, keys[i : i + 1])
        norm = math.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree_util.tree_leaves(res.grad_sum)))
        assert norm <= clip * (1 + 1e-5)
        assert norm == pytest.approx(clip, rel=1e-4)  # these gradients are far above C
    # And the layerwise and ghost paths cover the whole model (Conv, Dense, ConvTranspose).
    ref, fast, ghost = (
        jax.jit(lambda t, e, m, k, impl=impl: clipping.clipped_grad_sum(
            method.loss_per_example, t, {}, e, m, k, clip_norm=clip, microbatch_size=n,
            impl=impl))(params.trainable, ex, mask, keys)
        for impl in ("vmap", "layerwise", "ghost")
    )  # fmt: skip
    for got in (fast, ghost):  # The norms, and the clipped sums built from them.
        np.testing.assert_allclose(got.norms, ref.norms, rtol=1e-4)
        assert int(got.num_clipped) == int(ref.num_clipped) == n
        _assert_trees_close(ref.grad_sum, got.grad_sum, atol=1e-5 * clip)


def test_per_class_models_touch_only_their_class_and_report_parallel_composition():
    """per_class: example i's gradient is zero outside its class's models (so the K
    per-class runs are parallel), its clipped norm is C, and samples / bits per dim use
    the model of their label."""
    spec = base.DataSpec((28, 28, 1), 3)
    cfg = dplflow.Config(latent_dim=4, width=8, flow_layers=2, flow_hidden=8, per_class=True)
    method = dplflow.make(cfg, spec)
    params = method.init(jax.random.PRNGKey(0), spec)
    leaves = jax.tree_util.tree_leaves(params.trainable)
    assert all(x.shape[0] == 3 for x in leaves)
    # The classes' models are independent draws, not copies.
    assert any(not np.allclose(x[0], x[1]) for x in leaves)
    ex = {
        "image": jax.random.uniform(jax.random.PRNGKey(1), (1, 28, 28, 1), minval=-1, maxval=1),
        "label": jnp.array([1]),
    }
    keys = jax.random.split(jax.random.PRNGKey(2), 1)
    res = jax.jit(
        lambda tr: clipping.clipped_grad_sum(method.loss_per_example, tr, {}, ex,
                                             jnp.ones((1,), bool), keys, clip_norm=0.1,
                                             microbatch_size=1)
    )(params.trainable)  # fmt: skip
    for g in jax.tree_util.tree_leaves(res.grad_sum):
        assert float(jnp.abs(g[0]).max()) == 0.0 and float(jnp.abs(g[2]).max()) == 0.0
    total = math.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree_util.tree_leaves(res.grad_sum)))
    assert total == pytest.approx(0.1, rel=1e-4)
    # Samples of class 2 come from class 2's models: equal to a one-model run with them.
    key = jax.random.PRNGKey(3)
    got = jax.jit(lambda p: method.sample(p, key, 2, labels=jnp.array([2, 2])))(params)
    single = dplflow.make(dataclasses.replace(cfg, per_class=False, conditional=False), spec)
    tr2 = jax.tree_util.tree_map(lambda p: p[2], params.trainable)
    want = jax.jit(lambda p: single.sample(p, key, 2))(base.Params(tr2))
    np.testing.assert_allclose(got, want, atol=1e-5)
    x = ex["image"]
    # Codelength and likelihood of class 2 use class 2's models (jittered so that the
    # classes' models differ clearly: fresh flows are all the identity).
    pj = base.Params(jittered(params.trainable, seed=9, scale=0.2))
    pj2 = base.Params(jax.tree_util.tree_map(lambda p: p[2], pj.trainable))
    code = jax.jit(lambda p, y: method.codelength_bits_per_dim(p, x, y))
    want = jax.jit(lambda p: single.codelength_bits_per_dim(p, x))(pj2)
    np.testing.assert_allclose(code(pj, jnp.array([2])), want, rtol=1e-5)
    assert abs(float(code(pj, jnp.array([0]))[0] - want[0])) > 1e-2  # another class's
    # A converged mode search (a short one amplifies rounding differences).
    cheap = marginal_likelihood.Settings(num_samples=8)
    bpd = jax.jit(lambda p, y: method.bits_per_dim(p, x, y, settings=cheap))
    want = jax.jit(lambda p: single.bits_per_dim(p, x, settings=cheap))(pj2)
    np.testing.assert_allclose(bpd(pj, jnp.array([2])), want, rtol=1e-5)
    assert abs(float(bpd(pj, jnp.array([0]))[0] - want[0])) > 1e-4 * float(want[0])
    assert "parallel composition" in method.privacy_notes()[0]
    assert dplflow.make(dataclasses.replace(cfg, per_class=False), spec).privacy_notes() == []


def test_per_class_routed_clipping_equals_clipping_the_whole_stack():
    """The DP step's routed path (each example differentiated w.r.t. its class's models
    only) gives the reference path's clipped sum, norms and counts over the whole stack,
    with padding rows and several micro-batches; an out-of-range label is dropped."""
    spec = base.DataSpec((28, 28, 1), 3)
    cfg = dplflow.Config(latent_dim=4, width=8, flow_layers=2, flow_hidden=8, per_class=True)
    method = dplflow.make(cfg, spec)
    params = method.init(jax.random.PRNGKey(0), spec)
    n = 8
    ex = {
        "image": jax.random.uniform(jax.random.PRNGKey(1), (n, 28, 28, 1), minval=-1, maxval=1),
        "label": jnp.array([2, 0, 2, 1, 1, 2, 0, 0]),
    }
    keys = jax.random.split(jax.random.PRNGKey(2), n)
    mask = jnp.arange(n) < 7  # the last row is padding
    routing = method.routing()
    assert routing is not None and routing.num_routes == 3

    def run(tr, e, m, k, routed, clip):
        return clipping.clipped_grad_sum(
            method.loss_per_example, tr, {}, e, m, k, clip_norm=clip, microbatch_size=4,
            routing=routing if routed else None)  # fmt: skip

    for clip in (0.1, 1e9):  # every example clipped; none clipped
        ref, fast = (
            jax.jit(lambda t, e, m, k, r=r, c=clip: run(t, e, m, k, r, c))(
                params.trainable, ex, mask, keys)
            for r in (False, True)
        )  # fmt: skip
        np.testing.assert_allclose(fast.norms, ref.norms, rtol=1e-5)
        assert int(fast.num_valid) == int(ref.num_valid) == 7
        assert int(fast.num_clipped) == int(ref.num_clipped)
        np.testing.assert_allclose(float(fast.loss_sum), float(ref.loss_sum), rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(fast.grad_sum),
                        jax.tree_util.tree_leaves(ref.grad_sum), strict=True):  # fmt: skip
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max()))
    # A label outside [0, K) must not write into any class's models.
    bad = dict(ex, label=ex["label"].at[0].set(5))
    res = jax.jit(lambda t: run(t, bad, mask, keys, True, 0.1))(params.trainable)
    assert int(res.num_valid) == 6 and int(res.num_nonfinite) == 1
    with pytest.raises(ValueError, match="impl='vmap'"):
        clipping.clipped_grad_sum(method.loss_per_example, params.trainable, {}, ex, mask, keys,
                                  clip_norm=0.1, microbatch_size=4, impl="layerwise",
                                  routing=routing)  # fmt: skip
    assert dplflow.make(dataclasses.replace(cfg, per_class=False), spec).routing() is None


def test_samples_and_bits_per_dim():
    """Sampling is z ~ N(0, I) -> inverse flow -> decoder; the training codelength is, per
    image, the decoder's Bernoulli cross-entropy plus the flow's exact NLL of the code
    (change of variables with the forward log-determinant), over D ln 2; both recomputed
    by hand. (The image likelihood is checked in test_marginal_likelihood.)"""
    method, params, spec = _method()
    # A trained-looking model: fresh output layers are zero (the flow would be the identity).
    trainable = jittered(params.trainable, seed=7, scale=0.2)
    params = base.Params(trainable)
    labels = jnp.array([0, 1, 2, 0, 1, 2])
    key = jax.random.PRNGKey(3)
    imgs = method.sample(params, key, 6, labels=labels)
    assert imgs.shape == (6, *spec.image_shape)
    z = jax.random.normal(jax.random.split(key)[1], (6, method.config.latent_dim))
    codes, _ = method.flow.apply({"params": trainable["flow"]}, z, labels, method="inverse")
    back, _ = method.flow.apply({"params": trainable["flow"]}, codes, labels, method="forward")
    np.testing.assert_allclose(back, z, atol=1e-4)  # the codes are the flow's preimages of z
    logits = method.ae.apply({"params": trainable["ae"]}, codes, method="decode")
    np.testing.assert_allclose(imgs, 2 * jax.nn.sigmoid(logits) - 1, atol=1e-5)
    x = jax.random.uniform(jax.random.PRNGKey(4), (3, 28, 28, 1), minval=-1, maxval=1)
    y = jnp.array([0, 1, 2])
    bpd = method.codelength_bits_per_dim(params, x, y)
    code, rec = method.ae.apply({"params": trainable["ae"]}, x)
    p = 1.0 / (1.0 + np.exp(-np.asarray(rec, np.float64)))
    t = (np.asarray(x, np.float64) + 1) / 2
    bce = -np.sum(t * np.log(p) + (1 - t) * np.log1p(-p), axis=(1, 2, 3))
    u, logdet = method.flow.apply({"params": trainable["flow"]}, code, y, method="forward")
    d = method.config.latent_dim
    nll = 0.5 * jnp.sum(u**2, -1) + 0.5 * d * math.log(2 * math.pi) - logdet
    np.testing.assert_allclose(bpd, (bce + nll) / (784 * math.log(2.0)), rtol=1e-4)
    with pytest.raises(ValueError, match="labelled"):
        dplflow.make(dplflow.Config(), base.DataSpec((28, 28, 1), 0))
    with pytest.raises(ValueError, match="pixel_model must be one of"):
        dplflow.make(dplflow.Config(pixel_model="gaussian"), spec)


def test_smoke_run_then_eval_reports_bits_per_dim(tmp_path):
    from dpjax import train
    from dpjax.eval import report
    from experiments import dplflow_fmnist

    wd = str(tmp_path)
    train.train(dplflow_fmnist.get_config("smoke"), wd, log=lambda *_: None)
    cfg = report.EvalConfig(num_samples=8, sample_batch=8, fid=False, downstream=False,
                            memorization=False, likelihood_samples=8,
                            likelihood_mode_steps=5, bits_per_dim_images=10)  # fmt: skip
    result = report.evaluate_workdir(wd, cfg, log=lambda *_: None)
    bpd = result["bits_per_dim"]
    assert np.isfinite(bpd["test"]) and bpd["test"] > 0
    # A normalized likelihood of 8-bit images: at most 8 bits per dimension would be the
    # uniform model; the smoke model is far from trained, so only bound it loosely.
    assert bpd["importance_samples"] == cfg.likelihood_samples and bpd["images"] == 10
    assert bpd["mode_steps"] == 5
    assert 1 <= bpd["ess_mean"] <= cfg.likelihood_samples
    assert np.isfinite(bpd["codelength_test"]) and bpd["stderr"] >= 0
    assert "bits per dimension" in (tmp_path / "eval_report.md").read_text()
