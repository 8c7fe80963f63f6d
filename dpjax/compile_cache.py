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
  folder whose name is an HMAC of the workdir's real path under a random key of the
  user's (``<workdir>/xla_cache/<name>``; the key is kept in ``~/.cache/dpjax`` or
  $DPJAX_CACHE), or where JAX_COMPILATION_CACHE_DIR points if it is set. A compiled
  program can embed arrays that the traced functions close over as constants, so a
  cache shared between runs should sit where the runs' private data may sit.
* A workdir from someone else never has its compiled programs loaded: cache entries
  are native code, keyed by what anyone with the same software can compute, so a run
  handed over with crafted entries would run them in ``--mode=sample/eval/export``
  (untrusted-input review, 2026-12-07). The folder name, which only the key makes, is
  another for every workdir: seeing one of the user's workdirs does not give it. Without
  a usable key file (an unwritable home, another user's file) the workdir cache is off
  (``cache_dir`` returns None; main says so), and a workdir moved elsewhere compiles again.
"""

from __future__ import annotations

import hashlib
import hmac
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


def user_key() -> bytes | None:
    """This user's random cache key (made once, owner-only), or None if none can be kept.

    Written whole or not at all (a temporary file linked into place), so a process killed
    meanwhile or one starting at the same moment never sees a partial key."""
    path = default_cache_dir() / KEY_FILE
    try:
        key = path.read_text().strip() if path.exists() else ""
        if not key:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            try:
                if path.exists():  # An empty file left by a killed process: replaced.
                    os.replace(tmp, path)
                else:
                    os.link(tmp, path)  # Fails if another process made one meanwhile.
            except FileExistsError:
                pass
            finally:
                if tmp.exists():
                    tmp.unlink()
            key = path.read_text().strip()
    except OSError:
        return None
    return key.encode() if key else None


def cache_dir(setting: str, workdir: str) -> str | None:
    """The directory ``setting`` names: ``'workdir'`` -> ``<workdir>/xla_cache/<HMAC of
    the workdir's real path under the user's key>`` (None without a key), or JAX's own
    JAX_COMPILATION_CACHE_DIR where the environment sets it; ``'off'`` or ``''`` -> None
    (no cache); anything else -> that path (user ``~`` expanded, made absolute)."""
    if setting in (OFF, ""):
        return None
    if setting == IN_WORKDIR:
        if os.environ.get(JAX_ENV):
            return os.path.abspath(os.path.expanduser(os.environ[JAX_ENV]))
        key = user_key()
        if key is None:
            return None
        workdir = os.path.abspath(workdir)
        name = hmac.new(key, os.path.realpath(workdir).encode(), hashlib.sha256).hexdigest()
        return os.path.join(workdir, WORKDIR_CACHE_NAME, name[:32])
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
