"""Where a run's starting weights come from, checked before the run writes or trains.

Every method that starts from another run (a public pre-trained UNet, an autoencoder,
DP-MEPF's feature network, DP-SAD's teacher) names that run in its config
(``*_from``). The weights of such a run are a function of ITS training data. The
guarantee that this run's privacy report states covers this run's private data only
if every source run either

* never saw this run's private data (public pre-training), or
* is a DIRECT source that saw it under DP-SGD, and the method composes that training
  into the total (``Method.prior_releases``, e.g. a DP teacher or a DP feature network).

A source trained WITHOUT DP on the private data voids the guarantee, wherever it is
in the chain of sources (a public UNet fine-tuned from a non-private run of the private
data carries that run's weights). A source trained WITH DP on the private data whose
epsilon the method does not compose makes the stated epsilon too small. ``check_sources``
refuses both, before the run builds its state, with one message that names the source.
Composition also assumes the two runs' randomness independent and unknown
(``check_composed_randomness``): a composed source must have drawn its noise from its
own secret (``noise_secret``); only a research run (``dp.secret_noise=False``, which
export refuses) may compose a seed-derived one, and then not one with its own seed.

What "the private data" is: two data sections denote the same data when their
``data_identity`` strings name the same dataset (``same_data``): the same ``data.name``,
whatever the source that reads it and whichever split (a private collection's test
images are private too, and Fashion-MNIST read from an npz copy is Fashion-MNIST); for
the 'fake' source, the same name and fake_seed. The check errs on the side of refusing
(two different datasets with one name count as the same); it cannot see that two
different names hold the same images, which stays the user's responsibility. (It
compared source, name, split and fake_seed before: the release-boundary review of
2026-12-07 passed a non-DP run on the private data off as public by reading it through
another source, or by changing the unused fake_seed of a real dataset.)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from dpjax.data import npz
from dpjax.data.dataset import DataError
from dpjax.privacy import noise_secret
from dpjax.privacy import plan as plan_lib
from dpjax.privacy.accounting import PrivacyError

#: The fields of a run's data section that identify WHICH data it reads (not how it is
#: prepared): two runs whose identities agree read the same examples (or overlapping
#: ones, e.g. a 'limit' subset). The path is left out on purpose: identities are method
#: settings in DP-SAD, and method settings are exported (model_config.json), which must
#: not name a private location.
DATA_IDENTITY_FIELDS = ("source", "name", "split", "fake_seed")

_SAME_DATA_RULE = (
    " (Two runs read the same data when their data.name agrees, whatever data.source "
    "and data.split (and, for fake data, data.fake_seed): paths are not recorded, so two "
    "folders or files under one data.name count as one dataset. If the two really hold "
    "different images, give each its own --config.data.name.)"
)


def data_identity(data: Mapping[str, Any]) -> str:
    """'source=...|name=...|split=...|fake_seed=...' of a data section (a dict)."""
    return "|".join(f"{k}={data.get(k, '')}" for k in DATA_IDENTITY_FIELDS)


def same_data(a: str, b: str) -> bool:
    """Whether two ``data_identity`` strings name the same dataset (see the module doc):
    the same name, and for 'fake' data on either side, both fake with one fake_seed."""
    fa, fb = _identity_fields(a), _identity_fields(b)
    if fa.get("name") != fb.get("name"):
        return False
    fake_a, fake_b = fa.get("source") == "fake", fb.get("source") == "fake"
    if fake_a or fake_b:
        return fake_a and fake_b and fa.get("fake_seed") == fb.get("fake_seed")
    return True


def _identity_fields(identity: str) -> dict[str, str]:
    return dict(part.partition("=")[::2] for part in identity.split("|"))


@dataclasses.dataclass(frozen=True)
class Source:
    """A run whose weights (or statistics) a method loads.

    Attributes:
      what: the config key that names it, e.g. 'init_from' (for messages).
      workdir: its workdir.
      composed: True when the method composes this run's DP training into its own
        total (it is in ``Method.prior_releases``); False when the method assumes that
        the run is public.
    """

    what: str
    workdir: str
    composed: bool = False


@dataclasses.dataclass(frozen=True)
class SourceRun:
    """The public facts of a source's workdir: read from its JSON files, no weights."""

    workdir: str
    dp_enabled: bool
    data: dict[str, Any]
    sources: tuple[tuple[str, str], ...]  # (config key, workdir) of ITS sources
    seed: int | None = None  # config.seed
    # Where ITS noise and batches came from (noise_secret): 'secret', 'seed' (also a run
    # from before the record), or 'none' without DP.
    noise_source: str = noise_secret.SEED
    # True where ITS per-example loss draws came from its config.seed (a run from before
    # the secret loss draws): no guarantee to compose.
    loss_draws_void: bool = False


def read_source_run(what: str, workdir: str) -> SourceRun:
    """Reads ``workdir``'s config.json and dp_plan.json.

    Raises:
      PrivacyError: the workdir holds no dpjax run, so its data cannot be checked, or a
        private run that has written no checkpoint yet.
    """

    def read(name: str, load: Any) -> Any:
        try:
            return load(os.path.join(workdir, name))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PrivacyError(
                f"{what}={workdir!r}: cannot read {name} ({e}), so what data its weights "
                "were trained on cannot be checked. Point it at a finished dpjax run."
            ) from e

    config = read("config.json", _read_json)
    plan, extra = read("dp_plan.json", plan_lib.load_plan)
    if (plan.enabled and noise_secret.NOISE_SOURCE_KEY not in extra
            and extra.get("steps_done") == 0):
        # A new run writes its plan before its first checkpoint records where its noise
        # came from: without this, it read as a run with seed-derived noise.
        raise PrivacyError(
            f"{what}={workdir!r} has written no checkpoint yet (its dp_plan.json records "
            "no step done): point it at a run that has trained.")
    method_args = config.get("method_args") or {}
    nested = tuple(
        (key, value)
        for key, value in sorted(method_args.items())
        if key.endswith("_from") and isinstance(value, str) and value
    )
    return SourceRun(
        workdir=workdir,
        dp_enabled=plan.enabled,
        data=dict(config.get("data") or {}),
        sources=nested,
        seed=config.get("seed"),
        noise_source=(noise_secret.recorded_source(extra) if plan.enabled
                      else noise_secret.NONE),
        loss_draws_void=plan.enabled and noise_secret.public_loss_draws_void(
            noise_secret.recorded_loss_source(extra), plan.mechanism),
    )


def checked_source_plan(what: str, workdir: str, step: int) -> dict[str, Any]:
    """The DP plan (``DPPlan.to_dict``) under which the weights of ``workdir``'s
    checkpoint ``step`` were trained: ``dp_plan.json``'s, refused unless that checkpoint's
    own metadata records the same plan (``check_source_plan``).

    Raises:
      PrivacyError: the records differ, or the checkpoint records no plan.
    """
    from dpjax import checkpoint as ckpt_lib  # Deferred: orbax, only for sources.

    plan, _ = plan_lib.load_plan(os.path.join(workdir, "dp_plan.json"))
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        recorded = checkpointer.restore_meta(step).get("plan")
    finally:
        checkpointer.close()
    check_source_plan(what, workdir, step, plan, recorded)
    return plan.to_dict()


def check_source_plan(
    what: str, workdir: str, step: int, plan: plan_lib.DPPlan, recorded: Any
) -> None:
    """Refuses a source whose plan to compose (``plan``, from its ``dp_plan.json``) is not
    the one its checkpoint ``step`` records (``recorded``, from that checkpoint's metadata).

    A composed source's sigma, q and relation decide the epsilon this run adds for it;
    read from ``dp_plan.json`` alone, an edited file (sigma x 100) lowered a published
    epsilon (untrusted-input review, 2026-12-07). The two records are plain JSON: this
    catches a plan file changed or swapped after the training, not a forger who edits
    both, so a composed source must be a run one trusts (README).

    Raises:
      PrivacyError: the records differ, or the checkpoint records no plan.
    """
    if not plan_lib.recorded_plan_matches(recorded, plan):
        raise PrivacyError(
            f"{what}={workdir!r}: its checkpoint at step {step} records another DP plan "
            f"({recorded}) than its dp_plan.json ({plan.to_dict()}), so the epsilon to "
            "compose for its weights cannot be trusted. Restore the run's own dp_plan.json, "
            "or train the source again."
        )


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def check_sources(
    sources: Sequence[Source],
    private_data: Mapping[str, Any],
    seed: int | None = None,
    secret_noise: bool = True,
) -> None:
    """Refuses sources that void or understate this run's guarantee (see module doc).

    Args:
      sources: the runs the method loads (``Method.source_runs``).
      private_data: this run's data section (a dict), the data its guarantee covers.
      seed: this run's ``config.seed``; None skips the comparison of seeds.
      secret_noise: this run's ``dp.secret_noise``.

    Raises:
      PrivacyError: a source (or a source of a source) was trained without DP on the
        private data; or a direct source was trained with DP on it but the method does
        not compose it; or a source of a source was trained with DP on it (only direct
        sources are composed); or a composed source's randomness is not independent and
        secret (``check_composed_randomness``); or a composed source trained on a
        source's first rows (``check_composed_subset``); or a source cannot be read.
    """
    check_sources_against(sources, data_identity(private_data))
    for source in sources:
        if source.composed:  # Read once for both checks.
            run = read_source_run(source.what, source.workdir)
            check_composed_randomness(source, run, seed, secret_noise)
            check_composed_subset(source, run)


def check_composed_subset(source: Source, run: SourceRun) -> None:
    """Refuses a composed DP source (``run``, read from ``source``) trained on the first
    ``data.limit`` rows of its data, or on float npz images before ``data.float_range``
    (``npz.check_float_range_from_start``).

    Adding one file to that data could push another out of the first rows, so the
    source's epsilon is not the add-or-remove one this run composes
    (``run_config.check_private_data_spec``, which refuses such a run of its own).

    Raises:
      PrivacyError: as above.
    """
    try:  # Its steps scaled float images by a rule chosen on the whole array?
        npz.check_float_range_from_start(run.data, run.dp_enabled)
    except DataError as e:
        raise PrivacyError(f"{source.what}={source.workdir!r}: {e}") from None
    limit = int(run.data.get("limit") or 0)
    if run.dp_enabled and limit:
        raise PrivacyError(
            f"{source.what}={source.workdir!r} was trained with DP on the first {limit} "
            "rows of its data (data.limit): adding one file there could push another "
            "out, so its epsilon is not the add-or-remove one composed here. Train it on "
            "a dataset that holds exactly those rows."
        )


def check_composed_randomness(
    source: Source, run: SourceRun, seed: int | None, secret_noise: bool = True
) -> None:
    """Refuses a composed source (``run``, read from ``source``) whose noise the
    accountant cannot treat as independent and unknown.

    Composition (adding the two runs' privacy losses, as the accountant does for
    ``prior_releases``) assumes that each mechanism's noise is secret and independent of
    the other's. A source whose noise derives from its config.seed (``dp.secret_noise=
    False``, or a run from before the noise secret) has no guarantee to compose: whoever
    knows or guesses its seed removes its noise (the diff review of 2026-12-07 exported a
    DP-SAD student over such a teacher). A research run (``secret_noise`` False) may
    compose one, as long as the seeds differ: one seed draws the same Poisson batches and
    noise in both runs, and the true epsilon is then above the composed one.

    The same holds for a source whose per-example loss draws came from its config.seed
    (``noise_secret.public_loss_draws_void``).

    Raises:
      PrivacyError: as above, or a seed-derived source without a seed on record.
    """
    if run.noise_source == noise_secret.SECRET:
        if not run.loss_draws_void:
            return
        if secret_noise:
            raise PrivacyError(
                f"{source.what}={source.workdir!r} drew its per-example loss draws from its "
                "config.seed, keyed by dataset index (a run from before dpjax drew them "
                "from the secret): it has no guarantee to compose into this run's "
                "epsilon. Train it again, or run this one with "
                "dp.secret_noise=False (research only: export refuses it)."
            )
        # A research run: its own loss draws come from its seed too (the check below).
    elif secret_noise:
        raise PrivacyError(
            f"{source.what}={source.workdir!r} drew its noise and batches from its "
            "config.seed (dp.secret_noise=False, or a run from before dpjax drew them "
            "from a secret): whoever knows or guesses the seed can remove its noise, so "
            "it has no guarantee to compose into this run's epsilon. Train it again "
            "with dp.secret_noise=True (the default), or run this one with "
            "dp.secret_noise=False too (research only: export refuses it)."
        )
    if seed is not None and (run.seed is None or int(run.seed) == int(seed)):
        raise PrivacyError(
            f"{source.what}={source.workdir!r} was trained with seed={run.seed}, and this "
            f"run's seed is {seed}. Its DP training is composed into this run's epsilon, "
            "which assumes independent randomness, but one seed draws the same Poisson "
            "batches, Gaussian noise or per-example loss draws in both runs "
            "(dp.secret_noise=False), and the stated epsilon would be too small. Give "
            "this run another seed (--config.seed=...)."
        )


def check_sources_against(sources: Sequence[Source], private: str) -> None:
    """``check_sources`` with the private data given by its ``data_identity`` string.

    Raises:
      PrivacyError: as ``check_sources``.
    """
    for source in sources:
        _check_chain(source, source.what, source.workdir, private, depth=0, seen=())


def _check_chain(
    top: Source, what: str, workdir: str, private: str, depth: int, seen: tuple[str, ...]
) -> None:
    key = os.path.realpath(workdir)
    if key in seen:  # A cycle: this run is being checked already.
        return
    run = read_source_run(what, workdir)
    chain = f"{top.what}={top.workdir!r}" + ("" if depth == 0 else f" (through {what}={workdir!r})")
    if same_data(data_identity(run.data), private):
        if not run.dp_enabled:
            raise PrivacyError(
                f"{chain} was trained WITHOUT DP on this run's private data ({private}); "
                "its weights would void the guarantee. Start from a run on other, public "
                "data, or from a run trained with DP-SGD that the method composes."
                + _SAME_DATA_RULE
            )
        # Only a DIRECT source's own DP training (and the releases its checkpoint records)
        # is composed; a DP run on the private data further up the chain is not.
        if not top.composed or depth > 0:
            raise PrivacyError(
                f"{chain} was trained with DP on this run's private data ({private}), but "
                "nothing composes its epsilon into this run's, so the stated epsilon would be "
                "too small. Use a run on other, public data." + _SAME_DATA_RULE
            )
    for nested_what, nested_dir in run.sources:
        _check_chain(top, nested_what, nested_dir, private, depth + 1, (*seen, key))
