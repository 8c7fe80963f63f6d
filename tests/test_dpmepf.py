"""DP-MEPF: the release's sensitivity and accounting, and nothing private after it."""

import json
import math
import os

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, stats

from dpjax import run_setup, sample, train
from dpjax.methods import base, dpmepf
from dpjax.privacy import accounting
from dpjax.privacy import plan as plan_lib
from dpjax.privacy import report as report_lib
from dpjax.typed_config import ConfigError
from experiments import dpmepf_fmnist, features_mnist
from tests.config_overrides import scale_plan_sigma, with_overrides

SPEC = base.DataSpec((28, 28, 1), 10)


def _method(**kw):
    cfg = dpmepf.Config(feature_widths=(4, 8), ngf=8, z_dim=8, gen_batch=20, release_batch=8, **kw)
    return dpmepf.make(cfg, SPEC)


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,)).astype(np.int32)
    return jnp.asarray(images), jnp.asarray(labels)


@pytest.mark.parametrize("second_moment", [False, True])
def test_release_sensitivity_is_the_stated_one(second_moment):
    """Add/remove one example: the exact sum moves by exactly C (= 1 in release units);
    replace one: by at most 2C. Every example's part has norm exactly C."""
    method = _method(second_moment=second_moment)
    params = method.init(jax.random.key(0), SPEC)
    images, labels = _data(13)
    sums = jax.jit(method.exact_sums)
    full = sums(params.frozen["features"], images, labels)
    u = method.contributions(params.frozen["features"], images / 127.5 - 1.0, labels)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(u).reshape(13, -1), axis=1), 1.0, 1e-5)
    for i in (0, 6, 12):  # Also the last, partly padded chunk of release_batch=8.
        keep = np.arange(13) != i
        removed = sums(params.frozen["features"], images[keep], labels[keep])
        np.testing.assert_allclose(np.linalg.norm(full - removed), 1.0, rtol=1e-4)
    other, other_label = _data(1, seed=5)
    for new_label in (labels[3], (labels[3] + 1) % 10):
        img = images.at[3].set(other[0])
        lab = labels.at[3].set(new_label)
        replaced = sums(params.frozen["features"], img, lab)
        assert float(jnp.linalg.norm(full - replaced)) <= 2.0 + 1e-5
    # The count coordinate counts: sum over classes of the last column / w = N.
    assert float(jnp.sum(full[:, -1]) / method.config.count_weight) == pytest.approx(13, rel=1e-5)


def test_an_example_with_non_finite_features_adds_nothing(monkeypatch):
    """A feature network that overflows on one image made its row NaN (Inf / Inf), and the
    one-hot product spread it to every class (0 x NaN): one example decided whether the
    whole release was finite (non-finite review, 2026-12-07). It now adds 0, as a row
    that DP-SGD leaves out; in the first chunk it also fed the padding rows."""
    method = _method()
    feats = method.init(jax.random.key(0), SPEC).frozen["features"]
    images, labels = _data(13)
    images = images.at[0].set(255)  # The one bright image, index 0 (padding reads it).
    rows = method.rows

    def overflowing(features, x):
        r = rows(features, x)
        return jnp.where((x.mean(axis=(1, 2, 3)) > 0.99)[:, None], jnp.inf, r)

    monkeypatch.setattr(method, "rows", overflowing)
    sums = jax.jit(method.exact_sums)
    with_it = np.asarray(sums(feats, images, labels))
    without = np.asarray(sums(feats, images[1:], labels[1:]))
    assert np.isfinite(with_it).all()
    np.testing.assert_allclose(with_it, without, rtol=1e-6, atol=1e-6)


def test_each_example_lands_in_its_own_class_and_targets_are_the_class_means():
    """exact_sums (chunked, padded) equals the sum of the per-example u_i, and without
    noise the targets are each class's mean embedding and its size: a sum in the wrong
    class, or a mean over the wrong count, fails here."""
    method = _method(second_moment=True)
    feats = method.init(jax.random.key(0), SPEC).frozen["features"]
    images, labels = _data(21)  # release_batch 8: the last chunk is padded.
    sums = np.asarray(jax.jit(method.exact_sums)(feats, images, labels))
    x = images / 127.5 - 1.0
    u = np.asarray(method.contributions(feats, x, labels))
    np.testing.assert_allclose(sums, u.sum(0), rtol=1e-5, atol=1e-6)
    mean, count = method.targets(jnp.asarray(sums))
    e = np.asarray(method.embedding(feats, x))
    lab = np.asarray(labels)
    for k in range(10):
        np.testing.assert_allclose(count[k], np.sum(lab == k), rtol=1e-5)
        if np.any(lab == k):
            np.testing.assert_allclose(mean[k], e[lab == k].mean(0), rtol=1e-4, atol=1e-6)
        else:
            np.testing.assert_allclose(mean[k], 0.0, atol=1e-7)


def test_chosen_feature_layers_are_the_ones_concatenated():
    """feature_layers picks convolutions by index, in the given order; a bad index is a
    config error. The embedding still has norm sqrt(1 - w^2) (the unit bound holds)."""
    method = _method(feature_layers=(3, 0))
    assert method.embed_dim == 14 * 14 * 8 + 28 * 28 * 4  # conv_1_1, then conv_0_0
    feats = method.init(jax.random.key(0), SPEC).frozen["features"]
    x = _data(4)[0] / 127.5 - 1.0
    _, maps = method.features_net.apply({"params": feats}, x)
    phi = np.concatenate([np.asarray(maps[i]).reshape(4, -1) for i in (3, 0)], axis=1)
    want = method.alpha * phi / np.linalg.norm(phi, axis=1, keepdims=True)
    np.testing.assert_allclose(method.embedding(feats, x), want, rtol=1e-4, atol=1e-7)
    w = method.config.count_weight
    np.testing.assert_allclose(np.linalg.norm(want, axis=1), math.sqrt(1 - w * w), rtol=1e-5)
    for bad in ((4,), (0, 0), (-1,)):
        with pytest.raises(ValueError, match="feature_layers"):
            _method(feature_layers=bad)


def _analytic_gaussian_epsilon(noise_over_sensitivity, delta):
    """Exact epsilon of the Gaussian mechanism (Balle & Wang 2018, Theorem 8)."""
    s = noise_over_sensitivity

    def gap(eps):
        return (
            stats.norm.cdf(0.5 / s - eps * s)
            - math.exp(eps) * stats.norm.cdf(-0.5 / s - eps * s)
            - delta
        )

    return optimize.brentq(gap, 1e-6, 200.0)


@pytest.mark.parametrize("relation,sensitivity", [("add_or_remove_one", 1.0), ("replace_one", 2.0)])
def test_one_release_epsilon_matches_the_closed_form(relation, sensitivity):
    """The accountant's epsilon for ONE release equals the analytic Gaussian mechanism
    with the stated sensitivity (PLD to 1%; RDP never below it)."""
    sigma, delta = 3.0, 1e-5
    exact = _analytic_gaussian_epsilon(sigma / sensitivity, delta)
    record = {"kind": "gaussian", "noise_multiplier": sigma}
    plan = plan_lib.make_plan(
        num_examples=100,
        batch_size=1,
        delta=delta,
        clip_norm=1.0,
        steps=5,
        noise_multiplier=sigma,
        neighbouring=relation,
        release_events=_method().release_events,
    )
    eps = report_lib.epsilon_spent(plan, 5, [record])
    assert eps["pld"] == pytest.approx(exact, rel=1e-2)
    assert exact <= eps["rdp"] <= 1.3 * exact
    # Before the release happened nothing is spent: the steps are post-processing.
    assert report_lib.epsilon_spent(plan, 5, []) == {"rdp": 0.0, "pld": 0.0}


def test_calibration_counts_the_validation_release():
    """With a validation release, sigma is calibrated on BOTH Gaussians (DP-MEPF composes
    them); the main release alone would be cheaper than the target."""
    method = _method(val_noise_scale=10.0)
    plan = plan_lib.make_plan(
        num_examples=100,
        batch_size=1,
        delta=1e-5,
        clip_norm=1.0,
        steps=1,
        epsilon=1.0,
        accountant="pld",
        release_events=method.release_events,
    )
    assert plan.mechanism == "release" and plan.sampling_rate == 1.0
    events = method.release_events(plan.noise_multiplier)
    assert len(events) == 2 and events[1].noise_multiplier == pytest.approx(
        10 * plan.noise_multiplier
    )
    both = accounting.epsilon(events, 1e-5, "pld")
    alone = accounting.epsilon(events[:1], 1e-5, "pld")
    assert 0.99 <= both <= 1.0 and alone < both


def test_release_adds_noise_of_std_sigma_and_gradients_are_the_matching_ones():
    method = _method(val_noise_scale=4.0)
    params = method.init(jax.random.key(0), SPEC)
    images, labels = _data(10)
    plan = plan_lib.make_plan(
        num_examples=10,
        batch_size=1,
        delta=1e-5,
        clip_norm=3.0,
        steps=1,
        noise_multiplier=2.0,
        release_events=method.release_events,
    )
    release = method.private_release(params, images, labels, jax.random.key(1), plan)
    exact = jax.jit(method.exact_sums)(params.frozen["features"], images, labels)
    # In units of C: the noise std is sigma whatever C is.
    assert float(jnp.std(release.values["sum"] - exact)) == pytest.approx(2.0, rel=0.02)
    assert float(jnp.std(release.values["val_sum"] - exact)) == pytest.approx(8.0, rel=0.02)
    # The two releases' noises are independent, as their composition assumes: with one
    # draw shared, a linear combination of the two would cancel it and give the exact sums.
    corr = np.corrcoef(
        np.ravel(release.values["sum"] - exact), np.ravel(release.values["val_sum"] - exact)
    )[0, 1]
    assert abs(corr) < 0.05
    assert [r["noise_multiplier"] for r in release.records] == [2.0, 8.0]
    # The moving average's gradient at m = 0 is -(target - fake mean): the matching loss
    # of GFMN.
    frozen = {**params.frozen, "release": release.values}
    key = jax.random.key(2)
    grad_fn = jax.jit(jax.grad(lambda tr: method.public_loss(tr, frozen, key)[0]))
    grads = grad_fn(params.trainable)
    target, counts = method.targets(release.values["sum"])
    labels_b = jnp.arange(20) % 10
    fake = jax.jit(
        lambda f, g: method.embedding(f, method._generate(g, key, labels_b))
    )(frozen["features"], params.trainable["gen"])
    fake_mean = fake.reshape(2, 10, -1).mean(0)
    np.testing.assert_allclose(grads["m"], -(target - fake_mean), rtol=1e-4, atol=1e-6)
    # At m = 0 the generator gets no gradient (GFMN: m leads); with m != 0 it does.
    assert float(optax_norm(grads["gen"])) == 0.0
    moved = {**params.trainable, "m": jnp.ones_like(params.trainable["m"])}
    grads = grad_fn(moved)
    assert float(optax_norm(grads["gen"])) > 0
    assert counts.shape == (10,)


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(tree)))


def _smoke(**over):
    return with_overrides(dpmepf_fmnist.get_config("smoke"), {"dp.steps": 3, **over})


def test_private_data_is_not_read_after_the_release(tmp_path, monkeypatch, same_noise_secret):
    """A run whose data disappears after the release resumes and ends bit-identical."""
    ref = train.train(_smoke(), str(tmp_path / "ref"), log=lambda *_: None)
    wd = str(tmp_path / "run")
    first = train.train(_smoke(**{"train.max_steps_per_run": 1}), wd, log=lambda *_: None)
    assert int(first.step) == 1

    def no_data(*_a, **_k):
        raise AssertionError("the private data was read after the release")

    monkeypatch.setattr(run_setup.data_lib, "load", no_data)
    state = train.train(_smoke(), wd, log=lambda *_: None)
    assert int(state.step) == 3
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    report = report_lib.privacy_report(*_plan_and_steps(wd), "dpmepf", _releases(wd))
    assert len(report["releases"]) == 1 and report["releases"][0]["stage"] == "release"


def _plan_and_steps(wd):
    plan, extra = plan_lib.load_plan(os.path.join(wd, "dp_plan.json"))
    return plan, extra["steps_done"]


def _releases(wd):
    return plan_lib.load_plan(os.path.join(wd, "dp_plan.json"))[1]["releases"]


def test_dp_feature_network_is_composed_into_the_total(tmp_path):
    """Features from a classifier trained WITH DP on the same data: its DP-SGD steps and
    the release are composed, in calibration (the target is the total) and in reports."""
    fdir = str(tmp_path / "features")
    fcfg = with_overrides(
        features_mnist.get_config("smoke"),
        # Another seed than the generator run's: composition needs independent randomness.
        {"dp.enabled": True, "dp.noise_multiplier": 2.0, "seed": 1},
    )
    train.train(fcfg, fdir, log=lambda *_: None)
    # A run killed after its last checkpoint but before dp_plan.json was rewritten: the
    # composed steps are the loaded checkpoint's, not the plan file's stale count.
    plan_path = os.path.join(fdir, "dp_plan.json")
    with open(plan_path) as f:
        plan_file = json.load(f)
    checkpoint_steps = plan_file["steps_done"]
    assert checkpoint_steps > 0
    with open(plan_path, "w") as f:
        json.dump({**plan_file, "steps_done": 0}, f)
    wd = str(tmp_path / "mepf")
    cfg = _smoke(
        **{
            "method_args.features_from": fdir,
            "method_args.feature_widths": (32, 64, 128),  # Ignored: read from the run.
            "dp.noise_multiplier": None,
            "dp.epsilon": 8.0,
            "dp.accountant": "rdp",
            "dp.steps": 1,
        }
    )
    state = train.train(cfg, wd, log=lambda *_: None)
    _, params, _, _, _ = sample.load_trained(fdir)
    for a, b in zip(
        jax.tree_util.tree_leaves(params.trainable["net"]),
        jax.tree_util.tree_leaves(state.frozen["features"]),
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    plan, steps = _plan_and_steps(wd)
    releases = _releases(wd)
    assert [r["stage"] for r in releases] == ["prior", "release"]
    fplan = plan_lib.load_plan(os.path.join(fdir, "dp_plan.json"))[0]
    assert releases[0]["steps"] == checkpoint_steps == fplan.steps
    expected = accounting.epsilon(
        [
            accounting.dpsgd_event(2.0, fplan.sampling_rate, fplan.steps),
            dp_accounting.GaussianDpEvent(plan.noise_multiplier),
        ],
        1e-5,
        "rdp",
    )
    got = report_lib.epsilon_spent(plan, steps, releases, ("rdp",))["rdp"]
    assert got == pytest.approx(expected, rel=1e-9)
    assert 7.9 <= got <= 8.0  # Calibrated on the total, not on the release alone.

    # The export (features_from redacted) is rebuilt from its record of the feature
    # network's widths, which are the run's, not the ignored feature_widths setting.
    from unittest import mock

    from dpjax import export, released
    from dpjax.methods import dpmepf as dpmepf_lib

    out = str(tmp_path / "release")
    export.export_run(wd, out, num_samples=4, log=lambda *_: None)
    with mock.patch.object(dpmepf_lib, "_load_features", side_effect=AssertionError("read")):
        model = released.load_export(out)
        again = released.sample_from_export(out, str(tmp_path / "again"), log=lambda *_: None)
    assert model.method.widths == tuple(features_mnist.get_config("smoke").method_args.widths)
    assert model.method.widths != (32, 64, 128)
    for a, b in zip(jax.tree_util.tree_leaves(model.params.frozen),
                    jax.tree_util.tree_leaves(state.frozen)):  # The release, the features.
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with np.load(again) as a, np.load(os.path.join(out, "samples.npz")) as b:
        np.testing.assert_array_equal(a["images"], b["images"])

    # The composed plan is the one the feature network's checkpoint records: a
    # dp_plan.json edited afterwards (sigma x 100: a smaller epsilon to compose) is
    # refused (untrusted-input review, 2026-12-07).
    scale_plan_sigma(fdir, 100)
    with pytest.raises(accounting.PrivacyError, match="features_from=.*another DP plan"):
        train.setup(cfg, str(tmp_path / "edited"), log=lambda *_: None)


def test_canary_audit_refuses_a_release_method_clearly():
    from dpjax import main

    with pytest.raises(accounting.PrivacyError, match="one Gaussian release"):
        main.run_audit_mode("unused", config=dpmepf_fmnist.get_config("smoke"), log=lambda *_: None)


def _latest_checkpoint(workdir):
    """The step of ``workdir``'s latest checkpoint (None: nothing was saved)."""
    from dpjax import checkpoint as ckpt_lib

    checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), read_only=True)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


_WRONG_RECORDS = {
    "weaker_sigma": lambda recs: [{**r, "noise_multiplier": r["noise_multiplier"] / 2}
                                  for r in recs],
    # np.allclose broadcasts: none, or more records than planned, once passed the check.
    "no_record": lambda recs: [],
    "one_more": lambda recs: [*recs, recs[0]],
}


@pytest.mark.parametrize("wrong", sorted(_WRONG_RECORDS))
def test_a_release_that_is_not_the_planned_mechanism_is_refused(tmp_path, monkeypatch, wrong):
    """The loop checks the release's records against the calibrated plan: a method that
    noised with another sigma than planned, or made another number of releases, stops
    before anything is saved."""
    original = dpmepf.DPMEPF.private_release

    def weaker(self, params, images, labels, key, plan):
        release = original(self, params, images, labels, key, plan)
        return base.Release(release.values, tuple(_WRONG_RECORDS[wrong](list(release.records))))

    monkeypatch.setattr(dpmepf.DPMEPF, "private_release", weaker)
    with pytest.raises(accounting.PrivacyError, match="do not match the planned"):
        train.train(_smoke(), str(tmp_path), log=lambda *_: None)
    assert _latest_checkpoint(tmp_path) is None


@pytest.mark.skipif(jax.device_count() < 2, reason="needs several (host) devices")
def test_every_device_means_one_for_a_release_method(tmp_path):
    """A sweep gives multi-GPU points train.num_devices=0 (every device); DP-MEPF, which
    trains on its release, failed at every such point. It now takes one device, and
    says so; an explicit count of several is still refused."""
    logs = []
    state = train.train(_smoke(**{"train.num_devices": 0}), str(tmp_path / "a"), log=logs.append)
    assert int(state.step) == 3
    assert any("trains on its release on one device" in m for m in logs), logs
    with pytest.raises(ConfigError, match="set train.num_devices=1"):
        train.train(_smoke(**{"train.num_devices": 2}), str(tmp_path / "b"), log=lambda *_: None)


def test_an_export_does_not_state_n_which_the_release_protects(tmp_path):
    """The release noises its counts, so N is covered by the guarantee; the export's
    report and card stated it exactly (release-boundary review, 2026-12-07). The
    workdir's own report keeps it."""
    from dpjax import export

    wd = str(tmp_path / "run")
    train.train(_smoke(**{"data.fake_num_examples": 777}), wd, log=lambda *_: None)
    with open(os.path.join(wd, "privacy_report.json")) as f:
        assert json.load(f)["num_examples"] == 777
    out = str(tmp_path / "release")
    export.export_run(wd, out, num_samples=4, log=lambda *_: None)
    with open(os.path.join(out, "privacy_report.json")) as f:
        report = json.load(f)
    assert report["num_examples"] is None and report["expected_batch_size"] is None
    for name in ("privacy_report.json", "privacy_report.md", "model_card.md",
                 "model_config.json"):
        with open(os.path.join(out, name)) as f:
            assert "777" not in f.read(), name
    with open(os.path.join(out, "model_card.md")) as f:
        assert "N is not stated: the one release noises its counts" in f.read()
    with open(os.path.join(out, "privacy_report.md")) as f:  # One release: no batches.
        md = f.read()
    assert "- noise: from a 128-bit secret" in md and "batches" not in md


def test_the_card_does_not_claim_n_protected_beside_a_composed_dp_sgd_stage():
    """A DP feature network composed into the release lists its sampling rate (batch / N
    of its data) in the exported report; on the same data that gives N, and the card
    said "it protects N too" beside it (taint review, 2026-12-07)."""
    from dpjax import model_card

    plan = plan_lib.DPPlan(num_examples=1000, sampling_rate=1.0, noise_multiplier=5.0,
                           clip_norm=1.0, steps=3, delta=1e-5, mechanism="release")
    alone = model_card._dataset_size_line(plan, {"releases": [{"kind": "gaussian"}]})
    assert "it protects N too" in alone and "1000" not in alone
    composed = {"releases": [{"kind": "dpsgd", "sampling_rate": 0.05}, {"kind": "gaussian"}]}
    line = model_card._dataset_size_line(plan, composed)
    assert "not protected" in line and "protects N" not in line and "1000" not in line
    # Under replace-one, neighbouring datasets have one size: nothing covers N
    # (consistency review, 2026-12-07: card and report said the release protected it).
    import dataclasses

    replace = dataclasses.replace(plan, neighbouring="replace_one")
    line = model_card._dataset_size_line(replace, {"releases": [{"kind": "gaussian"}]})
    assert "does not cover it" in line and "protects" not in line
    # The privacy report says the same as the card, and names the composed stage.
    report = report_lib.privacy_report(
        plan, 0, "dpmepf", [{"kind": "dpsgd", "noise_multiplier": 1.0, "sampling_rate": 0.05,
                             "steps": 2, "stage": "prior"},
                            {"kind": "gaussian", "noise_multiplier": 5.0, "stage": "release"}])
    report["num_examples"] = None  # As the export writes it.
    md = report_lib.report_markdown(report)
    assert "not protected either" in md and "protects it" not in md
    assert "of the one release composed with 1 prior release(s)" in md
    report["releases"] = report["releases"][1:]
    md = report_lib.report_markdown(report)
    assert "protects it" in md and "composed with" not in md


def test_a_non_finite_release_is_not_saved(tmp_path, monkeypatch):
    """The release is the checkpoint every later step starts from: a NaN in it (a bug in a
    method's release) stops the run before it is saved; refusing post-processed noisy
    values costs no privacy."""
    original = dpmepf.DPMEPF.private_release

    def nan_release(self, params, images, labels, key, plan):
        release = original(self, params, images, labels, key, plan)
        values = jax.tree_util.tree_map(lambda v: v.at[0, 0].set(jnp.nan), release.values)
        return base.Release(values, release.records)

    monkeypatch.setattr(dpmepf.DPMEPF, "private_release", nan_release)
    with pytest.raises(accounting.PrivacyError, match="non-finite values; nothing was saved"):
        train.train(_smoke(), str(tmp_path), log=lambda *_: None)
    assert _latest_checkpoint(tmp_path) is None
