"""FID of CPU-sized runs at a small sample size, beside the real-data floor at that size.

On the 2-core CPU the FID Inception network runs at about 3.3 images/s, so FID with
60k samples against the full train statistics (the papers' protocol, ``--mode=eval``)
takes hours per run. This script computes, with the library's FID code
(``dpjax.eval.fid``: the same network, preprocessing and Frechet distance), FID between
the first N cached samples of each run (``--mode=eval`` writes them under
``WORKDIR/samples/step_S/samples.npz``) and the first N images of the Fashion-MNIST
test split, and the same statistic for N real *training* images against those test
images: the floor that a perfect generator would reach at this N. Each run also gets
``fid_vs_train``, against the first N training images (the papers compare with the
train statistics; the floor is the same number, by symmetry). FID is biased
upwards at small N (the 2048 x 2048 covariance is estimated from N points), so these
numbers rank runs measured at the same N; they are not comparable with published FID.

Features are cached per (workdir, step, N) in ``--cache``, so a stopped run resumes.

Usage::

    python benchmarks/cpu/fid_small.py --n=1000 --out=benchmarks/cpu_fid_1k.json \\
        workdirs/dpldm_fmnist_quick_eps10 workdirs/dplflow_fmnist_eps10 ...
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

from dpjax.data import idx
from dpjax.data.config import DataConfig
from dpjax.eval import fid


def _real(split: str, n: int) -> np.ndarray:
    """The first ``n`` Fashion-MNIST images of ``split``, read by the library's loader."""
    return idx.load_idx(DataConfig(source="idx", name="fashion_mnist", split=split, limit=n)).images


def _latest_samples(workdir: str) -> tuple[str, int]:
    found = glob.glob(os.path.join(workdir, "samples", "step_*", "samples.npz"))
    if not found:
        raise SystemExit(f"{workdir}: no cached samples; run --mode=eval on it first.")
    steps = {int(p.split("step_")[-1].split(os.sep)[0]): p for p in found}
    step = max(steps)
    return steps[step], step


def _features(key: str, images: np.ndarray, cache: str, log) -> np.ndarray:
    path = os.path.join(cache, key.replace("/", "_") + ".npy")
    if os.path.exists(path):
        return np.load(path)
    t0 = time.perf_counter()
    feats = fid.inception_features(images, batch_size=50)
    np.save(path, feats)
    log(f"{key}: {len(images)} images, {time.perf_counter() - t0:.0f} s")
    return feats


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--out", default="benchmarks/cpu_fid_small.json")
    parser.add_argument("--cache", default="workdirs/fid_small_cache")
    args = parser.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    test = fid.compute_stats(_features(f"test_{args.n}", _real("test", args.n), args.cache, log))
    result: dict = {
        "n": args.n,
        "reference": f"fid: the Fashion-MNIST test split, first {args.n} images; "
        f"fid_vs_train: the train split, first {args.n} images",
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "runs": {},
    }

    train = _features(f"train_{args.n}", _real("train", args.n), args.cache, log)
    train_stats = fid.compute_stats(train)

    def record(name: str, feats: np.ndarray, extra: dict, vs_train: bool = True) -> None:
        stats = fid.compute_stats(feats)
        row = {"fid": round(float(fid.fid_from_stats(*stats, *test)), 2), **extra}
        if vs_train:
            row["fid_vs_train"] = round(float(fid.fid_from_stats(*stats, *train_stats)), 2)
        result["runs"][name] = row
        log(f"{name}: {row}")
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    record("real train images (the floor at this N)", train, {}, vs_train=False)
    for wd in args.workdirs:
        path, step = _latest_samples(wd)
        with np.load(path) as z:
            images = z["images"][: args.n]
        if len(images) < args.n:
            raise SystemExit(f"{wd}: {len(images)} cached samples, fewer than --n={args.n}.")
        name = os.path.basename(os.path.normpath(wd))
        feats = _features(f"{name}_step{step}_{args.n}", images, args.cache, log)
        record(name, feats, {"step": step, "samples": path})
    return result


if __name__ == "__main__":
    main()
