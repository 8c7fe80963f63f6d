"""The secret behind a run's DP noise, Poisson batches and per-example loss draws.

DP-SGD's guarantee holds against an adversary who knows everything but the noise and
which examples the batches held. Derived from ``config.seed`` (public: it is in
``config.json``, in sweep files, 0 by default, and a guess of it can be checked against
the exported samples), both could be recomputed: the randomness review of 2026-12-07
recovered DP-MEPF's noiseless per-class sums from an export in under a second, and
decided membership by replaying DP-SGD on the two neighbouring datasets. So by default
(``dp.secret_noise=True``) they come from a secret drawn from the operating system's
CSPRNG when a run starts:

* ``WORKDIR/noise_secret.json`` (owner read/write only) holds two independent 128-bit
  values, one for the noise key and one for the sampler; the run's other randomness
  (initialization, samples, a public loss term's draws) still derives from
  ``config.seed``.
* The per-example loss draws (a diffusion loss's sigma and noise, label dropout, ...)
  come from the same secret, through a key of their own
  (``loss_key``). They are keyed by the example's dataset index (``dp_step.
  example_keys``), and under add/remove-one neighbours removing an example shifts the
  index of every later one: with draws public, each of those would get other, known
  draws, the clipped sum would move by far more than C (7.2 C over 31 examples in the
  docstring audit of 2026-12-07), and whoever knows the seed could tell the two datasets
  apart. Secret, the draws are independent of the data and of each other, so which
  index gets which leaves the output's distribution unchanged. Replace-one is no
  different: a replacement need not sit where the original did (a folder is read in
  path order, so another class or file name moves it), and the rows in between shift
  (the order audit of 2026-12-07: 7.0 C against a bound of 2C). A checkpoint without
  the record (``LOSS_SOURCE_KEY``) drew them from config.seed; it resumes so, and has
  no guarantee to export (also where its method draws nothing: the record cannot tell).
  A secret file without ``LOSS_DRAWS_FIELD`` is from before, and a run from step 0 does
  not reuse it: it would not replay its run, but put the same noise on other sums.
* A resume reads the file, so it draws the same noise and batches as an uninterrupted
  run. A run that starts from step 0 draws a new secret, so two runs never share noise
  (runs of one sweep with one seed, a workdir reused for another run), with two
  exceptions that replay one mechanism rather than make a second: a run that starts
  again from step 0 in its own workdir (its checkpoints deleted, or killed before the
  first) keeps the secret there, since setup refuses any other config or data in a
  workdir that holds a config.json, so the replay computes the same outputs again; and
  a secret copied into a workdir that holds nothing else is used, to replay the run it
  came from bit for bit (on another machine, or in the tests). Copying one secret to two
  different runs would correlate their noise: the user's to avoid.
* Nothing else reads it: export, sampling and eval never open it, and it appears in no
  log, report or checkpoint.

With ``dp.secret_noise=False`` the noise and batches derive from ``config.seed`` as
before: reproducible across workdirs (tests, seed studies), reported as such, and export
refuses the run. The checkpoint's metadata records which (``NOISE_SOURCE_KEY``):
checkpoints written before this module existed have no record and count as 'seed'.

The Gaussian draws themselves still come from JAX's threefry generator, keyed by the
secret: a generator designed after a block cipher, but not a vetted CSPRNG, and floating-
point Gaussian sampling has known weaknesses (Mironov, CCS 2012) that no DP-SGD library
in wide use defends against (README, "Privacy notes").
"""

from __future__ import annotations

import datetime
import hashlib
import os
import secrets
import stat
from typing import Any

import jax
import numpy as np

from dpjax import atomic_file, parallel

SECRET_FILE = "noise_secret.json"
SECRET_BITS = 128
NOISE_SOURCE_KEY = "noise_source"  # In checkpoint metadata and dp_plan.json.
LOSS_SOURCE_KEY = "loss_source"  # Where the per-example loss draws came from; the same.
SECRET, SEED, NONE = "secret", "seed", "none"  # The values it takes.


class NoiseSecretError(atomic_file.CorruptFileError):
    """The secret file parses but does not hold a secret (a user error: one line)."""


# What a secret file drawn since the loss draws came from the secret says of them: a run
# from step 0 replays (reuses) only such a secret (``_load_or_draw``).
LOSS_DRAWS_FIELD, LOSS_DRAWS_SECRET = "loss_draws", "from this secret"


def _draw() -> dict[str, Any]:
    return {
        "noise": secrets.randbits(SECRET_BITS),
        "batches": secrets.randbits(SECRET_BITS),
        LOSS_DRAWS_FIELD: LOSS_DRAWS_SECRET,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _read(path: str) -> dict[str, Any]:
    stored = atomic_file.read_json(path, ("noise", "batches"))
    values = (stored["noise"], stored["batches"])
    if not all(type(v) is int and 0 <= v < 2**SECRET_BITS for v in values):  # Not bool.
        raise NoiseSecretError(
            f"{path} does not hold two {SECRET_BITS}-bit integers 'noise' and 'batches': it "
            "was changed outside dpjax. Restore it, or delete it to go on with a new secret "
            "(the remaining steps then draw fresh noise and batches).")
    return stored


def load_or_create(workdir: str, resuming: bool, reuse: str = "",
                   log=print) -> tuple[int, int]:
    """The run's (noise secret, batch secret), the same on every process.

    Process 0 reads ``WORKDIR/noise_secret.json`` when ``resuming`` (a checkpoint is
    restored) or when ``reuse`` says why a run from step 0 may use the one there (it is
    logged: ``REUSE_RESTART`` or ``REUSE_PLACED``), and draws a new one otherwise, or
    when the file is missing (a resumed run says so: the remaining steps draw fresh
    noise and batches, which keeps the guarantee, as each step's randomness is
    independent of the past, but the run no longer equals an uninterrupted one). A new
    file is written atomically with mode 0600 before the first step; a file read with
    wider permissions is narrowed to 0600. Other processes receive the values by a
    broadcast: a collective, which every process reaches at the same point, also when
    process 0 fails (then every process raises).

    Raises:
      CorruptFileError: the file exists but does not parse (NoiseSecretError: it parses
        but does not hold two secrets, or process 0 failed on another process).
      OSError: process 0 cannot read, write or narrow the file.
    """
    words = np.zeros((3, SECRET_BITS // 32), np.uint32)  # noise, batches, status
    error = None
    if parallel.is_main_process():
        try:
            words[:2] = _load_or_draw(os.path.join(workdir, SECRET_FILE), resuming, reuse, log)
        except (OSError, atomic_file.CorruptFileError) as e:
            error, words[2, 0] = e, 1
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        words = np.asarray(multihost_utils.broadcast_one_to_all(words))
    if error is not None:
        raise error
    if words[2, 0]:
        raise NoiseSecretError(
            f"Process 0 could not read or write {os.path.join(workdir, SECRET_FILE)} (its "
            "log says why); every process stops with it.")
    return _from_words(words[0]), _from_words(words[1])


REUSE_RESTART = ("this run starts again from step 0 with the config and data it began "
                 "with, so it replays the noise and batches of its earlier attempt (free: "
                 "the same computation again)")
REUSE_PLACED = ("the secret was placed in a workdir where no run had started: this run "
                "replays the run it comes from (never give one secret to two different "
                "runs: their noise would be the same)")


def _load_or_draw(path: str, resuming: bool, reuse: str, log) -> np.ndarray:
    stored = _read(path) if (resuming or reuse) and os.path.exists(path) else None
    if stored is not None and not resuming and stored.get(LOSS_DRAWS_FIELD) != LOSS_DRAWS_SECRET:
        # Its run drew its loss draws from config.seed; this one draws them from the
        # secret, so with the same noise it would not replay that run but add a second,
        # different computation under the same noise (outputs of the two could be
        # differenced). A new secret makes it an independent run instead.
        log(f"[dpjax] {path} predates secret per-example loss draws, so this run cannot "
            "replay the run it came from: it draws a new secret")
        stored = None
    if stored is not None:
        if not resuming:
            log(f"[dpjax] noise secret from {path}: {reuse}")
        if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
            os.chmod(path, 0o600)  # A copy made with the umask's 0644.
    else:
        if resuming and not os.path.exists(path):
            log(f"[dpjax] {path} is missing: the remaining steps draw their noise and "
                "batches from a new secret (the guarantee holds; the run no longer "
                "replays an uninterrupted one)")
        stored = _draw()
        atomic_file.write_json(path, stored, permissions=0o600)
    return np.array([_to_words(stored["noise"]), _to_words(stored["batches"])], np.uint32)


def recorded_source(meta: dict[str, Any]) -> str:
    """Where a checkpoint's noise came from, by its metadata: 'secret', 'seed' or 'none';
    a checkpoint without the record predates the secret, so its noise is 'seed'."""
    return meta.get(NOISE_SOURCE_KEY, SEED)


def recorded_loss_source(meta: dict[str, Any]) -> str:
    """Where a checkpoint's per-example loss draws came from: 'secret' (``loss_key``),
    'seed', or 'none' without DP; a private run's checkpoint without the record predates
    secret loss draws, so its draws are 'seed'."""
    if LOSS_SOURCE_KEY in meta:
        return meta[LOSS_SOURCE_KEY]
    return NONE if meta.get(NOISE_SOURCE_KEY) == NONE else SEED


def public_loss_draws_void(loss_source: str | None, mechanism: str) -> bool:
    """True where loss draws from config.seed leave no guarantee (module docstring): any
    DP-SGD steps, under either relation. (A one-release plan draws none.)"""
    return loss_source == SEED and mechanism != "release"


def public_randomness(record: dict[str, Any], mechanism: str) -> str | None:
    """What of a private run's randomness came from config.seed, by its record (checkpoint
    metadata, or the extra fields of its dp_plan.json): 'noise and batches', 'per-example
    loss draws' (``public_loss_draws_void``), or None where none did. Either leaves the
    run no guarantee to publish."""
    if recorded_source(record) != SECRET:
        return "noise and batches"
    if public_loss_draws_void(recorded_loss_source(record), mechanism):
        return "per-example loss draws"
    return None


def loss_key(secret: int) -> jax.Array:
    """The JAX key of a private run's per-example loss draws, from its noise secret.

    The key is ``noise_key`` of SHA-256(label, secret), not a ``fold_in`` of the noise
    key: no chain of ``fold_in`` calls from one key reaches the other, so the loss draws
    and the noise are independent (as much as two threefry keys are)."""
    digest = hashlib.sha256(_LOSS_LABEL + secret.to_bytes(SECRET_BITS // 8, "little")).digest()
    return noise_key(int.from_bytes(digest[: SECRET_BITS // 8], "little"))


_LOSS_LABEL = b"dpjax: per-example loss draws\0"


def noise_key(secret: int) -> jax.Array:
    """A JAX key that depends on all ``SECRET_BITS`` bits of ``secret``.

    ``jax.random.key`` keeps 32 bits of an integer seed; the other words are folded in.
    (threefry's key state is 64 bits, so distinct secrets can share a key, with
    probability 2^-64 per pair.)"""
    words = _to_words(secret)
    key = jax.random.key(int(words[0]))
    for word in words[1:]:
        key = jax.random.fold_in(key, int(word))
    return key


def _to_words(value: int) -> np.ndarray:
    return np.array([(value >> (32 * i)) & 0xFFFFFFFF for i in range(SECRET_BITS // 32)],
                    np.uint32)


def _from_words(words: np.ndarray) -> int:
    return sum(int(w) << (32 * i) for i, w in enumerate(words))
