"""Files replaced whole or not at all: write next to the target, sync, rename.

Every file that a later run reads back to decide something (``dp_plan.json``,
``config.json``, ``data_spec.json``, a resumable array's row count, ``eval.json``,
``samples.npz``, cached FID statistics) is written through this module, so that a job
killed at any moment leaves either the old file or the new one, never a truncated one.

Guarantees of ``atomic_write`` (and of the helpers built on it):
  * On a normal exit the target holds exactly what was written; the data was flushed
    and fsync'ed before the rename, so a crash of the machine right after does not
    leave an empty file under the new name.
  * On an exception the target is untouched and the temporary file is removed. A
    kill leaves the target untouched too, and the temporary behind as a hidden
    ``.<name>.<pid>.<random>.tmp`` next to it, which nothing reads.
  * The temporary name is unique per call, so two processes writing the same target
    do not write into one temporary file; the last rename wins.
  * The new file gets the usual permissions (0o666 minus the umask), like ``open``
    (``tempfile.mkstemp``, used before, gave 0o600: ``dp_plan.json`` and the cache
    headers were readable by their owner only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping
from typing import IO, Any

import numpy as np


def _temporary_name(name: str) -> str:
    return f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def is_leftover(filename: str, target: str) -> bool:
    """Whether ``filename`` (a bare name) is the temporary that a killed write of
    ``target`` (a bare name) left behind: ``.<target>.<pid>.<random>.tmp``."""
    return filename.startswith(f".{target}.") and filename.endswith(".tmp")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w",
                 permissions: int = 0o666) -> Iterator[IO[Any]]:
    """Yields a file to write; it replaces ``path`` only when the block exits cleanly.

    Args:
      path: the target; its folder must exist.
      mode: 'w' (text) or 'wb' (bytes).
      permissions: the new file's mode before the umask (0o600 for a secret: the file
        never exists with wider permissions, not even as the temporary).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, _temporary_name(name))
    # os.open with 0o666 applies the umask, as a plain open() of the target would.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, permissions)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str, permissions: int = 0o666) -> None:
    """Replaces ``path`` with ``text``, atomically (``permissions``: see atomic_write)."""
    with atomic_write(path, permissions=permissions) as f:
        f.write(text)


def json_safe(x: Any) -> Any:
    """``x`` (JSON-like; NumPy and JAX scalars and arrays allowed) in the form dpjax's
    JSON files take: every number a finite Python number, every non-finite float the
    string 'inf', '-inf' or 'nan' (bare Infinity / NaN tokens are not JSON, and strict
    parsers, JavaScript's among them, reject the whole file)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else str(float(x))
    if hasattr(x, "__array__") and not isinstance(x, str):  # A JAX array.
        return json_safe(np.asarray(x))
    return x


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes (read in 4 MiB pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: str | os.PathLike, obj: Any, permissions: int = 0o666,
               **dump_kwargs: Any) -> None:
    """Replaces ``path`` with ``json.dump(obj, **dump_kwargs)``, atomically.

    The object is serialized before the file is opened, so an object that JSON cannot
    encode raises without touching anything.
    """
    write_text(path, json.dumps(obj, **dump_kwargs), permissions)


def write_npz(path: str | os.PathLike, arrays: Mapping[str, Any],
              compressed: bool = False) -> None:
    """Replaces ``path`` with an .npz of ``arrays`` (zip-compressed if asked), atomically."""
    with atomic_write(path, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)


class CorruptFileError(ValueError):
    """A file that a run reads back does not parse (edited by hand, or damaged)."""


def read_json(path: str | os.PathLike, keys: tuple[str, ...] = ()) -> Any:
    """The JSON object in ``path``, which must hold the top-level ``keys``.

    Raises:
      FileNotFoundError: the file is missing.
      CorruptFileError: it is not valid JSON, not an object, or lacks one of ``keys``;
        the message names the file and says what to do (the file is left as it is).
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        obj = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError.
        raise CorruptFileError(
            f"{path} is not valid JSON ({e}); dpjax writes it whole or not at all, so it was "
            "damaged or changed outside dpjax. Restore it from a backup, or start a new --workdir."
        ) from None
    if not isinstance(obj, dict):
        raise CorruptFileError(
            f"{path} holds a {type(obj).__name__}, not a JSON object: it was damaged or "
            "changed outside dpjax. Restore it from a backup, or start a new --workdir."
        )
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CorruptFileError(
            f"{path} lacks {missing}: it was changed outside dpjax. Restore it from a "
            "backup, or start a new --workdir."
        )
    return obj

