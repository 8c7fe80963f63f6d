"""Tests for dpjax.eval.memorization: exact copies, chunking, summaries, the PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dpjax.eval import memorization as mem


def _brute_force(q: np.ndarray, r: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.sqrt(((q[:, None, :].astype(np.float64) - r[None].astype(np.float64)) ** 2).sum(-1))
    idx = np.argsort(d, axis=1)[:, :k]
    return idx, np.take_along_axis(d, idx, axis=1)


@pytest.fixture(scope="module")
def copies():
    """Bright uint8 training images (large norms stress cancellation) and samples that
    are noise except for 5 exact copies of known training images."""
    rng = np.random.default_rng(0)
    train = rng.integers(200, 256, (300, 28, 28, 1), dtype=np.uint8)
    samples = rng.integers(200, 256, (40, 28, 28, 1), dtype=np.uint8)
    where, which = np.array([3, 7, 11, 20, 39]), np.array([0, 150, 299, 42, 42])
    samples[where] = train[which]
    return samples, train, where, which


def test_finds_exact_copies(copies):
    samples, train, where, which = copies
    idx, dist = mem.find_nearest(samples, train, k=2, query_chunk=16, reference_chunk=64)
    assert idx.shape == dist.shape == (40, 2)
    np.testing.assert_array_equal(idx[where, 0], which)
    np.testing.assert_array_equal(dist[where, 0], 0.0)  # exact, not ~1e-2 from cancellation
    others = np.setdiff1d(np.arange(40), where)
    assert dist[others, 0].min() > 1.0
    assert np.all(dist[:, 0] <= dist[:, 1])

    # Float [-1, 1] input gives the same neighbours and distances.
    idx_f, dist_f = mem.find_nearest(samples.astype(np.float32) / 127.5 - 1.0, train, k=2)
    np.testing.assert_array_equal(idx_f, idx)
    np.testing.assert_allclose(dist_f, dist, atol=1e-4)


@pytest.mark.parametrize("chunks", [(7, 13), (1, 1), (1000, 1000)])
def test_chunked_equals_brute_force(chunks):
    rng = np.random.default_rng(1)
    q, r = rng.normal(size=(50, 20)), rng.normal(size=(77, 20))
    idx, dist = mem.nearest_neighbors(q, r, k=3, query_chunk=chunks[0], reference_chunk=chunks[1])
    ref_idx, ref_dist = _brute_force(q, r, 3)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-5, atol=1e-5)


def test_leave_one_out_and_train_reference():
    rng = np.random.default_rng(2)
    r = rng.normal(size=(60, 8)).astype(np.float32)
    idx, dist = mem.nearest_neighbors(r, r, k=1, exclude=np.arange(60), reference_chunk=16)
    assert not np.any(idx[:, 0] == np.arange(60))
    d = _brute_force(r, r, 60)[1]
    np.testing.assert_allclose(dist[:, 0], d[:, 1], rtol=1e-5)  # the 2nd is the 1st but self
    loo = mem.train_nn_distances(r, num_queries=None, reference_chunk=16)
    np.testing.assert_allclose(loo, d[:, 1], rtol=1e-5)
    assert mem.train_nn_distances(r, num_queries=10).shape == (10,)
    # Fewer references than re-ranking candidates: self must stay excluded.
    idx, dist = mem.nearest_neighbors(r[:5], r[:5], k=4, exclude=np.arange(5))
    assert not np.any(idx == np.arange(5)[:, None])
    np.testing.assert_allclose(dist, _brute_force(r[:5], r[:5], 5)[1][:, 1:], rtol=1e-5)


def test_feature_space_uses_features_fn_in_batches(copies):
    samples, train, where, which = copies
    seen = []

    def features_fn(images):
        seen.append(images.shape[0])
        assert images.dtype == np.uint8  # passed unchanged
        x = images.astype(np.float32)
        return np.stack([x.mean((1, 2, 3)), x[:, ::4, ::4].reshape(len(x), -1).std(1)], 1)

    feats = mem.embed(train, features_fn, batch_size=128)
    assert feats.shape == (300, 2) and seen == [128, 128, 44]
    idx, dist = mem.find_nearest(samples, train, features_fn=features_fn, k=2)
    np.testing.assert_array_equal(dist[where, 0], 0.0)
    ref_idx, _ = _brute_force(mem.embed(samples, features_fn), feats, 1)
    np.testing.assert_array_equal(idx[:, 0], ref_idx[:, 0])


def test_summary_flags_copies(copies):
    samples, train, where, _ = copies
    _, dist = mem.find_nearest(samples, train, k=2)
    train_nn = mem.train_nn_distances(mem.embed(train), num_queries=None)
    s = mem.memorization_summary(dist, train_nn)
    assert s["num_samples"] == 40 and isinstance(s["num_samples"], int)
    assert s["nn_distance_min"] == 0.0
    assert s["fraction_exact_copies"] == pytest.approx(5 / 40)
    assert s["fraction_ratio_test"] == pytest.approx(5 / 40)  # noise samples: d1 ~ d2
    # Noise samples are as far from the train set as train points are from each other.
    assert s["fraction_below_train_quantile"] == pytest.approx(5 / 40, abs=0.1)
    assert 0.9 < s["median_ratio_to_train"] < 1.1


def test_closest_pairs_png_size(copies, tmp_path):
    samples, train, where, which = copies
    idx, dist = mem.find_nearest(samples, train, k=1)
    path = mem.closest_pairs_image(samples, train, idx, dist, tmp_path / "pairs.png", k=16)
    with Image.open(path) as img:
        s, pad, label_width = 64 // 28, 4, 160
        assert img.mode == "RGB"
        assert img.size == (3 * pad + 2 * 28 * s + label_width, pad + 16 * (28 * s + pad))
        top_row = np.asarray(img)[pad : pad + 28 * s]
    # The closest pair is an exact copy: the sample and the training tile are identical.
    left = top_row[:, pad : pad + 28 * s]
    right = top_row[:, 2 * pad + 28 * s : 2 * pad + 2 * 28 * s]
    np.testing.assert_array_equal(left, right)

    few = mem.closest_pairs_image(samples[:3], train, idx[:3], dist[:3], tmp_path / "few.png",
                                  scale=1)
    with Image.open(few) as img:
        assert img.size == (3 * pad + 2 * 28 + label_width, pad + 3 * (28 + pad))


def test_report_writes_both_spaces(copies, tmp_path):
    samples, train, _, _ = copies
    features_fn = lambda x: x.reshape(len(x), -1)[:, :50].astype(np.float32)
    report = mem.memorization_report(samples, train, features_fn=features_fn,
                                     num_train_queries=100, png_prefix=str(tmp_path / "m"))
    assert set(report) == {"pixel", "features"}
    assert report["pixel"]["fraction_exact_copies"] == pytest.approx(5 / 40)
    assert (tmp_path / "m_pixel.png").exists() and (tmp_path / "m_features.png").exists()
    # Features computed beforehand (as eval does with FID's) give the same report.
    given = mem.memorization_report(samples, train, num_train_queries=100,
                                    features=(features_fn(samples), features_fn(train)))
    assert given == report
    with pytest.raises(ValueError, match="not both"):
        mem.memorization_report(samples, train, features_fn=features_fn,
                                features=(features_fn(samples), features_fn(train)))
    with pytest.raises(ValueError, match="do not match"):
        mem.memorization_report(samples, train,
                                features=(features_fn(samples)[:3], features_fn(train)))


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        mem.embed(np.full((2, 4, 4, 1), 3.0))
    with pytest.raises(ValueError, match="k=5"):
        mem.nearest_neighbors(np.zeros((2, 3)), np.zeros((4, 3)), k=5)
