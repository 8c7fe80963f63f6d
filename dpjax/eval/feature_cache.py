"""Inception features and FID statistics of image sets, computed once and kept.

Sixty thousand images through Inception are hours on a CPU and more than one short
device lease, and the same features serve FID and the memorization report, so they are
computed once: ``cached_features`` keeps a set's features in a resumable array
(``dpjax.eval.resumable_array``), ``reference_features`` and ``reference_stats`` keep a
dataset split's features and statistics under the cache dir.

Guarantees:
  * Features are reused only for the same image content (a digest of the bytes), batch
    size, backend and network settings (weights by content, precision, quantization):
    anything else recomputes, so a resumed file never mixes rows computed two ways.
  * Statistics are reused for the same image content and network settings, whatever
    the batch size and backend: those change features at float rounding level at most
    (on the development CPU, features at batch 8, 20 and 200 are bit-identical; a GPU
    may pick other convolution algorithms per shape), far below FID's resolution, while
    a split's features are hours on a CPU.
  * The recipe written next to the features is a stable key: changing what goes into
    it throws away every cached feature file, so tests pin it.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.eval import fid, resumable_array
from dpjax.eval.inception_weights import default_cache_dir, save_cache_npz
from dpjax.eval.resumable_array import tree_digest

# What the features are: part of every cache key.
_NETWORK = "inception-2015-12-05-pool3"


# inception_features' settings and their defaults (tests check that they agree).
_FEATURE_DEFAULTS = {"params": None, "weights_path": None, "cache_dir": None,
                     "quantize": True, "precision": "highest"}


def network_settings(feature_kwargs: dict[str, Any]) -> dict[str, str | None]:
    """What a feature means: the network, the resize and ``inception_features``' settings
    (defaults filled in, caller-supplied weights by content), as JSON-ready strings.

    Weights given as a file (``weights_path``) count by their bytes, not their path: a
    file replaced in place (another conversion, a truncated copy) recomputes, and the
    same file under two paths shares its cache. A path that is not a file stays a path
    (loading it then fails with its own message).
    """
    # Defaults filled in, so that leaving a setting out and passing its default agree.
    settings = {**_FEATURE_DEFAULTS, **feature_kwargs}
    if settings["params"] is not None:
        settings["params"] = tree_digest(settings["params"])
    weights = settings["weights_path"]
    if weights is not None and os.path.isfile(os.path.expanduser(weights)):
        settings["weights_path"] = "sha256:" + resumable_array.file_digest(
            os.path.expanduser(weights)
        )
    return {"network": _NETWORK, "resize": "nv_bilinear_float",
            **{k: None if v is None else str(v) for k, v in sorted(settings.items())}}


def cached_features(
    stem: str | os.PathLike,
    images: Any,
    batch_size: int = 200,
    *,
    chunk_images: int = 2000,
    log: Callable[[str], None] | None = None,
    **feature_kwargs: Any,
) -> np.ndarray:
    """``fid.inception_features(images)``, kept at ``<stem>.npy`` and resumed if killed.

    Features are computed about ``chunk_images`` images at a time and saved after
    each chunk (``dpjax.eval.resumable_array``), so a 60k-image set survives the end of a
    short device lease or of a CPU session. The saved rows are only reused for the same
    images (content fingerprint), batch size, backend and ``feature_kwargs``. If the
    folder cannot be written (a read-only cache), the features are computed in memory
    with a warning.

    Args:
      stem: file path without suffix (``.npy`` and ``.json`` are written).
      images: as for ``inception_features`` (host or device array).
      batch_size: see ``inception_features``; every network call has this many images
        (a short last chunk is padded), so the network compiles once.
      chunk_images: images per saved chunk, rounded down to whole batches (at least
        one batch): what a kill can lose.
      log: progress lines, if given.
      **feature_kwargs: passed to ``inception_features``.

    Returns:
      (N, D) float32 features, equal to ``fid.inception_features(images, batch_size, ...)``.
    """
    recipe = {
        "fingerprint": tree_digest(images),
        "batch_size": batch_size,
        "backend": jax.default_backend(),
        **network_settings(feature_kwargs),
    }
    n = len(images)

    def compute(start: int, stop: int) -> np.ndarray:
        x = images[start:stop]
        if stop - start < batch_size <= n:  # Pad with real rows: the one compiled shape.
            xp = jnp if isinstance(x, jax.Array) else np
            x = xp.concatenate([x, images[: batch_size - (stop - start)]])
        return fid.inception_features(x, batch_size, **feature_kwargs)[: stop - start]

    try:  # Can the files be written at all? (A read-only cache is not an error.)
        pathlib.Path(stem).parent.mkdir(parents=True, exist_ok=True)
        open(f"{stem}.lock", "a").close()
    except OSError as e:
        warnings.warn(f"Cannot keep Inception features at {stem}.npy ({e}); computing "
                      "them in memory, without resuming.", stacklevel=2)
        return fid.inception_features(images, batch_size, **feature_kwargs)
    return resumable_array.fill_resumably(
        stem, n, batch_size * max(1, chunk_images // batch_size), recipe, compute, log=log)


_NAME_CHARS = "A-Za-z0-9_.+-"  # A cache name is a file name: no separators.


def _check_name(name: str) -> str:
    if not re.fullmatch(f"[A-Za-z0-9][{_NAME_CHARS}]*", name):
        raise ValueError(f"reference name {name!r}: use letters, digits and _.+-")
    return name


def name_part(text: str) -> str:
    """``text`` with every character a cache name may not hold replaced by '_' (a TFDS
    builder config or version: 'emnist/letters', 'celeb_a:2.1.0'); two datasets that
    then share a name are told apart by the cache's content fingerprint."""
    return re.sub(f"[^{_NAME_CHARS}]", "_", text)


def reference_features(
    name: str,
    images: Any,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 200,
    log: Callable[[str], None] | None = None,
    **feature_kwargs: Any,
) -> np.ndarray:
    """Inception features of a dataset split, computed once (resumably) and cached.

    The file is ``<cache_dir>/fid_features/<name>.npy`` (60k x 2048 float32 is 0.5 GB);
    ``reference_stats`` and the memorization report share it, so each split goes
    through the network once. Reused only for the same image content and settings.
    """
    stem = default_cache_dir(cache_dir) / "fid_features" / _check_name(name)
    return cached_features(stem, images, batch_size, log=log, **feature_kwargs)


def reference_stats(
    name: str,
    images: Any = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 200,
    log: Callable[[str], None] | None = None,
    **feature_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Feature statistics of a dataset split, computed once and cached.

    Args:
      name: key such as 'fashion_mnist-train'; the file is
        ``<cache_dir>/fid_stats/<name>.npz``.
      images: the split's images (an array, or a zero-argument callable that loads
        them, only called on a cache miss); None uses the cache only. An ARRAY whose
        content differs from the images the cache was computed on (a smoke-test subset,
        another preprocessing), or other network settings, trigger a recomputation;
        another batch size or backend does not (module docstring). A callable or None
        is not loaded to be compared: the cache is then trusted by ``name`` alone, so
        give a name that says the dataset, split, preparation and size.
      cache_dir: default $DPJAX_CACHE or ~/.cache/dpjax.
      batch_size: see ``inception_features``.
      log: progress lines while features are computed, if given.
      **feature_kwargs: passed to ``inception_features``.

    Returns:
      (mu, sigma) in float64. On a cache miss the features themselves are kept too
      (``reference_features``), and computing them resumes where a killed job stopped.
    """
    path = default_cache_dir(cache_dir) / "fid_stats" / f"{_check_name(name)}.npz"
    fingerprint = None if images is None or callable(images) else tree_digest(images)
    settings = json.dumps(network_settings(feature_kwargs), sort_keys=True)
    if path.is_file():
        with np.load(path) as f:
            stats = f["mu"], f["sigma"]
            cached_fp = str(f["fingerprint"]) if "fingerprint" in f.files else None
            # Files from before settings were stored were computed with the defaults.
            cached_settings = (str(f["settings"]) if "settings" in f.files
                               else json.dumps(network_settings({}), sort_keys=True))
        same_images = fingerprint is None or fingerprint == cached_fp
        if same_images and settings == cached_settings:
            return stats
        what = "other images" if not same_images else "other network settings"
        if images is None:
            raise FileNotFoundError(f"{path} was computed with {what}; pass the images")
        warnings.warn(f"{path} was computed with {what}; recomputing", stacklevel=2)
    elif images is None:
        raise FileNotFoundError(f"no cached FID statistics {path}; pass the images")
    if callable(images):
        images = images()
        fingerprint = tree_digest(images)
    feats = reference_features(name, images, cache_dir=cache_dir, batch_size=batch_size,
                               log=log, **feature_kwargs)
    mu, sigma = fid.compute_stats(feats)
    save_cache_npz(path, {
        "mu": mu, "sigma": sigma, "num_images": np.int64(len(images)),
        "fingerprint": np.str_(fingerprint), "settings": np.str_(settings),
        "resize": np.str_("nv_bilinear_float")})
    return mu, sigma
