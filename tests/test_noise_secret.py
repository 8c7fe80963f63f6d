"""The DP noise and the Poisson batches come from a per-run secret, not the public seed.

The randomness review of 2026-12-07 recovered DP-MEPF's noiseless sums from an export in
under a second, and decided membership by replaying DP-SGD, because both were derived
from ``config.seed`` (0 by default, stored in config.json, checkable against the
exported samples). These tests fail on that code.
"""

import json
import os
import pathlib
import shutil
import stat

import jax
import numpy as np
import pytest

from dpjax import export, run_config, run_noise, sample, train
from dpjax.privacy import noise_secret
from dpjax.privacy import plan as plan_lib
from dpjax.privacy import report as report_lib
from dpjax.privacy.sampling import PoissonSampler
from dpjax.randomness import Streams
from tests.test_export import fake_run, toy_config

QUIET = {"log": lambda *_: None}


def _ema(workdir):
    _, state, _, _ = sample.restore_state(workdir)
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(state.ema)])


def _secret(workdir):
    return json.loads(pathlib.Path(workdir, noise_secret.SECRET_FILE).read_text())


def _fixed_draws(monkeypatch, *noises):
    """Makes the next new secrets' noise parts ``noises``, in order (batches: 7)."""
    drawn = iter(noises)
    monkeypatch.setattr(noise_secret, "_draw",
                        lambda: {"noise": next(drawn), "batches": 7, "created": "test",
                                 noise_secret.LOSS_DRAWS_FIELD: noise_secret.LOSS_DRAWS_SECRET})


def test_two_runs_with_one_seed_draw_independent_noise_unless_secret_noise_is_off(tmp_path):
    a, b = (train.train(toy_config(3), str(tmp_path / n), **QUIET) for n in "ab")
    assert a is not None and b is not None
    assert not np.allclose(_ema(tmp_path / "a"), _ema(tmp_path / "b"))
    off = {"dp.secret_noise": False}
    for n in ("c", "d"):
        train.train(toy_config(3, **off), str(tmp_path / n), **QUIET)
    np.testing.assert_array_equal(_ema(tmp_path / "c"), _ema(tmp_path / "d"))
    assert not os.path.exists(tmp_path / "c" / noise_secret.SECRET_FILE)
    # What a run's records say about its noise.
    for name, source in (("a", "secret"), ("c", "seed")):
        plan = json.loads((tmp_path / name / "dp_plan.json").read_text())
        report = json.loads((tmp_path / name / "privacy_report.json").read_text())
        assert plan["noise_source"] == report["noise_source"] == source
        assert plan["loss_source"] == report["loss_source"] == source
    md = (tmp_path / "c" / "privacy_report.md").read_text()
    assert "- private: not for release" in md and "from config.seed" in md
    assert "- guarantee: none (see 'private')" in md and "-DP after" not in md
    md = (tmp_path / "a" / "privacy_report.md").read_text()
    assert "- private: yes" in md
    assert ("noise, batches and per-example loss draws: from a 128-bit secret" in md
            and "noise_secret.json; never exported" in md)


def _key_data(key) -> np.ndarray:
    return np.asarray(jax.random.key_data(key))


def test_the_loss_draws_come_from_the_secret_and_an_old_checkpoint_keeps_the_seeds(tmp_path):
    """Per-example loss draws are keyed by dataset index: drawn from the public seed,
    removing one example would hand every later one other, known draws (the docstring
    audit of 2026-12-07; noise_secret's docstring)."""
    cfg = run_config.from_configdict(toy_config(3))
    seeded = Streams.from_seed(cfg.seed)
    wd = str(tmp_path / "run")
    os.makedirs(wd)
    streams, _, source, loss = run_noise.noise_randomness(cfg, wd, seeded, None, **QUIET)
    assert (source, loss) == ("secret", "secret")
    secret = _secret(wd)["noise"]
    np.testing.assert_array_equal(_key_data(streams.noise),
                                  _key_data(noise_secret.noise_key(secret)))
    np.testing.assert_array_equal(_key_data(streams.loss),
                                  _key_data(noise_secret.loss_key(secret)))
    assert not np.array_equal(_key_data(streams.loss), _key_data(seeded.loss))
    # Not on the noise key's chains: not the key itself, a step's noise key or a key split
    # from one (a loss key folded from the noise key would equal step t's noise key).
    noise_chain = [streams.noise, *jax.random.split(streams.noise, 4)]
    for t in range(32):
        step = jax.random.fold_in(streams.noise, t)
        noise_chain += [step, *jax.random.split(step, 4)]
    for t in (0, 1, 2):
        loss_step = _key_data(jax.random.fold_in(streams.loss, t))
        for k in noise_chain:
            assert not np.array_equal(loss_step, _key_data(k))
            assert not np.array_equal(_key_data(streams.loss), _key_data(k))
    # A resume goes on with the sources its checkpoint records.
    meta = {"noise_source": "secret", "loss_source": "secret"}
    resumed = run_noise.noise_randomness(cfg, wd, seeded, meta, **QUIET)
    np.testing.assert_array_equal(_key_data(resumed[0].loss), _key_data(streams.loss))
    assert resumed[2:] == ("secret", "secret")
    # A checkpoint from before the record drew them from the seed: it replays that, says so.
    lines = []
    old = run_noise.noise_randomness(cfg, wd, seeded, {"noise_source": "secret"},
                                     log=lines.append)
    assert old[2:] == ("secret", "seed")
    np.testing.assert_array_equal(_key_data(old[0].loss), _key_data(seeded.loss))
    np.testing.assert_array_equal(_key_data(old[0].noise), _key_data(streams.noise))
    assert any("predates secret per-example loss draws" in x for x in lines), lines
    # Without a secret (dp.secret_noise=False), or without DP, all stays seed-derived.
    for over, want in (({"dp.secret_noise": False}, "seed"), ({"dp.enabled": False}, "none")):
        c = run_config.from_configdict(toy_config(3, **over))
        got = run_noise.noise_randomness(c, str(tmp_path / want), seeded, None, **QUIET)
        assert got[2:] == (want, want)
        np.testing.assert_array_equal(_key_data(got[0].loss), _key_data(seeded.loss))


def test_the_dp_step_draws_its_loss_randomness_from_the_loss_key(tmp_path, monkeypatch):
    """What setup puts in ``Run.streams.loss`` is what the step's loss draws from (the
    toy's loss draws its noise from its key): another loss key, another run."""
    monkeypatch.setattr(noise_secret, "_draw", lambda: {
        "noise": 1, "batches": 7, noise_secret.LOSS_DRAWS_FIELD: noise_secret.LOSS_DRAWS_SECRET})
    train.train(toy_config(3), str(tmp_path / "base"), **QUIET)
    real = noise_secret.loss_key
    monkeypatch.setattr(noise_secret, "loss_key", lambda s: jax.random.fold_in(real(s), 99))
    train.train(toy_config(3), str(tmp_path / "other"), **QUIET)
    assert not np.allclose(_ema(tmp_path / "other"), _ema(tmp_path / "base"))


def test_public_loss_draws_leave_no_guarantee_under_either_relation():
    # Under replace-one too: a replacement that sorts elsewhere (another class folder or
    # file name) shifts the rows in between (the order audit of 2026-12-07).
    def plan(**kw):
        return plan_lib.make_plan(num_examples=100, batch_size=10, delta=1e-5, clip_norm=1.0,
                                  steps=1, noise_multiplier=1.0, **kw)

    def private_line(p, loss):
        rep = report_lib.privacy_report(p, 1, "toy", noise_source="secret", loss_source=loss)
        md = report_lib.report_markdown(rep)
        # The epsilon of a run without a guarantee is not stated as one.
        guarantee = [x for x in md.splitlines() if x.startswith("- guarantee:")]
        assert len(guarantee) == 1, md
        assert guarantee[0].startswith("- guarantee: none" if loss == "seed"
                                       else "- guarantee: ("), md
        # The JSON says the same to a program: 'private' is only that DP was on.
        assert rep["private"] and rep["guarantee"] is (loss != "seed")
        assert rep["guarantee_status"] == ("yes" if loss != "seed" else
                                           report_lib.private_line(rep))
        return [x for x in md.splitlines() if x.startswith("- private:")][0]

    old = {"noise_source": "secret"}  # A checkpoint from before loss_source was recorded.
    for p in (plan(), plan(neighbouring="replace_one", accountant="pld")):
        with pytest.raises(export.NotPrivateError, match="per-example loss draws derive from"):
            export.check_secret_noise(old, p)
        export.check_secret_noise({**old, "loss_source": "secret"}, p)
        assert "not for release: the per-example loss draws" in private_line(p, "seed")
        assert private_line(p, "secret") == "- private: yes"
        seeded = report_lib.privacy_report(p, 1, "toy", noise_source="seed", loss_source="seed")
        assert not seeded["guarantee"] and "config.seed" in seeded["guarantee_status"]
    off = report_lib.privacy_report(plan(enabled=False), 1, "toy", noise_source="none")
    assert not off["private"] and not off["guarantee"]
    # A one-release plan (DP-MEPF) has no per-example loss draws under its guarantee.
    assert not noise_secret.public_loss_draws_void("seed", "release")
    assert noise_secret.public_loss_draws_void("seed", "dpsgd")


def test_the_secret_is_private_and_a_resume_reads_it_back(tmp_path, monkeypatch):
    _fixed_draws(monkeypatch, 11)
    whole = str(tmp_path / "whole")
    train.train(toy_config(6), whole, **QUIET)
    path = os.path.join(whole, noise_secret.SECRET_FILE)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(pathlib.Path(path).read_text())["noise"] == 11
    # The same secret, in two invocations; the resume must read the file, not draw 33.
    _fixed_draws(monkeypatch, 11, 33)
    split = str(tmp_path / "split")
    train.train(toy_config(6, **{"train.max_steps_per_run": 3}), split, **QUIET)
    train.train(toy_config(6), split, **QUIET)
    np.testing.assert_array_equal(_ema(whole), _ema(split))
    # A secret lost before a resume: the remaining steps draw from a new one, and say so.
    _fixed_draws(monkeypatch, 11, 44)
    lost = str(tmp_path / "lost")
    train.train(toy_config(6, **{"train.max_steps_per_run": 3}), lost, **QUIET)
    os.remove(os.path.join(lost, noise_secret.SECRET_FILE))
    lines = []
    train.train(toy_config(6), lost, log=lines.append)
    assert any("is missing: the remaining steps draw" in x for x in lines), lines
    assert _secret(lost)["noise"] == 44
    assert not np.array_equal(_ema(whole), _ema(lost))


def test_the_noise_follows_its_secret_and_the_batches_theirs(tmp_path, monkeypatch):
    """Given the secret, a run is determined; each half of the secret changes the run."""

    def run(name, noise, batches):
        monkeypatch.setattr(noise_secret, "_draw", lambda: {
            "noise": noise, "batches": batches,
            noise_secret.LOSS_DRAWS_FIELD: noise_secret.LOSS_DRAWS_SECRET})
        train.train(toy_config(3), str(tmp_path / name), **QUIET)
        return _ema(tmp_path / name)

    base = run("base", 1, 7)
    np.testing.assert_array_equal(run("again", 1, 7), base)
    assert not np.allclose(run("other_noise", 2, 7), base)  # Not the seed's noise.
    assert not np.allclose(run("other_batches", 1, 8), base)  # Not the seed's batches.


def test_a_secret_is_reused_only_to_replay_one_run(tmp_path):
    first = str(tmp_path / "first")
    train.train(toy_config(3), first, **QUIET)
    secret = pathlib.Path(first, noise_secret.SECRET_FILE).read_bytes()
    # Placed (by a copy with the umask's 0644) in a workdir where no run has started: it
    # replays the run it came from, and is narrowed to 0600.
    replay = tmp_path / "replay"
    replay.mkdir()
    (replay / noise_secret.SECRET_FILE).write_bytes(secret)
    os.chmod(replay / noise_secret.SECRET_FILE, 0o644)
    lines = []
    train.train(toy_config(3), str(replay), log=lines.append)
    assert any("was placed in a workdir where no run had started" in x for x in lines), lines
    np.testing.assert_array_equal(_ema(replay), _ema(first))
    assert stat.S_IMODE(os.stat(replay / noise_secret.SECRET_FILE).st_mode) == 0o600
    # A run started again from step 0 in its own workdir (checkpoints deleted): setup
    # allows only the same config and data there, so it replays its first attempt.
    again = tmp_path / "again"
    shutil.copytree(first, again)
    shutil.rmtree(again / "checkpoints")
    lines = []
    train.train(toy_config(3), str(again), log=lines.append)
    assert any("starts again from step 0 with the config and data" in x for x in lines), lines
    assert (again / noise_secret.SECRET_FILE).read_bytes() == secret
    np.testing.assert_array_equal(_ema(again), _ema(first))
    # A workdir that held another run (its config.json and plan deleted, its logs left):
    # a placed secret is not used, so another config never meets that run's noise (diff
    # review, 2026-12-07).
    other = tmp_path / "other"
    shutil.copytree(first, other)
    for name in ("checkpoints", "config.json", "dp_plan.json"):
        shutil.rmtree(other / name) if name == "checkpoints" else os.remove(other / name)
    train.train(toy_config(3, **{"optim.learning_rate": 1e-3}), str(other), **QUIET)
    assert (other / noise_secret.SECRET_FILE).read_bytes() != secret


def test_a_secret_from_before_secret_loss_draws_replays_nothing_from_step_0(tmp_path):
    """Its run drew its loss draws from the seed: reused from step 0 with secret loss
    draws, its noise would sit on other sums, a second computation under the same noise
    (the diff review of 2026-12-07). A resume of its own run still reads it."""
    path = tmp_path / noise_secret.SECRET_FILE
    old = {"noise": 5, "batches": 6, "created": "before the field"}
    for reuse in (noise_secret.REUSE_PLACED, noise_secret.REUSE_RESTART):
        path.write_text(json.dumps(old))
        lines = []
        got = noise_secret.load_or_create(str(tmp_path), resuming=False, reuse=reuse,
                                          log=lines.append)
        assert got != (5, 6)
        assert any("predates secret per-example loss draws" in x for x in lines), lines
        stored = _secret(tmp_path)
        assert stored[noise_secret.LOSS_DRAWS_FIELD] == noise_secret.LOSS_DRAWS_SECRET
        # A secret drawn since is reused.
        again = noise_secret.load_or_create(str(tmp_path), resuming=False, reuse=reuse,
                                            log=lambda *_: None)
        assert again == got
    path.write_text(json.dumps(old))
    assert noise_secret.load_or_create(str(tmp_path), resuming=True, log=print) == (5, 6)


def test_a_damaged_secret_file_is_one_clear_error(tmp_path):
    wd = str(tmp_path / "w")
    train.train(toy_config(6, **{"train.max_steps_per_run": 3}), wd, **QUIET)
    path = os.path.join(wd, noise_secret.SECRET_FILE)
    with open(path, "w") as f:
        json.dump({"noise": "abc", "batches": 1}, f)
    with pytest.raises(noise_secret.NoiseSecretError, match="does not hold two 128-bit"):
        train.train(toy_config(6), wd, **QUIET)
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(noise_secret.atomic_file.CorruptFileError, match="not valid JSON"):
        train.train(toy_config(6), wd, **QUIET)


def test_export_refuses_a_run_whose_noise_derives_from_the_seed(tmp_path):
    wd = fake_run(tmp_path / "seeded", **{"dp.secret_noise": False})
    with pytest.raises(export.NotPrivateError, match="derive from config.seed"):
        export.export_run(wd, str(tmp_path / "o"), num_samples=2, **QUIET)
    assert not (tmp_path / "o").exists()
    # A checkpoint from before the secret has no record: it counts as seed-derived.
    with pytest.raises(export.NotPrivateError, match="from before dpjax drew them"):
        export.check_secret_noise({"plan": {}},
                                  plan_lib.load_plan(os.path.join(wd, "dp_plan.json"))[0])
    export.check_secret_noise({"noise_source": "secret", "loss_source": "secret"},
                              plan_lib.load_plan(os.path.join(wd, "dp_plan.json"))[0])


def test_the_export_holds_nothing_of_the_secret(tmp_path):
    wd = str(tmp_path / "run")
    train.train(toy_config(3), wd, **QUIET)
    secret = _secret(wd)
    out = str(tmp_path / "release")
    export.export_run(wd, out, num_samples=4, **QUIET)
    words = [str(secret[k]).encode() for k in ("noise", "batches")]
    words += [w.tobytes() for k in ("noise", "batches") for w in noise_secret._to_words(secret[k])]
    for name in os.listdir(out):
        if os.path.isfile(os.path.join(out, name)):
            data = pathlib.Path(out, name).read_bytes()
            assert not any(w in data for w in words), name
    report = json.loads(pathlib.Path(out, "privacy_report.json").read_text())
    assert report["noise_source"] == "secret"


def test_the_noise_key_uses_every_bit_of_the_secret():
    base = noise_secret.noise_key(0)
    for bit in (0, 31, 32, 63, 64, 127):
        other = noise_secret.noise_key(1 << bit)
        assert not np.array_equal(jax.random.key_data(base), jax.random.key_data(other)), bit
    words = noise_secret._to_words(2**128 - 5)
    assert noise_secret._from_words(words) == 2**128 - 5
    # The sampler takes a 128-bit seed, and two seeds give two batch sequences.
    a, b = (PoissonSampler(1000, 0.1, seed=s, multiple=1).batch(0).indices
            for s in (2**127 + 1, 2**127 + 2))
    assert not np.array_equal(a, b)
