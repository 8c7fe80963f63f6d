"""Inception features and FID statistics of a run's real splits, into the FID cache.

``--mode=eval`` computes these itself; this script lets a second process compute them
beside it (each split once for every run on the same data), resumably: killed, it goes
on where it stopped at the next call. On the 2-core CPU the 60k train split takes about
three hours.

  python benchmarks/cpu/fid_reference.py --workdir workdirs/dpdm_fmnist_cpu_eps10 \\
      --splits train,test
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from dpjax import data as data_lib
from dpjax import sample as sample_lib
from dpjax.eval import feature_cache, report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a dpjax run (its data section is used)")
    p.add_argument("--splits", default="train,test")
    p.add_argument("--batch", type=int, default=None,
                   help="Inception batch; default the one the run's eval uses "
                   "(report.fid_batch_size; the cached features are keyed on it)")
    args = p.parse_args(argv)
    run_cfg = sample_lib.load_run_config(args.workdir)
    data_cfg = run_cfg.data
    batch = args.batch or report.fid_batch_size(report.eval_config(run_cfg.eval))
    for split in args.splits.split(","):
        images = data_lib.load(dataclasses.replace(data_cfg, split=split)).images
        name = report.reference_name(data_cfg, split, len(images))
        t = time.time()
        feature_cache.reference_stats(name, images, batch_size=batch, log=print)
        print(f"{name}: statistics ready in {time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
