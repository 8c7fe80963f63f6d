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
* Where the cache lives: by default inside the run's workdir (``<workdir>/xla_cache``,
  never exported), or where JAX_COMPILATION_CACHE_DIR points if it is set. A compiled
  program can embed arrays that the traced functions close over as constants, so a
  cache shared between runs should sit where the runs' private data may sit.
"""

from __future__ import annotations

import os

import jax

#: ``--compilation_cache`` values with a meaning of their own.
IN_WORKDIR = "workdir"
OFF = "off"
#: The cache's directory name inside a workdir.
WORKDIR_CACHE_NAME = "xla_cache"
#: JAX's environment variable for the cache directory; a default the user set on purpose.
JAX_ENV = "JAX_COMPILATION_CACHE_DIR"


def cache_dir(setting: str, workdir: str) -> str | None:
    """The directory ``setting`` names: ``'workdir'`` -> ``<workdir>/xla_cache``, or
    JAX's own JAX_COMPILATION_CACHE_DIR where the environment sets it; ``'off'`` or
    ``''`` -> None (no cache); anything else -> that path (user ``~`` expanded, made
    absolute)."""
    if setting in (OFF, ""):
        return None
    if setting == IN_WORKDIR:
        if os.environ.get(JAX_ENV):
            return os.path.abspath(os.path.expanduser(os.environ[JAX_ENV]))
        return os.path.join(os.path.abspath(workdir), WORKDIR_CACHE_NAME)
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
