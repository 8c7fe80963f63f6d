"""Nearest training images of generated samples: does the generator copy its data?

For every sample we find its nearest training images by Euclidean (L2) distance, either
in pixel space or in a feature space given as a function (the Inception pool3 features
of ``dpjax.eval.fid``, passed in by the caller so this module does not depend on it).

Distances. Pixel space uses images mapped to float32 [-1, 1] (uint8 ``u`` becomes
``u / 127.5 - 1``; float inputs must already be in [-1, 1]) and flattened, so the
distance of two uint8 images is ``||u - v||_2 / 127.5``. Feature space uses
``features_fn(images)`` as returned, on float32.

Scale. Neither the N x M distance matrix nor a full row of it is ever materialized:
queries are processed in chunks of ``query_chunk`` and, for each, a jitted scan over
reference chunks of ``reference_chunk`` keeps a running top-k, using
``||a||^2 - 2 a.b + ||b||^2`` on mean-centred vectors with the matmul at HIGHEST
precision (no TF32/bf16 on GPUs). The references (e.g. 60k x 3072 float32 = 0.7 GiB
for CIFAR-10) live on the device for the whole search. The best k + 8 candidates are
then re-ranked by distances recomputed directly as ``||a - b||``, so returned
distances are exact up to float32 rounding of the difference (an exact copy gives 0.0,
not the ~1e-2 that cancellation in the expanded form can give), and a true neighbour
is missed only if 8 others tie with it within float32 error of the expanded form.

Memorization scores (``memorization_summary``):
  * the ratio test (Yoon et al., 2023; Gu et al., 2023): a sample is flagged as a
    likely copy if ``d(x, NN1) < ratio_threshold * d(x, NN2)`` (default 1/3), i.e. it
    is far closer to one training image than to any other;
  * the fraction of samples whose nearest-neighbour distance is below the
    ``train_quantile`` quantile of leave-one-out train-to-train nearest-neighbour
    distances. For samples drawn from the data distribution itself (a generator that
    generalizes perfectly) this fraction is about ``train_quantile`` (held-out and
    leave-one-out nearest-neighbour distances are almost exchangeable); a much larger
    value means samples sit closer to training images than real data does.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dpjax.eval.downstream import _as_nhwc

FeaturesFn = Callable[[np.ndarray], Any]  # images (B, H, W, C) -> features (B, D)

# Candidates kept per query beyond k, re-ranked by exact distances (guards the ranking
# against near ties that float32 cancellation could swap).
_EXTRA_CANDIDATES = 8


def _check_images(images: np.ndarray | jax.Array, name: str) -> np.ndarray:
    """Returns NHWC host images, uint8 or float32 in [-1, 1]; raises ValueError otherwise."""
    with warnings.catch_warnings():
        # The [0, 1]-range warning is about classifier inputs; distances do not care.
        warnings.simplefilter("ignore", UserWarning)
        return _as_nhwc(images, name)


def embed(
    images: np.ndarray | jax.Array,
    features_fn: FeaturesFn | None = None,
    *,
    batch_size: int = 1000,
) -> np.ndarray:
    """Vectors the neighbour search compares: flattened pixels in [-1, 1], or features.

    Args:
      images: (N, H, W, C) uint8 or float in [-1, 1].
      features_fn: None for pixel space; else called on consecutive slices of at most
        ``batch_size`` images, unchanged (same dtype and range as given), and must
        return (B, D) features.
      batch_size: slice size for ``features_fn``.

    Returns:
      float32 host array (N, D).
    """
    images = _check_images(images, "images")
    if features_fn is None:
        flat = images.reshape(images.shape[0], -1)
        if flat.dtype == np.uint8:
            return flat.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        return flat
    parts = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size]
        feats = np.asarray(features_fn(chunk), dtype=np.float32)
        if feats.ndim != 2 or feats.shape[0] != chunk.shape[0]:
            raise ValueError(f"features_fn returned {feats.shape} for {chunk.shape[0]} images.")
        parts.append(feats)
    return np.concatenate(parts)


@functools.partial(jax.jit, static_argnames=("k", "candidates"))
def _knn_chunk(q, exclude, refs, ref_sq, ref_valid, *, k, candidates):
    """k nearest references of each query row; refs are (num_chunks, chunk, D).

    The scan keeps the best ``candidates`` (>= k) by the expanded form; their distances
    are then recomputed directly and the best k of those are returned.
    """
    num_chunks, chunk, dim = refs.shape
    q_sq = jnp.sum(q * q, axis=-1)

    def body(carry, xs):
        best_d2, best_i = carry
        r, r_sq, valid, start = xs
        cross = jnp.dot(q, r.T, precision=jax.lax.Precision.HIGHEST)
        d2 = jnp.maximum(q_sq[:, None] - 2.0 * cross + r_sq[None, :], 0.0)
        gidx = start + jnp.arange(chunk, dtype=jnp.int32)
        bad = ~valid[None, :] | (gidx[None, :] == exclude[:, None])
        d2 = jnp.where(bad, jnp.inf, d2)
        all_d2 = jnp.concatenate([best_d2, d2], axis=1)
        all_i = jnp.concatenate([best_i, jnp.broadcast_to(gidx, d2.shape)], axis=1)
        neg, pos = jax.lax.top_k(-all_d2, candidates)
        return (-neg, jnp.take_along_axis(all_i, pos, axis=1)), None

    shape = (q.shape[0], candidates)
    init = (jnp.full(shape, jnp.inf), jnp.full(shape, -1, jnp.int32))
    starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk
    (approx, idx), _ = jax.lax.scan(body, init, (refs, ref_sq, ref_valid, starts))
    # Exact distances of the candidates, then re-rank. Candidates the scan marked inf
    # (excluded, padding, or never filled) stay inf.
    cand = refs.reshape(-1, dim)[jnp.maximum(idx, 0)]
    exact = jnp.sum(jnp.square(q[:, None, :] - cand), axis=-1)
    exact = jnp.where(jnp.isinf(approx) | (idx < 0), jnp.inf, exact)
    order = jnp.argsort(exact, axis=1)[:, :k]
    return jnp.take_along_axis(idx, order, axis=1), jnp.sqrt(jnp.take_along_axis(exact, order, 1))


def nearest_neighbors(
    queries: np.ndarray,
    references: np.ndarray,
    *,
    k: int = 1,
    exclude: np.ndarray | None = None,
    query_chunk: int = 1024,
    reference_chunk: int = 8192,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest reference vectors (L2) of every query vector, in chunks.

    Peak device memory is the references plus O(query_chunk * reference_chunk); the
    full distance matrix never exists. Results do not depend on the chunk sizes (up to
    the order of exact ties).

    Args:
      queries: (N, D) array.
      references: (M, D) array, M >= k (after exclusion).
      k: neighbours per query.
      exclude: optional (N,) int array; reference ``exclude[i]`` is never a neighbour of
        query i (leave-one-out when queries are references; -1 excludes nothing).
      query_chunk: queries per jitted call.
      reference_chunk: references per scan step.

    Returns:
      ``(indices, distances)``: int64 (N, k) and float32 (N, k) host arrays, sorted by
      increasing distance per row.
    """
    queries = np.asarray(queries, np.float32)
    references = np.asarray(references, np.float32)
    if queries.ndim != 2 or references.ndim != 2 or queries.shape[1] != references.shape[1]:
        raise ValueError(f"need (N, D) and (M, D) arrays, got {queries.shape}, {references.shape}.")
    n, m = queries.shape[0], references.shape[0]
    if not 1 <= k <= m - (exclude is not None):
        raise ValueError(f"k={k} neighbours requested among {m} references.")
    exclude = np.full(n, -1, np.int32) if exclude is None else np.asarray(exclude, np.int32)
    if exclude.shape != (n,):
        raise ValueError(f"exclude must have shape ({n},), got {exclude.shape}.")

    # Distances are translation invariant; centering on the reference mean shrinks the
    # norms and with them the float32 cancellation in ||a||^2 - 2ab + ||b||^2 (pixels
    # near 255, non-negative features).
    center = references.mean(axis=0, dtype=np.float64).astype(np.float32)
    queries, references = queries - center, references - center
    candidates = min(k + _EXTRA_CANDIDATES, m)
    rc = min(reference_chunk, m)
    num_chunks = -(-m // rc)
    refs = np.zeros((num_chunks * rc, references.shape[1]), np.float32)
    refs[:m] = references
    valid = np.arange(num_chunks * rc) < m
    refs_dev = jnp.asarray(refs.reshape(num_chunks, rc, -1))
    ref_sq = jnp.sum(refs_dev * refs_dev, axis=-1)
    valid_dev = jnp.asarray(valid.reshape(num_chunks, rc))

    qc = min(query_chunk, n)
    indices = np.empty((n, k), np.int64)
    distances = np.empty((n, k), np.float32)
    for start in range(0, n, qc):
        stop = min(start + qc, n)
        q = np.zeros((qc, queries.shape[1]), np.float32)  # static shape: no recompiles
        q[: stop - start] = queries[start:stop]
        ex = np.full(qc, -1, np.int32)
        ex[: stop - start] = exclude[start:stop]
        idx, dist = _knn_chunk(jnp.asarray(q), jnp.asarray(ex), refs_dev, ref_sq, valid_dev, k=k,
                                candidates=candidates)
        indices[start:stop] = np.asarray(idx)[: stop - start]
        distances[start:stop] = np.asarray(dist)[: stop - start]
    return indices, distances


def find_nearest(
    samples: np.ndarray | jax.Array,
    train: np.ndarray | jax.Array,
    *,
    features_fn: FeaturesFn | None = None,
    k: int = 2,
    query_chunk: int = 1024,
    reference_chunk: int = 8192,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest training images of every sample, in pixel space or ``features_fn`` space.

    Returns ``(indices, distances)`` of shape (N, k), sorted by distance; ``indices``
    index ``train``. k=2 is what the ratio test of ``memorization_summary`` needs.
    """
    return nearest_neighbors(
        embed(samples, features_fn), embed(train, features_fn), k=k,
        query_chunk=query_chunk, reference_chunk=reference_chunk,
    )


def train_nn_distances(
    train_vectors: np.ndarray,
    *,
    num_queries: int | None = 5000,
    seed: int = 0,
    **chunks: int,
) -> np.ndarray:
    """Leave-one-out nearest-neighbour distances of (a random subset of) training vectors.

    Each chosen training vector is compared with all others (itself excluded by index;
    genuine duplicates in the training set still count, at distance 0). ``num_queries``
    random training points (None: all) keep the cost at num_queries x M.
    """
    m = train_vectors.shape[0]
    chosen = np.arange(m)
    if num_queries is not None and num_queries < m:
        chosen = np.sort(np.random.default_rng(seed).choice(m, num_queries, replace=False))
    _, dist = nearest_neighbors(train_vectors[chosen], train_vectors, k=1, exclude=chosen,
                                **chunks)
    return dist[:, 0]


def memorization_summary(
    distances: np.ndarray,
    train_nn: np.ndarray | None = None,
    *,
    ratio_threshold: float = 1.0 / 3.0,
    train_quantile: float = 0.05,
    exact_atol: float = 1e-6,
) -> dict[str, float | int]:
    """Scalar memorization statistics from sample-to-train neighbour distances.

    Args:
      distances: (N, k) sorted distances from ``find_nearest``; k >= 2 for the ratio test.
      train_nn: optional leave-one-out train-to-train distances (``train_nn_distances``).
      ratio_threshold: the ratio test flags ``d1 < ratio_threshold * d2`` (or d1 == 0).
      train_quantile: quantile of ``train_nn`` used as the "closer than real data" cut.
      exact_atol: distances at or below this count as exact copies.

    Returns:
      dict with ``num_samples``, ``nn_distance_{min,median,mean}``,
      ``fraction_exact_copies``; with k >= 2 ``ratio_threshold`` and
      ``fraction_ratio_test`` (flagged samples); with ``train_nn``
      ``train_nn_distance_median``, ``train_quantile``, ``train_quantile_distance``,
      ``fraction_below_train_quantile`` (about ``train_quantile`` when samples are as
      far from the training set as real data) and ``median_ratio_to_train``.
    """
    distances = np.asarray(distances, np.float64)
    if distances.ndim == 1:
        distances = distances[:, None]
    d1 = distances[:, 0]
    out = {
        "num_samples": int(d1.size),
        "nn_distance_min": float(d1.min()),
        "nn_distance_median": float(np.median(d1)),
        "nn_distance_mean": float(d1.mean()),
        "fraction_exact_copies": float(np.mean(d1 <= exact_atol)),
    }
    if distances.shape[1] >= 2:
        flagged = (d1 < ratio_threshold * distances[:, 1]) | (d1 <= exact_atol)
        out.update(ratio_threshold=float(ratio_threshold),
                   fraction_ratio_test=float(np.mean(flagged)))
    if train_nn is not None:
        train_nn = np.asarray(train_nn, np.float64)
        cut = float(np.quantile(train_nn, train_quantile))
        median = float(np.median(train_nn))
        out.update(
            train_nn_distance_median=median,
            train_quantile=float(train_quantile),
            train_quantile_distance=cut,
            fraction_below_train_quantile=float(np.mean(d1 < cut)),
            median_ratio_to_train=float(np.median(d1) / median) if median > 0 else float("inf"),
        )
    return out


def _to_uint8_rgb(images: np.ndarray) -> np.ndarray:
    if images.dtype != np.uint8:
        images = np.clip(np.round((images.astype(np.float32) + 1.0) * 127.5), 0, 255)
        images = images.astype(np.uint8)
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def closest_pairs_image(
    samples: np.ndarray | jax.Array,
    train: np.ndarray | jax.Array,
    idx: np.ndarray,
    dist: np.ndarray,
    path: str | os.PathLike[str],
    *,
    k: int = 16,
    scale: int | None = None,
    pad: int = 4,
    label_width: int = 160,
) -> str:
    """Writes a PNG of the k samples closest to the training set, next to their neighbours.

    Row r (ordered by increasing nearest-neighbour distance) shows the sample, its
    nearest training image ``train[idx[i, 0]]`` and the text "d=<distance>" with both
    indices. With ``n = min(k, len(samples))`` and images of H x W, upscaled by
    ``s = scale or max(1, 64 // H)``, the PNG is RGB of width
    ``3 * pad + 2 * W * s + label_width`` and height ``pad + n * (H * s + pad)``.

    Returns:
      The path written, as a string.
    """
    samples = _to_uint8_rgb(_check_images(samples, "samples"))
    train = _to_uint8_rgb(_check_images(train, "train"))
    idx = np.asarray(idx).reshape(len(samples), -1)[:, 0]
    d1 = np.asarray(dist, np.float64).reshape(len(samples), -1)[:, 0]
    h, w = samples.shape[1:3]
    if train.shape[1:] != samples.shape[1:]:
        raise ValueError(f"samples {samples.shape[1:]} and train {train.shape[1:]} differ.")
    s = scale or max(1, 64 // h)
    order = np.argsort(d1, kind="stable")[: min(k, len(samples))]
    cell_h, cell_w = h * s, w * s
    canvas = Image.new(
        "RGB", (3 * pad + 2 * cell_w + label_width, pad + len(order) * (cell_h + pad)), "white"
    )
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row, i in enumerate(order):
        top = pad + row * (cell_h + pad)
        for col, img in enumerate((samples[i], train[idx[i]])):
            tile = Image.fromarray(img).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (pad + col * (cell_w + pad), top))
        text = f"d={d1[i]:.4g}\nsample {i}\ntrain {idx[i]}"
        draw.text((3 * pad + 2 * cell_w, top), text, fill="black", font=font)
    path = os.fspath(path)
    canvas.save(path, format="PNG")
    return path


def memorization_report(
    samples: np.ndarray | jax.Array,
    train: np.ndarray | jax.Array,
    *,
    features_fn: FeaturesFn | None = None,
    features: tuple[np.ndarray, np.ndarray] | None = None,
    num_train_queries: int | None = 5000,
    png_prefix: str | None = None,
    k_pairs: int = 16,
    seed: int = 0,
    **summary_kwargs: Any,
) -> dict[str, dict[str, float]]:
    """Pixel-space (and, with features, feature-space) memorization summaries.

    Args:
      samples: (N, H, W, C) generated images, uint8 or float in [-1, 1].
      train: (M, H, W, C) training images, the same way.
      features_fn: computes the feature space's vectors of both sets (see ``embed``).
      features: or the (N, D) and (M, D) feature vectors of ``samples`` and ``train``,
        already computed (e.g. the Inception features FID computed anyway).
      num_train_queries: training points of the train-to-train reference.
      png_prefix: if given, writes ``<png_prefix>_pixel.png`` (and ``_features.png``)
        from ``closest_pairs_image``.
      k_pairs: pairs shown in those images.
      seed: picks the train-to-train queries.
      **summary_kwargs: passed to ``memorization_summary``.

    Returns:
      ``{'pixel': summary}`` plus ``'features'`` when features are given, each from
      ``memorization_summary`` with k=2 neighbours.

    Raises:
      ValueError: both ``features_fn`` and ``features``, or features whose row counts
        are not those of the images.
    """
    if features_fn is not None and features is not None:
        raise ValueError("pass features_fn or precomputed features, not both")
    spaces: dict[str, Any] = {"pixel": None}
    if features_fn is not None:
        spaces["features"] = features_fn
    if features is not None:
        sample_vec, train_vec = (np.asarray(f, np.float32) for f in features)
        if sample_vec.ndim != 2 or train_vec.ndim != 2 or (
                len(sample_vec), len(train_vec)) != (len(samples), len(train)):
            raise ValueError(f"features of shapes {sample_vec.shape} and {train_vec.shape} "
                             f"do not match {len(samples)} samples and {len(train)} images")
        spaces["features"] = (sample_vec, train_vec)
    report = {}
    for space, fn in spaces.items():
        if isinstance(fn, tuple):
            sample_vec, train_vec = fn
        else:
            sample_vec, train_vec = embed(samples, fn), embed(train, fn)
        idx, dist = nearest_neighbors(sample_vec, train_vec, k=2)
        train_nn = train_nn_distances(train_vec, num_queries=num_train_queries, seed=seed)
        report[space] = memorization_summary(dist, train_nn, **summary_kwargs)
        if png_prefix is not None:
            closest_pairs_image(samples, train, idx, dist, f"{png_prefix}_{space}.png", k=k_pairs)
    return report
