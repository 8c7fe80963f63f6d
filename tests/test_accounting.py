"""The accountant against dp_accounting golden values, and calibration."""

import math

import dp_accounting
import numpy as np
import pytest

from dpjax.privacy import accounting, calibration, report
from dpjax.privacy.plan import DPPlan, make_plan


def test_golden_epsilons():
    ev = accounting.dpsgd_event(1.5, 0.04, 2250)
    assert accounting.epsilon([ev], 1e-5, "rdp") == pytest.approx(7.3293, abs=1e-4)
    assert accounting.epsilon([ev], 1e-5, "pld") == pytest.approx(6.7688, abs=1e-4)


@pytest.mark.parametrize("kind,expected", [("rdp", 2.487), ("pld", 2.355)])
def test_calibration_matches_dpdm_table_and_stays_within_target(kind, expected):
    sigma = calibration.calibrate_noise_multiplier(10.0, 1e-5, 1 / 15, 4500, kind)
    assert round(sigma, 3) == expected
    eps = accounting.epsilon([accounting.dpsgd_event(sigma, 1 / 15, 4500)], 1e-5, kind)
    assert eps <= 10.0
    assert eps > 10.0 - 0.01  # And it is not needlessly conservative.


def test_plan_derives_q_and_steps_like_dpdm():
    plan = make_plan(
        num_examples=60000,
        batch_size=4096,
        delta=1e-5,
        clip_norm=1.0,
        epochs=300,
        noise_multiplier=2.4,
    )
    assert plan.sampling_rate == pytest.approx(4096 / 60000)
    assert plan.steps == int(300 / (4096 / 60000))
    assert plan.expected_batch_size == pytest.approx(4096)
    with pytest.raises(accounting.PrivacyError, match="exactly one"):
        make_plan(num_examples=10, batch_size=2, delta=1e-5, clip_norm=1.0, steps=3)


def test_releases_compose_and_nonprivate_is_infinite():
    plan = DPPlan(1000, 0.1, 1.0, 1.0, 100, 1e-5)
    alone = report.epsilon_spent(plan, 100, [])["rdp"]
    more = report.epsilon_spent(plan, 100, [{"kind": "gaussian", "noise_multiplier": 5.0}])
    assert more["rdp"] > alone
    assert math.isinf(report.epsilon_spent(plan, 100, [{"kind": "non_private"}])["rdp"])
    public = DPPlan(1000, 0.1, 0.0, 1.0, 100, 1e-5, enabled=False)
    assert math.isinf(public.epsilon())


def test_zero_steps_cost_nothing_and_eps_grows_with_steps():
    plan = DPPlan(1000, 0.1, 1.0, 1.0, 100, 1e-5)
    assert plan.epsilon(0) == 0.0
    assert plan.epsilon(10) < plan.epsilon(50) < plan.epsilon(100)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_replace_one_doubles_the_sensitivity_of_an_unsampled_gaussian(kind):
    # A release of sum of clipped terms + N(0, (sigma C)^2) (DP-MEPF's embedding): under
    # replace-one its sensitivity is 2C, i.e. the epsilon of sigma / 2 under add/remove.
    # dp_accounting's RDP accountant ignores the relation for this event, so dpjax
    # halves sigma for it (``for_accountant``); its PLD accountant does it itself.
    replace = accounting.epsilon([dp_accounting.GaussianDpEvent(4.0)], 1e-5, kind, "replace_one")
    half = accounting.epsilon([dp_accounting.GaussianDpEvent(2.0)], 1e-5, kind)
    assert replace == pytest.approx(half, rel=1e-3)
    assert replace > 1.5 * accounting.epsilon([dp_accounting.GaussianDpEvent(4.0)], 1e-5, kind)


def test_replace_one_doubles_the_sensitivity_of_a_laplace_event_under_rdp():
    # The same for a Laplace event (pure DP 1/b: 1 under add/remove, 2 under replace-one);
    # dp_accounting's RDP accountant ignores the relation for it too.
    laplace = [dp_accounting.LaplaceDpEvent(1.0)]
    add_remove = accounting.epsilon(laplace, 1e-5, "rdp")
    replace = accounting.epsilon(laplace, 1e-5, "rdp", "replace_one")
    assert add_remove == pytest.approx(1.0, abs=0.01)
    assert replace == pytest.approx(2.0, abs=0.01)


def test_same_guarantee_means_the_same_mechanism_whatever_the_step_count():
    # A resume (and an export) compares the checkpoint's plan with the workdir's.
    base = DPPlan(num_examples=1000, sampling_rate=0.1, noise_multiplier=1.5, clip_norm=1.0,
                  steps=100, delta=1e-5)  # fmt: skip
    assert base.same_guarantee_as(DPPlan.from_dict({**base.to_dict(), "steps": 7}))
    for key, value in [("noise_multiplier", 1.4), ("sampling_rate", 0.11), ("clip_norm", 2.0),
                       ("delta", 1e-6), ("num_examples", 999), ("neighbouring", "replace_one"),
                       ("enabled", False), ("target_epsilon", 3.0), ("accountant", "pld"),
                       ("mechanism", "release")]:  # fmt: skip
        other = DPPlan.from_dict({**base.to_dict(), key: value})
        assert not base.same_guarantee_as(other) and not other.same_guarantee_as(base), key


def test_pld_calibration_with_a_large_prior_release():
    """A DP teacher at RDP epsilon 9.8, then a student with PLD at 10 in total: PLD
    composes the prior far more tightly, so the student's sigma is below half of RDP's
    (the old bracket [RDP/2, RDP] did not contain it and calibration failed)."""
    q, teacher_steps, student_steps = 4096 / 60000, 4394, 439
    teacher_sigma = calibration.calibrate_noise_multiplier(9.8, 1e-5, q, teacher_steps, "rdp")
    prior = [accounting.dpsgd_event(teacher_sigma, q, teacher_steps)]
    rdp = calibration.calibrate_noise_multiplier(10, 1e-5, q, student_steps, "rdp",
                                                extra_events=prior)
    pld = calibration.calibrate_noise_multiplier(10, 1e-5, q, student_steps, "pld",
                                                extra_events=prior)
    eps = lambda s: accounting.epsilon([accounting.dpsgd_event(s, q, student_steps), *prior],
                                       1e-5, "pld")
    assert pld < 0.5 * rdp
    assert 9.99 <= eps(pld) <= 10.0  # Meets the target, and not by a wide margin.


def test_a_loose_target_met_below_sigma_one_tenth_is_calibrated():
    """dp_accounting searches upward from its lower end (0.1 here before): epsilon 200
    over 10 steps at q = 0.001 is met at sigma 0.083, and calibration failed with an
    uncaught NoBracketIntervalFoundError instead of returning it."""
    q, steps = 0.001, 10
    eps = lambda s, kind: accounting.epsilon([accounting.dpsgd_event(s, q, steps)], 1e-5, kind)
    rdp = calibration.calibrate_noise_multiplier(200.0, 1e-5, q, steps, "rdp")
    assert rdp < 0.1 and eps(rdp, "rdp") <= 200.0 < eps(rdp - 2e-4, "rdp")
    # PLD keeps RDP's answer there (PLD's epsilon <= RDP's; searching below it took
    # 220 s of PLD discretization).
    assert calibration.calibrate_noise_multiplier(200.0, 1e-5, q, steps, "pld") == rdp


def test_a_target_that_earlier_releases_already_spend_is_one_privacy_error():
    """Composed with a release of sigma 0.5 (epsilon about 10 alone), epsilon 1 is out
    of reach for any sigma: a PrivacyError that says so, not dp_accounting's
    NoBracketIntervalFoundError (not a ValueError: it escaped the handler)."""
    prior = [dp_accounting.GaussianDpEvent(0.5)]
    # (PLD says what the prior alone spends under PLD: 9.997.)
    needles = {"rdp": "no noise multiplier up to 2", "pld": r"spend 9\.99\d* \(pld\)"}
    for kind, needle in needles.items():
        with pytest.raises(accounting.PrivacyError, match=needle):
            calibration.calibrate_noise_multiplier(1.0, 1e-5, 0.04, 100, kind,
                                                  extra_events=prior)


def test_a_parameter_that_is_not_a_number_is_refused_not_accounted_as_free():
    """dp_accounting accounts for a NaN noise multiplier as free (epsilon 0, and a
    calibration that composed it returned sigma 1e-4); dpjax refuses it everywhere."""
    nan = float("nan")
    good = accounting.dpsgd_event(1.0, 0.1, 10)
    bad_events = [
        dp_accounting.GaussianDpEvent(nan),
        dp_accounting.PoissonSampledDpEvent(nan, dp_accounting.GaussianDpEvent(1.0)),
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), -1),
        dp_accounting.ComposedDpEvent([good, dp_accounting.GaussianDpEvent(-1.0)]),
    ]
    for event in bad_events:
        for kind in ("rdp", "pld"):
            with pytest.raises(accounting.PrivacyError, match="refusing to account"):
                accounting.epsilon([good, event], 1e-5, kind)
    with pytest.raises(accounting.PrivacyError, match="not a number"):
        accounting.dpsgd_event(nan, 0.1, 10)
    with pytest.raises(accounting.PrivacyError, match="whole number"):
        accounting.dpsgd_event(1.0, 0.1, 2.5)
    with pytest.raises(accounting.PrivacyError, match="refusing to account"):
        calibration.calibrate_noise_multiplier(
            3.0, 1e-5, 0.125, 6, extra_events=[dp_accounting.GaussianDpEvent(nan)])
    for target in (nan, math.inf):
        with pytest.raises(accounting.PrivacyError, match="Need epsilon > 0"):
            calibration.calibrate_noise_multiplier(target, 1e-5, 0.125, 6)
    # A recorded release with a NaN noise multiplier fails the report, it is not NaN
    # (the report's NaN means "this accountant does not support the relation").
    plan = DPPlan(noise_multiplier=1.0, clip_norm=1.0, sampling_rate=0.1, num_examples=100,
                  steps=10, delta=1e-5)
    with pytest.raises(accounting.PrivacyError, match="refusing to account"):
        report.epsilon_spent(plan, 10, [{"kind": "gaussian", "noise_multiplier": nan}])
    with pytest.raises(accounting.PrivacyError, match="fractional step count"):
        report.release_event({"kind": "dpsgd", "noise_multiplier": 1.0, "sampling_rate": 0.1,
                              "steps": 2.5})
    # NumPy numbers are numbers (a method's own release_events may give them); -inf
    # noise is no noise, not no release.
    import numpy as np

    ok = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(np.float32(1.0)), 10)
    assert accounting.epsilon([ok], 1e-5) == pytest.approx(
        accounting.epsilon([accounting.dpsgd_event(1.0, 1.0, 10)], 1e-5))
    assert accounting.epsilon([accounting.dpsgd_event(-math.inf, 0.1, 10)], 1e-5) == math.inf


def test_pld_grid_is_coarsened_below_sigma_01_on_nested_grids_never_below_the_fine_one():
    grid = lambda s: accounting.pld_discretization(accounting.dpsgd_event(s, 0.1, 10))
    assert grid(0.1) == grid(5.0) == accounting.PLD_INTERVAL
    for s in (0.099, 0.05, 0.01, 1e-3):  # Powers of two times the fine grid: nested.
        ratio = grid(s) / accounting.PLD_INTERVAL
        assert ratio >= 2 and math.log2(ratio).is_integer()
        assert ratio >= (0.1 / s) ** 2  # At least as coarse as 1/sigma^2 asks.

    # A coarser nested grid never lowers PLD's (pessimistic) epsilon.
    def pld_eps(interval):
        acc = accounting.make_accountant("pld", pld_interval=interval)
        acc.compose(accounting.dpsgd_event(0.5, 0.1, 20))
        return acc.get_epsilon(1e-5)

    fine, coarse = pld_eps(1e-4), pld_eps(4e-4)
    assert fine <= coarse <= fine * 1.05
    # At sigma 1e-3 the fine grid needed terabytes; the coarse one takes seconds and
    # stays below RDP's bound.
    tiny = accounting.dpsgd_event(1e-3, 0.1, 10)
    assert accounting.epsilon([tiny], 1e-5, "pld") <= accounting.epsilon([tiny], 1e-5, "rdp")


def test_pld_grid_follows_the_effective_sigma_and_stays_an_upper_bound():
    """The grid looked at the raw sigma: replace-one (sensitivity 2C) at sigma 0.1 and 100
    unsampled releases at sigma 0.3 (one Gaussian at 0.03) took the fine grid, 0.8 GB and
    11 s, 2.8 GB and 20 s per epsilon (accounting fuzz F4). The coarse grid's epsilon is
    checked against the Gaussian mechanism's exact one (Balle & Wang 2018, Thm. 8)."""
    from scipy import optimize, special

    gauss, grid = dp_accounting.GaussianDpEvent, accounting.pld_discretization
    fine = accounting.PLD_INTERVAL
    hundred = dp_accounting.SelfComposedDpEvent(gauss(0.3), 100)
    assert grid(gauss(0.15)) == fine < grid(gauss(0.15), "replace_one") == grid(gauss(0.075))
    assert grid(gauss(0.3)) == fine < grid(hundred) == grid(gauss(0.03))
    assert grid(dp_accounting.ComposedDpEvent([gauss(0.3)] * 100)) == grid(gauss(0.03))
    assert grid(accounting.dpsgd_event(0.3, 0.1, 100)) == fine  # Sampled: unchanged.

    def exact(sigma, delta=1e-5):  # Sensitivity 1.
        def gap(eps):
            a, b = 1 / (2 * sigma), eps * sigma
            return (math.exp(special.log_ndtr(a - b))
                    - math.exp(eps + special.log_ndtr(-a - b)) - delta)
        return optimize.brentq(gap, 0.0, 5000.0, xtol=1e-12)

    for events, relation, sigma in (([hundred], "add_or_remove_one", 0.03),
                                    ([gauss(0.15)], "replace_one", 0.075)):
        got = accounting.epsilon(events, 1e-5, "pld", relation)
        assert exact(sigma) <= got <= exact(sigma) * 1.01


def test_a_delta_of_one_over_n_or_more_is_refused():
    kw = dict(batch_size=10, clip_norm=1.0, steps=3, noise_multiplier=1.0)
    make_plan(num_examples=100, delta=0.0099, **kw)
    for delta in (0.01, 0.1, 0.0, float("nan")):
        with pytest.raises(accounting.PrivacyError, match=r"not in \(0, 1/N\)"):
            make_plan(num_examples=100, delta=delta, **kw)
    make_plan(num_examples=100, delta=0.5, enabled=False, **kw)  # No guarantee to state.
    # The advice: 1/(10 N) for DP-SGD (N is public there); a power of ten for a one-release
    # plan, which protects N and publishes delta (following the advice must not publish N).
    with pytest.raises(accounting.PrivacyError, match=r"e\.g\. 0\.0003,"):
        make_plan(num_examples=333, delta=0.01, **kw)
    with pytest.raises(accounting.PrivacyError, match=r"e\.g\. 0\.0001,"):
        make_plan(num_examples=333, delta=0.01, release_events=lambda s: [], **kw)


def test_rdp_accounts_for_full_batch_dpsgd_under_replace_one():
    """Poisson sampling at q=1 takes every example: RDP under replace-one (which rejects
    Poisson sampling) accounts for it as the unsampled Gaussian of sensitivity 2C."""
    got = accounting.epsilon([accounting.dpsgd_event(4.0, 1.0, 50)], 1e-5, "rdp", "replace_one")
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 50))
    assert got == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    pld = accounting.epsilon([accounting.dpsgd_event(4.0, 1.0, 50)], 1e-5, "pld", "replace_one")
    assert pld <= got * 1.01  # PLD applies the same sensitivity itself.
    with pytest.raises(accounting.UnsupportedByAccountantError, match="Try accountant='pld'"):
        accounting.epsilon([accounting.dpsgd_event(4.0, 0.5, 50)], 1e-5, "rdp", "replace_one")


def test_a_plan_its_accountant_cannot_account_for_is_refused():
    """RDP under replace-one refuses Poisson sampling: a given sigma made a plan whose
    every report said epsilon nan ("guarantee: (nan, 1e-05)-DP")."""
    kw = dict(num_examples=1000, batch_size=100, delta=1e-5, clip_norm=1.0, steps=10,
              noise_multiplier=1.0, neighbouring="replace_one")
    with pytest.raises(accounting.PrivacyError, match="use dp.accountant='pld'"):
        make_plan(accountant="rdp", **kw)
    assert make_plan(accountant="pld", **kw).epsilon() < math.inf


def test_pld_bracket_whose_upper_end_meets_the_target_only_on_its_own_grid(monkeypatch):
    """PLD searches [RDP's sigma / 2, RDP's sigma] on the grid of the lower end, which is
    coarser below sigma 0.1. Where the upper end meets the target on its own grid but not
    on that coarser one, Brent finds no sign change: this was a false "Cannot reach".
    Real grids differ there by about 1e-5 relative (rare to hit); an exaggerated grid
    below 0.1 (interval 8) makes it certain: epsilon(RDP's sigma 0.137) is 56.9 on the
    fine grid and 63.1 on the coarse one, against a target of 60."""
    fine = accounting.pld_discretization
    # (1e-3 at sigma >= 0.1 rather than 1e-4: ten times cheaper, the same logic.)
    monkeypatch.setattr(
        accounting, "pld_discretization",
        lambda event, relation="add_or_remove_one": (
            8.0 if fine(event, relation) > accounting.PLD_INTERVAL else 1e-3),
    )
    make_event = lambda s: accounting.dpsgd_event(s, 1.0, 1)  # noqa: E731
    eps = lambda s: accounting.epsilon([make_event(s)], 1e-5, "pld")  # noqa: E731
    rdp = calibration.calibrate(make_event, 60.0, 1e-5, "rdp")
    assert 0.1 <= rdp < 0.2 and eps(rdp) < 60.0  # The bracket's upper end meets it...
    coarse = accounting.make_accountant("pld", pld_interval=8.0)
    assert coarse.compose(make_event(rdp)).get_epsilon(1e-5) > 60.0  # ...on its own grid only.
    sigma = calibration.calibrate(make_event, 60.0, 1e-5, "pld", tol=1e-3)
    assert sigma < rdp and eps(sigma) <= 60.0 < eps(sigma - 1e-3)


def test_pld_reaches_a_target_between_the_priors_pld_and_rdp_epsilons():
    """PLD calibration took its upper end from RDP's calibration, and RDP's refusal was
    returned as is: a prior release spending 1.99 under PLD but 2.17 under RDP made a
    total of 2.1 "unreachable (rdp)" for a PLD run (accounting fuzz, 2026-12-07)."""
    prior = dp_accounting.GaussianDpEvent(2.0)
    make_event = lambda s: dp_accounting.ComposedDpEvent(  # noqa: E731
        [dp_accounting.GaussianDpEvent(s), prior])
    eps = lambda s: accounting.epsilon([make_event(s)], 1e-5, "pld")  # noqa: E731
    assert accounting.epsilon([prior], 1e-5, "pld") < 2.1 < accounting.epsilon([prior], 1e-5)
    with pytest.raises(accounting.PrivacyError, match=r"\(rdp\)"):
        calibration.calibrate(make_event, 2.1, 1e-5, "rdp")
    sigma = calibration.calibrate(make_event, 2.1, 1e-5, "pld", tol=1e-3)
    assert eps(sigma) <= 2.1 < eps(sigma - 1e-3)
    # What the prior alone spends under PLD is still refused, in PLD's terms.
    with pytest.raises(accounting.PrivacyError, match=r"spend 1\.99\d* \(pld\) alone"):
        calibration.calibrate(make_event, 1.9, 1e-5, "pld")


def test_inputs_at_the_edge_of_the_accountants_are_one_privacy_error():
    """Found by fuzzing the accountant (2026-12-07): a NaN delta gave epsilon 0 (RDP) or
    NaN (PLD); dp_accounting's zCDP and sampling-without-replacement events took a NaN
    parameter as free; sigma 1e-8 under PLD (a run's final report) raised
    OverflowError, a Laplace scale 0 ZeroDivisionError, a NumPy count TypeError."""
    nan, good = float("nan"), accounting.dpsgd_event(1.0, 0.01, 10)
    refused = {
        "nan delta": lambda: accounting.epsilon([good], nan, "pld"),
        "negative delta": lambda: accounting.epsilon([good], -1e-5),
        "plan with a nan delta": lambda: DPPlan(60000, 0.01, 1.0, 1.0, 10, nan).epsilon(),
        "zCDP": lambda: accounting.epsilon([dp_accounting.ZCDpEvent(nan)], 1e-5),
        "without replacement": lambda: accounting.epsilon(
            [dp_accounting.SampledWithoutReplacementDpEvent(
                100, 10, dp_accounting.GaussianDpEvent(nan))], 1e-5, "rdp", "replace_one"),
        "sigma 1e-8 under PLD": lambda: accounting.epsilon(
            [accounting.dpsgd_event(1e-8, 1.0, 1)], 1e-5, "pld"),
        "Laplace scale 0": lambda: accounting.epsilon([dp_accounting.LaplaceDpEvent(0)], 1e-5),
        "infinite epochs": lambda: make_plan(num_examples=100, batch_size=10, delta=1e-3,
                                             clip_norm=1.0, epochs=math.inf,
                                             noise_multiplier=1.0),
    }
    for name, call in refused.items():
        with pytest.raises(accounting.PrivacyError):
            call()
            pytest.fail(name)
    # A Gaussian of infinite noise releases nothing; a NumPy count is a count.
    assert accounting.epsilon([dp_accounting.GaussianDpEvent(math.inf)], 1e-5, "pld") == 0.0
    three = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), np.int64(3))
    assert accounting.epsilon([three], 1e-5, "pld") == pytest.approx(
        accounting.epsilon([dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(1.0), 3)], 1e-5, "pld"))


def test_a_one_release_plan_has_no_epsilon_of_its_own():
    """Its steps are post-processing; plan.epsilon() returned 0 for a DP-MEPF plan whose
    release spends the whole target (accounting fuzz, 2026-12-07)."""
    plan = DPPlan(1000, 1.0, 1.0, 1.0, 3, 1e-5, mechanism="release")
    with pytest.raises(accounting.PrivacyError, match="its release's"):
        plan.epsilon()


def test_a_sampled_mechanism_of_infinite_noise_is_nothing():
    """Poisson sampling of a Gaussian of infinite noise releases nothing; mapping only the
    inner Gaussian to NoOp made both accountants refuse the sampled event (diff review)."""
    nothing = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(math.inf))
    prior = dp_accounting.GaussianDpEvent(2.0)
    for kind in ("rdp", "pld"):
        assert accounting.epsilon([nothing], 1e-5, kind) == 0.0
        both = dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(nothing, 5), prior])
        assert accounting.epsilon([both], 1e-5, kind) == accounting.epsilon([prior], 1e-5, kind)


def test_pld_calibrates_beside_a_prior_that_rdp_cannot_account_for():
    # RDP refuses a Poisson-sampled Laplace event; PLD accounts for it, and its
    # calibration does not inherit RDP's refusal (calibration.py's guarantee). (~8 s.)
    prior = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.LaplaceDpEvent(2.0))
    with pytest.raises(accounting.UnsupportedByAccountantError):
        calibration.calibrate_noise_multiplier(2.0, 1e-5, 0.1, 1, "rdp", extra_events=[prior])
    sigma = calibration.calibrate_noise_multiplier(2.0, 1e-5, 0.1, 1, "pld",
                                                   extra_events=[prior])
    got = accounting.epsilon(
        [dp_accounting.ComposedDpEvent([accounting.dpsgd_event(sigma, 0.1, 1), prior])],
        1e-5, "pld")
    assert 1.8 < got <= 2.0


def test_a_reported_epsilon_is_rounded_up_never_down():
    cases = {7.3293: "7.33", 9.9991: "10", 1.00001: "1.001", 0.123401: "0.1235", 2.5: "2.5",
             1234.56: "1235", 7.329: "7.329"}  # fmt: skip
    for value, text in cases.items():
        assert report.format_epsilon(value) == text, value
        assert float(text) >= value
    for odd in (math.inf, math.nan, 0.0, "inf", None):
        assert report.format_epsilon(odd) == str(odd)


def test_rdp_under_replace_one_doubles_the_sensitivity_inside_a_composition():
    # epsilon() and calibration wrap several events in a ComposedDpEvent: the rewrite
    # must reach the events inside it.
    composed = [dp_accounting.GaussianDpEvent(4.0), dp_accounting.GaussianDpEvent(6.0)]
    halved = [dp_accounting.GaussianDpEvent(2.0), dp_accounting.GaussianDpEvent(3.0)]
    replace = accounting.epsilon(composed, 1e-5, "rdp", "replace_one")
    assert replace == pytest.approx(accounting.epsilon(halved, 1e-5, "rdp"), rel=1e-9)
    assert replace > 1.5 * accounting.epsilon(composed, 1e-5, "rdp")


def test_calibration_checks_the_searchs_sigma_itself(monkeypatch):
    # dp_accounting's search may stop a little below the answer (its grid, its tol): the
    # result is checked, and stepped up or refused, never returned above the target.
    args = (2.0, 1e-5, 0.01, 100, "rdp")
    true = calibration.calibrate_noise_multiplier(*args)
    for short in (1e-4, 1e-2):
        monkeypatch.setattr(calibration.dp_accounting, "calibrate_dp_mechanism",
                            lambda *a, short=short, **k: true - short)
        try:
            sigma = calibration.calibrate_noise_multiplier(*args)
        except accounting.PrivacyError:
            assert short == 1e-2  # Too far below for a few steps of tol: refused.
            continue
        assert short == 1e-4  # Within a few steps of tol: stepped up until it meets it.
        assert accounting.epsilon([accounting.dpsgd_event(sigma, 0.01, 100)], 1e-5) <= 2.0


def test_the_report_gives_programs_one_finite_epsilon_to_gate_on_or_none():
    """A program that gates a release on the JSON report reads ``guarantee`` and the float
    ``guarantee_epsilon``: under replace-one RDP gives 'nan' (max() over the epsilons
    would be nan, and nan > budget is False), so the guarantee is PLD's; a composed
    non-private release leaves no finite epsilon, and then no guarantee at all."""
    def rep(releases=(), **kw):
        plan = make_plan(num_examples=100, batch_size=10, delta=1e-5, clip_norm=1.0,
                         steps=5, noise_multiplier=2.0, **kw)
        return report.privacy_report(plan, 5, "toy", list(releases), noise_source="secret",
                                     loss_source="secret")

    add_remove = rep()
    assert add_remove["guarantee"] and add_remove["guarantee_accountant"] == "rdp"
    assert add_remove["guarantee_epsilon"] == add_remove["epsilon"]["rdp"]
    replace = rep(neighbouring="replace_one", accountant="pld")
    assert replace["epsilon"]["rdp"] == "nan" and replace["guarantee"]
    assert replace["guarantee_accountant"] == "pld"
    assert replace["guarantee_epsilon"] == replace["epsilon"]["pld"] > 0
    assert "(PLD accountant)" in report.report_markdown(replace)
    leaked = rep([{"kind": "non_private", "description": "a release without noise"}])
    assert not leaked["guarantee"] and leaked["guarantee_epsilon"] is None
    assert leaked["guarantee_status"].startswith("no (no accountant gives a finite epsilon")
    assert "- guarantee:" not in report.report_markdown(leaked)
