"""The privacy report: what a run has spent, under both accountants, with every release.

Releases other than DP-SGD steps (e.g. DP-MEPF's noised embedding) are recorded as
JSON-serializable dicts and turned back into dp_accounting events here, so the report
and the budget always compose the same list.
"""

from __future__ import annotations

import decimal
import math
from typing import Any

import dp_accounting

from dpjax import atomic_file
from dpjax.privacy import accounting, noise_secret
from dpjax.privacy.plan import DPPlan


def storable_epsilons(eps: dict[str, float]) -> dict[str, Any]:
    """``eps`` for a JSON file: a non-finite epsilon as the string 'inf' or 'nan'
    (``atomic_file.json_safe``, the form of every JSON file dpjax writes)."""
    return atomic_file.json_safe(dict(eps))


def format_epsilon(x: Any) -> str:
    """An epsilon for a reader: 4 significant digits, rounded UP (a bound stated lower
    than computed would overstate the guarantee: 7.3293... is '7.33', not '7.329');
    anything but a finite non-zero float as ``str``."""
    if not isinstance(x, float) or not math.isfinite(x) or x == 0.0:
        return str(x)
    exact = decimal.Decimal(repr(float(x)))  # float(): a NumPy float's repr names its type.
    step = decimal.Decimal(1).scaleb(exact.adjusted() - 3)  # 4 significant digits.
    up = exact.quantize(step, rounding=decimal.ROUND_CEILING)
    return f"{float(up):.4g}"


# What one example is, and what a neighbouring dataset does to it, per relation.
_UNIT = {
    "add_or_remove_one": "one training example (an image with its label) added or removed",
    "replace_one": "one training example (an image with its label) replaced by another",
    "replace_special": "one training example replaced by a special (null) example",
}


def release_event(release: dict[str, Any]) -> dp_accounting.DpEvent:
    """The dp_accounting event of a recorded release.

    Supported kinds:
    * 'gaussian': one Gaussian mechanism with ``noise_multiplier`` = noise std / C, the
      per-example norm bound (the sensitivity under add-or-remove-one; under
      replace-one the accountant counts 2C, see ``accounting.for_accountant``);
    * 'dpsgd': a whole earlier DP-SGD run on the same private data (e.g. DP-SAD's DP
      teacher): ``steps`` Poisson-subsampled Gaussian steps (``noise_multiplier``,
      ``sampling_rate``), as ``accounting.dpsgd_event``;
    * 'non_private': a statistic of private data released without noise (epsilon
      becomes infinite).
    """
    kind = release.get("kind")
    if kind == "gaussian":
        return dp_accounting.GaussianDpEvent(float(release["noise_multiplier"]))
    if kind == "dpsgd":
        if not float(release["steps"]).is_integer():
            raise accounting.PrivacyError(f"A fractional step count in the release {release}.")
        return accounting.dpsgd_event(
            float(release["noise_multiplier"]),
            float(release["sampling_rate"]),
            int(release["steps"]),
        )
    if kind == "non_private":
        return dp_accounting.NonPrivateDpEvent()
    raise accounting.PrivacyError(f"Unknown release kind {kind!r} in {release}.")


def epsilon_spent(
    plan: DPPlan, steps_done: int, releases: list[dict[str, Any]] = (), kinds=("rdp", "pld")
) -> dict[str, float]:
    """Epsilon at ``plan.delta`` of ``steps_done`` DP-SGD steps composed with the releases."""
    extra = [release_event(r) for r in releases]
    out = {}
    for kind in kinds:
        if not plan.enabled:
            out[kind] = math.inf
            continue
        try:
            out[kind] = accounting.epsilon(
                [plan.dp_event(steps_done), *extra], plan.delta, kind, plan.neighbouring
            )
        except accounting.UnsupportedByAccountantError:
            out[kind] = math.nan  # This accountant does not support the relation.
    return out


def privacy_report(
    plan: DPPlan,
    steps_done: int,
    method: str,
    releases: list[dict[str, Any]] = (),
    notes: list[str] = (),
    kinds: tuple[str, ...] = ("rdp", "pld"),
    epsilon: dict[str, Any] | None = None,
    noise_source: str | None = None,
    loss_source: str | None = None,
) -> dict[str, Any]:
    """A JSON-serializable report of the guarantee of a run (``notes``: the method's own
    sentences on how its guarantee is obtained, e.g. parallel composition). ``kinds``:
    the accountants to compute (the others are absent from ``epsilon``); ``epsilon``:
    their values (infinite ones as strings) when the caller computed them already for
    exactly this plan, step count and releases (a checkpoint's metadata).
    ``noise_source``: where the noise and batches came from (``noise_secret``'s 'secret',
    'seed' or 'none'; None: not known, as for a checkpoint from before the secret);
    ``loss_source``: where the per-example loss draws came from (the same values).
    ``complete`` is whether ``steps_done`` reached the planned steps (a checkpoint's
    report of an unfinished run is not: DP-SGD steps still to come spend more epsilon;
    a one-release plan spent all of its epsilon at the release, and its later steps,
    post-processing, only train the model further).
    ``private`` is whether DP was on; ``guarantee`` whether the epsilons are a guarantee
    of the run (``guarantee_status``: 'yes', or why not, as ``private_line``), and
    ``guarantee_epsilon`` / ``guarantee_accountant`` the guarantee's epsilon at ``delta``
    (``stated_epsilon``; a float) and its accountant, both None without a guarantee."""
    if epsilon is not None:
        eps = {k: float(epsilon[k]) for k in kinds}  # float('inf') reads its string.
    else:
        eps = epsilon_spent(plan, steps_done, list(releases), kinds)
    report = {
        "method": method,
        "private": plan.enabled,
        "mechanism": (
            "one Gaussian release of the whole dataset (see releases), then post-processing"
            if plan.mechanism == "release"
            else "DP-SGD: Poisson-subsampled Gaussian, flat per-example clipping"
        ),
        "noise_multiplier": plan.noise_multiplier,
        "clip_norm": plan.clip_norm,
        "sampling_rate": plan.sampling_rate,
        "expected_batch_size": plan.expected_batch_size,
        "num_examples": plan.num_examples,
        "plan_mechanism": plan.mechanism,
        "steps_planned": plan.steps,
        "steps_done": int(steps_done),
        # Whether the run did all its planned steps: a report written at a checkpoint of an
        # unfinished run states the epsilon of the steps done so far.
        "complete": int(steps_done) >= plan.steps,
        "delta": plan.delta,
        "target_epsilon": plan.target_epsilon,
        "calibrated_with": plan.accountant,
        "neighbouring_relation": plan.neighbouring,
        "epsilon": storable_epsilons(eps),
        "noise_source": noise_source,
        "loss_source": loss_source,
        "releases": list(releases),
        "notes": list(notes),
    }
    # For programs that read the JSON: 'private' says only that DP was on; whether the
    # epsilons are a guarantee of this run (the markdown's first line) is this, and the
    # one epsilon to gate on (a float, never a string) is 'guarantee_epsilon'.
    status = private_line(report)
    stated = stated_epsilon(report) if status == "yes" else None
    return {**report, "guarantee": status == "yes", "guarantee_status": status,
            "guarantee_epsilon": None if stated is None else stated[1],
            "guarantee_accountant": None if stated is None else stated[0]}


def stated_epsilon(report: dict[str, Any]) -> tuple[str, float] | None:
    """(accountant, epsilon) that the report states as its guarantee: the calibrating
    accountant's epsilon when finite, else the smallest finite one among the others (each
    accountant's epsilon is a valid bound; 'nan' marks one that does not support the
    neighbouring relation, e.g. RDP under replace-one); None when none is finite."""
    # 'inf' / 'nan' as stored; None: an accountant not computed (an eval's summary).
    eps = {k: float(v) for k, v in report["epsilon"].items() if v is not None}
    calibrated = report.get("calibrated_with")
    if calibrated in eps and math.isfinite(eps[calibrated]):
        return calibrated, eps[calibrated]
    finite = sorted((v, k) for k, v in eps.items() if math.isfinite(v))
    return (finite[0][1], finite[0][0]) if finite else None


def without_dataset_size(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` for publication when its plan is one release (DP-MEPF): N and the
    "expected batch" (N itself at q = 1) left out. Such a release noises its counts, so N
    is protected by the guarantee, unlike DP-SGD's, where N sets the public sampling
    rate; published exactly, it would be a fact about the data outside epsilon (the
    release-boundary review of 2026-12-07). Other reports are returned unchanged. A
    composed DP-SGD record among the releases still states its own sampling rate, which
    gives its N; the model card says so (``model_card._dataset_size_line``)."""
    if report.get("plan_mechanism") != "release":
        return report
    return {**report, "num_examples": None, "expected_batch_size": None}


def private_line(report: dict[str, Any]) -> str:
    """Whether the run's guarantee is a real one, in words (the JSON's ``private`` says only
    whether DP was enabled; its ``guarantee`` and ``guarantee_status`` say this, for the
    report as written): 'yes', or why not."""
    if not report["private"]:
        return "no (dp.enabled=False: no clipping, no noise, no guarantee)"
    if not (report["noise_multiplier"] or 0.0) > 0:
        return "no (sigma 0: clipped but not noised, epsilon infinite; export refuses it)"
    if report.get("noise_source") == "seed":
        return ("not for release: the noise and the batches derive from config.seed "
                "(dp.secret_noise=False), and anyone who knows or guesses the seed can "
                "recompute them; export refuses it")
    if noise_secret.public_loss_draws_void(report.get("loss_source"),
                                           report.get("plan_mechanism", "dpsgd")):
        return ("not for release: the per-example loss draws derive from config.seed by "
                "dataset index (a run from before dpjax drew them from the secret), so "
                "removing an example, or replacing it by one that sorts elsewhere, changes "
                "the known draws of the examples after it; export refuses it")
    if report.get("epsilon") and stated_epsilon(report) is None:
        return ("no (no accountant gives a finite epsilon: "
                f"{report['epsilon']}; e.g. a non-private release composed in)")
    return "yes"


def _noise_line(report: dict[str, Any]) -> list[str]:
    source = report.get("noise_source")
    if not report["private"] or source is None:
        return []
    # A one-release plan (DP-MEPF) reads every example once: noise, no batches.
    release = report.get("plan_mechanism") == "release"
    what = "noise" if release else "noise and batches"
    if source != "secret":
        return [f"- {what}: from config.seed (dp.secret_noise=False): reproducible, "
                "and so recomputable by whoever knows the seed"]
    loss = report.get("loss_source")
    if loss == "secret" and not release:
        what = "noise, batches and per-example loss draws"
    lines = [f"- {what}: from a 128-bit secret drawn from the OS when the run "
             "began (the workdir's noise_secret.json; never exported)"]
    if loss == "seed" and not release:
        lines.append("- per-example loss draws: from config.seed, keyed by dataset index "
                     "(a run from before dpjax drew them from the secret)")
    return lines


def one_release_n_coverage(relation: str, releases: list[dict[str, Any]]) -> str:
    """Whether a one-release plan's guarantee covers N, which its export omits:
    'relation' (not under a relation whose neighbours have one size), 'composed' (not
    beside a composed DP-SGD stage, which lists its rate batch / N), else 'protected'
    (the release noises its counts)."""
    if relation != "add_or_remove_one":
        return "relation"
    if any(r.get("kind") == "dpsgd" for r in releases):
        return "composed"
    return "protected"


def _unstated_n(report: dict[str, Any]) -> str:
    """Why a one-release report omits N, and whether the guarantee covers N."""
    return {
        "relation": "N is not stated, but the guarantee does not cover it: neighbouring "
                    "datasets under this relation have the same size",
        "composed": "N is not stated, but not protected either: a composed DP-SGD stage "
                    "below lists its sampling rate, batch / N of the data it trained on",
        "protected": "N is not part of this release: the release, which noises its "
                     "counts, protects it",
    }[one_release_n_coverage(report["neighbouring_relation"], report["releases"])]


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a short markdown document (epsilons rounded up to 4 digits; the
    JSON report has them exact)."""
    eps = report["epsilon"]
    accountant, stated = stated_epsilon(report) or (report["calibrated_with"], None)
    priors = sum(r.get("stage") == "prior" for r in report["releases"])
    private = private_line(report)
    lines = [
        f"# Privacy report ({report['method']})",
        "",
        f"- private: {private}",
        # A run whose randomness is public has an epsilon but no guarantee: say so before
        # the epsilons, which are then the accountant's for its noise, sampling and steps.
        *(["- guarantee: none (see 'private'); the epsilons below are what the accountant "
           "gives for this noise, sampling and steps, not a guarantee of this run"]
          if private.startswith("not for release") else []),
        *([f"- guarantee: ({format_epsilon(float(stated))}, {report['delta']!r})-DP "
           + (("of the one release" + (f" composed with {priors} prior release(s)"
                                          if priors else ""))
              if report.get("plan_mechanism") == "release"
              else f"after {report['steps_done']} steps"
              + (f" and {priors} prior release(s)" if priors else ""))
           + f" ({accountant.upper()} accountant), for "
           f"{_UNIT.get(report['neighbouring_relation'], 'one example')}"]
          if private == "yes" and stated is not None
          else []),
        f"- mechanism: {report['mechanism']}",
        f"- noise multiplier sigma: {report['noise_multiplier']:.6g}",
        *_noise_line(report),
        f"- clip norm C: {report['clip_norm']}",
        *(
            [
                "- private data read once, all "
                + (f"N={report['num_examples']} examples" if report["num_examples"] is not None
                   else f"examples ({_unstated_n(report)})"),
                f"- post-processing steps (no private data): {report['steps_done']} done of "
                f"{report['steps_planned']} planned",
            ]
            if report.get("plan_mechanism") == "release"
            else [
                f"- sampling rate q: {report['sampling_rate']:.6g} (expected batch "
                f"{report['expected_batch_size']:.1f} of N={report['num_examples']})",
                f"- steps: {report['steps_done']} done of {report['steps_planned']} planned"
                + ("" if report.get("complete", True) else
                   " (the run is not finished: the epsilons are those of the steps done, "
                   "and its further steps spend more)"),
            ]
        ),
        f"- delta: {report['delta']!r}",  # Not rounded (:g could round it down).
        *(f"- epsilon ({k.upper()}): {format_epsilon(eps[k])}" if k in eps else
          f"- epsilon ({k.upper()}): not computed at this checkpoint (the end of the run "
          "computes it)" for k in ("rdp", "pld")),
        (
            f"- target epsilon: {report['target_epsilon']} (sigma calibrated with "
            f"{report['calibrated_with'].upper()})"
            if report["target_epsilon"] is not None
            else "- target epsilon: none (the config gave sigma; the epsilons above are "
            "what it spends)"
        ),
        f"- neighbouring relation: {report['neighbouring_relation']}",
        f"- other releases: {len(report['releases'])}",
    ]
    lines += [f"  - {r.get('description', r)}" for r in report["releases"]]
    lines += [f"- note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines) + "\n"
