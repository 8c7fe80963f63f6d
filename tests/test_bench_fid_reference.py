"""benchmarks/cpu/fid_reference.py: a run's real splits into the cache eval reads.

Inception is replaced by a fixed projection of the pixels; what is tested is that the
script writes the statistics and features under the names ``--mode=eval`` looks up,
so the eval that follows embeds no real image.
"""

import os

import numpy as np

from dpjax import train
from dpjax.eval import fid, report
from experiments import toy_fake
from tests import bench_scripts


def _load():
    return bench_scripts.load("benchmarks/cpu/fid_reference.py", "bench_fid_reference")


def test_eval_after_the_script_embeds_only_the_samples(tmp_path, monkeypatch):
    wd = str(tmp_path / "run")
    train.train(toy_fake.get_config("smoke"), wd, log=lambda *_: None)
    seen = []
    proj = np.random.default_rng(0).normal(size=(8 * 8 * 1, 6)).astype(np.float32)

    def features(images, batch_size=200, **kwargs):
        seen.append(len(images))
        x = np.asarray(images, np.float32).reshape(len(images), -1)
        return x[:, : proj.shape[0]] @ proj

    monkeypatch.setattr(fid, "inception_features", features)
    monkeypatch.setenv("DPJAX_CACHE", str(tmp_path / "cache"))
    # The eval's fid_batch is read from the run (8 below): the same cache key.
    with monkeypatch.context() as m:
        m.setattr(report, "eval_config", lambda section: report.EvalConfig(fid_batch=8))
        _load().main(["--workdir", wd, "--splits", "train,test"])
    stats = sorted(os.listdir(tmp_path / "cache" / "fid_stats"))
    assert [s.split("-")[2] for s in stats] == ["test", "train"]
    n_real = sum(seen)
    seen.clear()
    cfg = report.EvalConfig(num_samples=12, sample_batch=12, fid=True, fid_batch=8,
                            downstream=False)
    result = report.evaluate_workdir(wd, cfg, log=lambda *_: None)
    assert seen == [12] and n_real > 12
    assert set(result["fid"]) == {"train", "test"}
