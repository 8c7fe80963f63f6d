"""Where dpjax keeps per-user files between runs: ``$DPJAX_CACHE``, else ``~/.cache/dpjax``.

FID weights and statistics (``dpjax/eval``) and the compilation cache's key
(``compile_cache``) live there. Nothing of a run's private data is kept here by dpjax
itself, except FID statistics the user asks to cache for a dataset they name.
"""

from __future__ import annotations

import os
import pathlib

#: The environment variable that moves the cache directory.
CACHE_ENV = "DPJAX_CACHE"


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """``cache_dir``, else $DPJAX_CACHE, else ~/.cache/dpjax."""
    return pathlib.Path(cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/dpjax").expanduser()
