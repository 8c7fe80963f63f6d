"""Advisory file locks (flock), and filesystems that do not support them.

dpjax locks a workdir while training it and a cache file while filling it, so that two
processes never write the same files. Some cluster filesystems refuse flock outright
(Lustre mounted without ``-o flock``, NFS mounted with ``nolock``): that is not another
process holding the lock, and must not be reported as one.
"""

from __future__ import annotations

import errno
import fcntl
from typing import IO

LOCKED, HELD, UNSUPPORTED = "locked", "held", "unsupported"
# What flock raises where the filesystem has no locks (ENOTSUP is EOPNOTSUPP on Linux).
_NO_LOCKS = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP})


def try_lock(f: IO) -> tuple[str, OSError | None]:
    """Tries to take an exclusive lock on open file ``f`` without waiting.

    Returns:
      (LOCKED, None) once held; (HELD, None) if another process holds it; (UNSUPPORTED,
      the error) if the filesystem does not support locks.

    Raises:
      OSError: any other failure of flock.
    """
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return HELD, None
    except OSError as e:
        if e.errno in _NO_LOCKS:
            return UNSUPPORTED, e
        raise
    return LOCKED, None


def unsupported_message(path: str, error: OSError) -> str:
    """The one line that says a lock could not be taken because of the filesystem."""
    return (f"the filesystem of {path} does not support file locks ({error.strerror or error}); "
            "dpjax goes on without the lock, so make sure that no other process writes there "
            "at the same time (or mount it with locks, e.g. Lustre's -o flock).")
