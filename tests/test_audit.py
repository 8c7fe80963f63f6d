"""The one-run canary audit: it passes the real DP step and catches broken ones."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest
from scipy import stats

from dpjax import main as cli_main
from dpjax.checkpoint import CheckpointError
from dpjax.data.fake import make_fake
from dpjax.methods import toy
from dpjax.methods.base import DataSpec
from dpjax.privacy import audit
from dpjax.privacy.accounting import PrivacyError
from dpjax.privacy.plan import make_plan
from tests.test_export import corrupt_latest_checkpoint, fake_run

SPEC = DataSpec((28, 28, 1), 10)  # 7,850 toy parameters: canaries are nearly orthogonal.
CANARIES = 500


@pytest.fixture(scope="module")
def plan():
    # q = 1/4 and T = 4: 68% of included canaries are sampled at least once; the RDP
    # epsilon (about 1.6) is well below what 500 canaries can detect (about 3.3).
    return make_plan(
        num_examples=64, batch_size=16, delta=1e-5, clip_norm=1.0, steps=4, noise_multiplier=2.0
    )


@pytest.fixture(scope="module")
def audits(plan):
    """The same audit of the toy method's real DP step: correct, without noise, unclipped."""
    method = toy.make(toy.Config(), SPEC)
    params = method.init(jax.random.key(0), SPEC)
    images, labels = make_fake(plan.num_examples, SPEC.image_shape, SPEC.num_classes, 0)
    cases = {"real": {}, "noise_off": {"noise_scale": 0.0}, "clip_broken": {"clip_scale": 100.0}}
    return {
        name: audit.run_audit(
            method,
            params.trainable,
            params.frozen,
            plan,
            images,
            labels,
            audit.AuditConfig(num_canaries=CANARIES, **faults),
            microbatch_size=32,
        )
        for name, faults in cases.items()
    }


def test_the_real_dp_step_passes(audits, plan):
    r = audits["real"]
    assert not r.flagged
    assert r.epsilon_lower_bound < r.accountant_epsilon
    assert math.isclose(r.accountant_epsilon, plan.epsilon(), rel_tol=1e-9)
    assert r.detectable_epsilon > r.accountant_epsilon  # So the audit could have failed.
    assert "audit ok" in r.verdict()
    d = r.details
    assert d["num_canaries"] == CANARIES and 200 < d["num_included"] < 300
    assert d["steps"] == plan.steps and d["faults"] == {}
    json.dumps(r.to_dict())  # audit.json is plain JSON.


@pytest.mark.parametrize("fault", ["noise_off", "clip_broken"])
def test_a_broken_dp_step_is_flagged(audits, fault):
    r = audits[fault]
    assert r.flagged, r.verdict()
    assert r.epsilon_lower_bound > r.accountant_epsilon
    assert "FLAGGED" in r.verdict() and "fault injected" in r.verdict()
    # Without noise every included canary that was ever sampled stands out.
    best = max(r.guesses, key=lambda g: g["epsilon_lower_bound"])
    assert best["correct"] == best["k"]


def test_p_value_is_the_binomial_tail_plus_the_delta_term():
    m, r, v = 1000, 100, 80
    for eps in (0.0, 0.5, 2.0):
        p = 1 / (1 + math.exp(-eps))
        tail = stats.binom.sf(v - 1, r, p)
        assert math.isclose(audit.one_run_p_value(m, r, v, eps, 0.0), tail, rel_tol=1e-12)
        assert audit.one_run_p_value(m, r, v, eps, 1e-5) >= tail
    ps = [audit.one_run_p_value(m, r, v, e, 1e-5) for e in np.linspace(0, 5, 26)]
    assert all(a <= b + 1e-15 for a, b in zip(ps, ps[1:]))
    # Chance-level guessing proves nothing; all-correct guessing is capped by r.
    assert audit.one_run_epsilon_lower_bound(m, r, r // 2, 1e-5, 0.05) == 0.0
    top = audit.one_run_epsilon_lower_bound(m, r, r, 1e-5, 0.05)
    assert 3.0 < top < math.log(r)
    assert audit.one_run_epsilon_lower_bound(m, r, r, 1e-5, 0.05 / 5) < top


def test_the_bound_is_valid_for_randomized_response():
    # Guesses that are right w.p. e^eps / (1 + e^eps), independently: the extremal
    # eps-DP mechanism. The 95% bound may exceed eps in at most ~5% of runs.
    eps, r, trials = 1.0, 200, 300
    rng = np.random.default_rng(0)
    correct = rng.binomial(r, 1 / (1 + math.exp(-eps)), size=trials)
    bounds = [audit.one_run_epsilon_lower_bound(r, r, int(v), 0.0, 0.05) for v in correct]
    assert np.mean(np.asarray(bounds) > eps) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    assert np.median(bounds) > 0.5 * eps  # And it is not vacuous.


def test_guess_grid_depends_only_on_public_quantities():
    ks = audit.guess_grid(1000, 0.125, 2, audit.GUESS_FRACTIONS)
    expected = 500 * (1 - 0.875**2)
    assert ks == sorted(set(ks)) and ks[-1] == int(0.75 * expected)
    assert audit.guess_grid(10, 1.0, 1, (0.01,)) == [1]


def test_bad_settings_and_plans_are_refused(plan):
    with pytest.raises(PrivacyError, match="canaries"):
        audit.AuditConfig(num_canaries=1)
    with pytest.raises(PrivacyError, match="confidence"):
        audit.AuditConfig(confidence=1.0)
    method = toy.make(toy.Config(), SPEC)
    params = method.init(jax.random.key(0), SPEC)
    images, labels = make_fake(64, SPEC.image_shape, SPEC.num_classes, 0)
    public = make_plan(
        num_examples=64, batch_size=16, delta=1e-5, clip_norm=1.0, steps=4, enabled=False
    )
    for p, cfg, match in [
        (public, audit.AuditConfig(), "not private"),
        (plan, audit.AuditConfig(steps=plan.steps + 1), "audit steps"),
    ]:
        with pytest.raises(PrivacyError, match=match):
            audit.run_audit(
                method, params.trainable, params.frozen, p, images, labels, cfg, microbatch_size=32
            )


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_audit_entry_point_bad_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        cli_main.run_audit_mode(str(tmp_path / "missing"), log=lambda *_: None)
    wd = fake_run(tmp_path / "run")
    os.remove(os.path.join(wd, "data_spec.json"))
    with pytest.raises(CheckpointError, match="data_spec.json is missing"):
        cli_main.run_audit_mode(wd, log=lambda *_: None)
    for how in ("truncate", "delete"):
        wd = fake_run(tmp_path / how)
        corrupt_latest_checkpoint(wd, how)
        with pytest.raises(CheckpointError, match="corrupt"):
            cli_main.run_audit_mode(wd, log=lambda *_: None)
        assert not os.path.exists(os.path.join(wd, "audit.json"))


@pytest.mark.parametrize("over", [{"dp.clipping": "ghost"}, {"dp.microbatch_size": 0},
                                  {"dp.clipping": "ghost", "dp.microbatch_size": 0}])
def test_a_run_with_a_fast_path_or_an_auto_micro_batch_can_be_audited(tmp_path, over):
    """The README demo's run (ghost clipping) was refused by its own audit (the canary
    loss plants its gradient outside any layer, which only 'vmap' supports), and an auto
    micro-batch (0) divided by zero. The audit now runs the reference path, sized for the
    memory, and says which path the run used."""
    wd = fake_run(tmp_path / "run", **over)
    result = cli_main.run_audit_mode(
        wd, audit_config=audit.AuditConfig(num_canaries=50, steps=1), log=lambda *_: None)
    with open(os.path.join(wd, "audit.json")) as f:
        details = json.load(f)["details"]
    assert details["clipping_impl"] == "vmap" and details["microbatch_size"] >= 1
    assert details["run_clipping_impl"] == over.get("dp.clipping", "vmap")
    assert not result.flagged
