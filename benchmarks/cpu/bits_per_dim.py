"""Bits per dimension of trained DP-LFlow runs on the first N real test images.

The same computation as ``--mode=eval`` (``report.bits_per_dim_report``: log p(x) of
8-bit images by importance sampling over the latent, ``dpjax.eval.marginal_likelihood``)
on a subset, without re-running the rest of the evaluation: on the 2-core CPU the mode
search costs about 2.5 s per image. Prints and writes one JSON record per run.

Usage::

    python benchmarks/cpu/bits_per_dim.py --images=300 --out=benchmarks/dplflow_bits_per_dim.json \\
        workdirs/dplflow_fmnist_eps1 workdirs/dplflow_fmnist_eps1_per_class
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from dpjax import data as data_lib
from dpjax import sample as sample_lib
from dpjax.eval import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--samples", type=int, default=128, help="importance samples")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    records = {}
    for wd in args.workdirs:
        method, params, _, run_cfg, step = sample_lib.load_trained(wd)
        test = data_lib.load(dataclasses.replace(run_cfg.data, split="test"))
        cfg = report.EvalConfig(bits_per_dim_images=args.images,
                                likelihood_samples=args.samples)  # fmt: skip
        t = time.time()
        rec = report.bits_per_dim_report(method, params, test, cfg)
        rec.update(step=step, seconds=round(time.time() - t, 1),
                   pixel_model=getattr(method.config, "pixel_model", ""))  # fmt: skip
        records[wd] = rec
        print(wd, json.dumps(rec), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
