"""JAX's persistent compilation cache for a run: compile once per program, not per process.

A DP step of the DPDM UNet compiles in 35-60 s (2-core CPU and H100 alike,
`benchmarks/results.md`), and every process of a run compiles it again: a resume after
``max_seconds_per_run``, a rerun after a kill, ``--mode=eval`` after training. With the
cache, a later process loads the compiled program from disk (the README demo's first
step: 31.7 s in a new workdir, 7.7 s on resume, 2-core CPU).

Guarantees:
* The cached program is the one XLA would compile (the key covers the program, the
  compile options, the backend and the JAX/XLA versions), so results are bit-identical
  with and without the cache (tests/test_compile_cache.py).
* An unreadable entry (e.g. a process killed while writing it) only costs a compile:
  JAX warns and compiles again; no run state lives in the cache.
* Where the cache lives: by default inside the run's workdir, never exported, in a
  folder named by a random key of the user's (``<workdir>/xla_cache/<key>``; the key is
  kept in ``~/.cache/dpjax`` or $DPJAX_CACHE), or where JAX_COMPILATION_CACHE_DIR points
  if it is set. A compiled program can embed arrays that the traced functions close over
  as constants, so a cache shared between runs should sit where the runs' private data
  may sit.
* A workdir from someone else never has its compiled programs loaded: its cache lies
  under the other user's key. Cache entries are native code, keyed by what anyone with
  the same software can compute, so without the key a run handed over with crafted
  entries would run them in ``--mode=sample/eval/export`` (untrusted-input review,
  2026-12-07). Without a usable key file (an unwritable home), the workdir cache is off.
"""

from __future__ import annotations

import hashlib
import os
import secrets

import jax

from dpjax.user_cache import default_cache_dir

#: ``--compilation_cache`` values with a meaning of their own.
IN_WORKDIR = "workdir"
OFF = "off"
#: The cache's directory name inside a workdir.
WORKDIR_CACHE_NAME = "xla_cache"
#: JAX's environment variable for the cache directory; a default the user set on purpose.
JAX_ENV = "JAX_COMPILATION_CACHE_DIR"
#: The user's key file (in ``default_cache_dir``) that names their workdir caches.
KEY_FILE = "compile_cache_key"


def user_key() -> str | None:
    """This user's cache key (created once, owner-only), or None if it cannot be kept."""
    path = default_cache_dir() / KEY_FILE
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(16))
        key = path.read_text().strip()
    except FileExistsError:  # Another process created it first: read theirs.
        key = path.read_text().strip()
    except OSError:
        return None
    return hashlib.sha256(key.encode()).hexdigest()[:16] if key else None


def cache_dir(setting: str, workdir: str) -> str | None:
    """The directory ``setting`` names: ``'workdir'`` -> ``<workdir>/xla_cache/<the
    user's key>`` (None without a key), or JAX's own JAX_COMPILATION_CACHE_DIR where the
    environment sets it; ``'off'`` or ``''`` -> None (no cache); anything else -> that
    path (user ``~`` expanded, made absolute)."""
    if setting in (OFF, ""):
        return None
    if setting == IN_WORKDIR:
        if os.environ.get(JAX_ENV):
            return os.path.abspath(os.path.expanduser(os.environ[JAX_ENV]))
        key = user_key()
        if key is None:
            return None
        return os.path.join(os.path.abspath(workdir), WORKDIR_CACHE_NAME, key)
    return os.path.abspath(os.path.expanduser(setting))


def enable(directory: str | None) -> None:
    """Keeps compiled programs in ``directory`` (None: leaves the cache off).

    JAX keeps a program there when it took at least 1 s to compile (its
    ``jax_persistent_cache_min_compile_time_secs``, which the environment variable
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS sets). Call before the process's first
    compile: JAX reads the directory when it first compiles a program.
    """
    if directory is not None:
        jax.config.update("jax_compilation_cache_dir", directory)
