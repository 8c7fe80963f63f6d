"""benchmarks/cpu/fid_small.py: each run's FID against the test and the train images.

The Inception network is replaced by a fixed random projection of the pixels (the
script's arithmetic, caching and JSON are what is tested; the port is tested in
test_fid.py), and the real images by two fixed random sets.
"""

import json
import os

import numpy as np

from tests import bench_scripts


def _load():
    return bench_scripts.load("benchmarks/cpu/fid_small.py", "bench_fid_small")


def test_samples_equal_to_the_train_images_have_zero_fid_against_train(tmp_path, monkeypatch):
    fid_small = _load()
    rng = np.random.default_rng(0)
    real = {s: rng.integers(0, 256, (40, 4, 4, 1), dtype=np.uint8) for s in ("train", "test")}
    projection = rng.normal(size=(16, 6))
    calls = []

    def features(images, batch_size):
        calls.append(len(images))
        return np.asarray(images, np.float64).reshape(len(images), -1) @ projection

    monkeypatch.setattr(fid_small, "_real", lambda split, n: real[split][:n])
    monkeypatch.setattr(fid_small.fid, "inception_features", features)
    run = tmp_path / "runs" / "copycat"
    os.makedirs(run / "samples" / "step_7")
    np.savez(run / "samples" / "step_7" / "samples.npz", images=real["train"])
    out, cache = tmp_path / "fid.json", tmp_path / "cache"
    args = ["--n=30", f"--out={out}", f"--cache={cache}", str(run)]
    fid_small.main(args)

    runs = json.loads(out.read_text())["runs"]
    floor, copy = runs["real train images (the floor at this N)"], runs["copycat"]
    assert copy["step"] == 7 and copy["fid_vs_train"] < 1e-6
    assert copy["fid"] == floor["fid"] > 1.0  # vs test: the same images as the floor
    assert "fid_vs_train" not in floor
    assert calls == [30, 30, 30]
    fid_small.main(args)  # every feature set is read back from the cache
    assert calls == [30, 30, 30]
