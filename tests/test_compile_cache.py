"""The persistent compilation cache of a run (dpjax/compile_cache.py)."""

import glob
import os
import shutil

import numpy as np

from dpjax import compile_cache
from dpjax.privacy import noise_secret
from tests.test_train_loop import _cli, _flat_state


def test_cache_dir_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("DPJAX_CACHE", str(tmp_path / "home_cache"))
    wd = str(tmp_path / "run")
    mine = compile_cache.cache_dir("workdir", wd)
    assert os.path.dirname(mine) == os.path.join(wd, "xla_cache")
    assert compile_cache.cache_dir("workdir", wd) == mine  # The key is kept.
    key_file = tmp_path / "home_cache" / compile_cache.KEY_FILE
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert os.listdir(tmp_path / "home_cache") == [compile_cache.KEY_FILE]  # No temp left.
    # Each workdir has a name of its own: one seen does not name another's.
    other_wd = compile_cache.cache_dir("workdir", str(tmp_path / "other_run"))
    assert os.path.basename(other_wd) != os.path.basename(mine)
    # Another user (another key): a workdir handed over keeps its cache out of reach.
    monkeypatch.setenv("DPJAX_CACHE", str(tmp_path / "other_home"))
    assert compile_cache.cache_dir("workdir", wd) != mine
    # An empty key file (a process killed before the key was written) gets a new key.
    (tmp_path / "other_home" / compile_cache.KEY_FILE).write_text("")
    assert compile_cache.cache_dir("workdir", wd) not in (None, mine)
    assert (tmp_path / "other_home" / compile_cache.KEY_FILE).read_text()
    # No place for a key (an unwritable home): no workdir cache, not an unkeyed one.
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("DPJAX_CACHE", str(tmp_path / "file" / "cache"))
    assert compile_cache.cache_dir("workdir", wd) is None
    monkeypatch.setenv("DPJAX_CACHE", str(tmp_path / "home_cache"))
    assert compile_cache.cache_dir("off", wd) is None
    assert compile_cache.cache_dir("", wd) is None
    assert compile_cache.cache_dir(str(tmp_path / "c"), wd) == str(tmp_path / "c")
    assert compile_cache.cache_dir("~/x", wd) == os.path.expanduser("~/x")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert compile_cache.cache_dir("workdir", wd) == str(tmp_path / "jax")
    assert compile_cache.cache_dir("off", wd) is None


def _step_entries(workdir):
    return sorted(glob.glob(os.path.join(workdir, "xla_cache", "*", "jit_step-*-cache")))


def test_fresh_run_and_resumes_share_one_cached_step_and_survive_a_corrupt_entry(
    tmp_path, monkeypatch
):
    """The step is cached in the workdir; a resume compiles the SAME program (fresh and
    restored states are both committed to the device: one entry, not two) and ends where
    an uncached run ends; a truncated entry (a kill mid-write) costs a compile, not the run."""
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    cfg = "experiments/toy_fake.py:steps=6"
    wd = str(tmp_path / "cached")
    first = _cli(wd, "--config.train.max_steps_per_run=3", config=cfg)
    assert first.returncode == 0, first.stdout + first.stderr
    entries = _step_entries(wd)
    assert len(entries) == 1, (os.listdir(wd), first.stdout, first.stderr[-3000:])
    with open(entries[0], "r+b") as f:  # A kill while JAX wrote the entry.
        f.truncate(os.path.getsize(entries[0]) // 2)
    resumed = _cli(wd, config=cfg)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _step_entries(wd) == entries

    plain = str(tmp_path / "uncached")
    os.makedirs(plain)  # The same noise secret: a replay of the cached run.
    shutil.copy(os.path.join(wd, noise_secret.SECRET_FILE), plain)
    done = _cli(plain, "--compilation_cache=off", config=cfg)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not os.path.exists(os.path.join(plain, "xla_cache"))
    for a, b in zip(_flat_state(wd), _flat_state(plain), strict=True):
        np.testing.assert_array_equal(a, b)
