"""An (N, ...) array computed chunk by chunk on disk, that a killed job resumes.

Evaluation at the papers' size is long where accelerators are short: 60,000 samples
and three sets of Inception features are hours on a CPU, and more than one short
device lease on a GPU. ``fill_resumably`` writes each finished chunk into a .npy file
(a memory map) and then records how many rows are done in a small JSON file. A job
killed at any moment loses at most the chunk it was computing: the next call with the
same recipe starts at the recorded row.

Guarantees:
  * Rows [0, done) of the .npy are the values ``compute`` returned for them: the JSON
    file is replaced atomically and only after the rows it counts were flushed.
  * A different ``recipe`` or row count starts from row 0: a resumed array never mixes
    rows from two recipes. So does a different chunk size, unless the array is
    complete. The caller puts into ``recipe`` whatever
    the values depend on (an input fingerprint, a seed, a network's settings).
  * The chunks a call computes are exactly those not done: ``compute`` is called with
    (start, stop) in increasing order, each chunk once.
  * One process at a time fills a given file (an advisory lock, released by the OS
    when its holder dies): several evals sharing one cache (a sweep evaluating its
    runs at once) wait for the one computing a split's features, then reuse them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from dpjax import atomic_file, file_lock

_FORMAT = 1


def _paths(stem: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    stem = pathlib.Path(stem)
    return stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".json")


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike, log: Callable[[str], None] | None = None):
    """Holds an exclusive advisory lock on ``lock_path`` (created; never deleted, so
    that every process locks the same file), waiting for another holder if needed.
    The OS releases it when its holder dies."""
    lock_path = pathlib.Path(lock_path)
    with open(lock_path, "a") as f:
        status, error = file_lock.try_lock(f)
        if status == file_lock.UNSUPPORTED:
            message = file_lock.unsupported_message(str(lock_path.parent), error)
            if log is not None:
                log(f"[dpjax] {message}")
            else:
                warnings.warn(message, stacklevel=3)
            yield
            return
        if status == file_lock.HELD:
            if log is not None:
                log(f"[dpjax] waiting for another process to finish {lock_path.stem}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tree_digest(tree: Any) -> str:
    """A short content digest of a pytree of arrays (shapes, dtypes and bytes), for recipes.

    The one content key of dpjax's caches (sample batches: parameters and labels;
    Inception features: the images). A single array's digest is that of its shape,
    dtype and bytes; a cache written by an earlier version keyed the same way stays valid.
    """
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.shape}{a.dtype}".encode())
        # The bytes tobytes() gives, without copying a dataset (a view; memoryview
        # would refuse ml_dtypes such as bfloat16).
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    """A short digest of a file's bytes, for cache keys and recipes."""
    return atomic_file.sha256_file(path)[:16]


def _header(rows: int, chunk: int, recipe: dict) -> dict:
    # JSON round trip, so that a recipe compares equal to the one read back from disk.
    return json.loads(json.dumps({"format": _FORMAT, "rows": rows, "chunk": chunk,
                                  "recipe": recipe}, sort_keys=True))


def rows_done(stem: str | os.PathLike, rows: int, chunk: int, recipe: dict[str, Any]) -> int:
    """Rows already computed for this exact recipe (0 if none, or for another recipe)."""
    data_path, meta_path = _paths(stem)
    if not (data_path.is_file() and meta_path.is_file()):
        return 0
    try:
        meta = json.loads(meta_path.read_text())
        done = int(meta.pop("done", 0))
    except (OSError, ValueError, TypeError, AttributeError):  # Unreadable: start over.
        return 0
    expected = _header(rows, chunk, recipe)
    # The chunk only says where a partial array may resume: a complete one is valid
    # whatever chunk filled it.
    same = meta == expected or (done >= rows and {**meta, "chunk": chunk} == expected)
    if not same:
        return 0
    try:
        stored = np.load(data_path, mmap_mode="r")
    except (OSError, ValueError):
        return 0
    if stored.ndim < 1 or stored.shape[0] != rows:
        return 0
    return min(max(done, 0), rows)


def fill_resumably(
    stem: str | os.PathLike,
    rows: int,
    chunk: int,
    recipe: dict[str, Any],
    compute: Callable[[int, int], Any],
    log: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Fills ``<stem>.npy`` with ``compute(start, stop)`` chunk by chunk, resuming.

    Args:
      stem: path without suffix; ``<stem>.npy`` holds the rows and ``<stem>.json`` the
        recipe and the count of finished rows. The folder is created.
      rows: the array's length.
      chunk: rows per ``compute`` call (the last one may be shorter) and per save.
      recipe: JSON-serializable description of what the rows depend on.
      compute: ``(start, stop) -> array of stop - start rows``. The first chunk computed
        from scratch fixes the row shape and dtype; later chunks must have the same
        row shape (values are cast to the dtype).
      log: called with a progress line after each chunk, if given.

    Returns:
      The whole (rows, ...) array, in memory.

    Raises:
      ValueError: ``rows`` or ``chunk`` < 1, or ``compute`` returned the wrong number
        of rows or another row shape (nothing of that chunk is kept).
    """
    if rows < 1 or chunk < 1:
        raise ValueError(f"rows and chunk must be >= 1, got {rows} and {chunk}")
    data_path, meta_path = _paths(stem)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(data_path.with_suffix(".lock"), log):
        return _fill(stem, rows, chunk, recipe, compute, log)


def _fill(stem, rows, chunk, recipe, compute, log) -> np.ndarray:
    data_path, meta_path = _paths(stem)
    header = _header(rows, chunk, recipe)
    done = rows_done(stem, rows, chunk, recipe)
    out = None
    if done:
        out = np.load(data_path, mmap_mode="r+")
        if log is not None:
            log(f"[dpjax] resuming {data_path.name} at row {done} of {rows}")
    else:
        # Invalidate first: a crash after this leaves a header that vouches for 0 rows.
        atomic_file.write_json(meta_path, {**header, "done": 0}, sort_keys=True)
    for start in range(done, rows, chunk):
        stop = min(start + chunk, rows)
        values = np.asarray(compute(start, stop))
        if out is None:  # The first chunk fixes the row shape and dtype.
            if values.ndim < 1:
                raise ValueError(f"compute({start}, {stop}) returned a scalar")
            out = np.lib.format.open_memmap(data_path, mode="w+", dtype=values.dtype,
                                            shape=(rows, *values.shape[1:]))
        if values.shape != (stop - start, *out.shape[1:]):
            raise ValueError(f"compute({start}, {stop}) returned shape {values.shape}, "
                             f"expected {(stop - start, *out.shape[1:])}")
        out[start:stop] = values
        out.flush()
        atomic_file.write_json(meta_path, {**header, "done": stop}, sort_keys=True)
        # At most about 100 progress lines, whatever the chunk (a 50-image sampler batch
        # of 60,000 would otherwise log 1,200 times).
        if log is not None and (stop == rows or stop * 100 // rows > start * 100 // rows):
            log(f"[dpjax] {data_path.name}: {stop} of {rows} rows")
    result = np.array(out)
    del out  # Closes the memory map.
    return result
