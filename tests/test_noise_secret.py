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

from dpjax import export, sample, train
from dpjax.privacy import noise_secret
from dpjax.privacy.sampling import PoissonSampler
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
                        lambda: {"noise": next(drawn), "batches": 7, "created": "test"})


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
    md = (tmp_path / "c" / "privacy_report.md").read_text()
    assert "- private: not for release" in md and "from config.seed" in md
    assert "noise_secret.json; never exported" in (tmp_path / "a" / "privacy_report.md").read_text()


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
        monkeypatch.setattr(noise_secret, "_draw", lambda: {"noise": noise, "batches": batches})
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
        export.check_secret_noise({"plan": {}})
    export.check_secret_noise({"noise_source": "secret"})


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
