"""Counts the plain and fast DP steps' FLOPs as an earlier commit of dpjax built them.

The H100 numbers in results.md ("The DP step on one H100") were measured with the code
of commit 23bfd90, whose fast path formed convolution patches with
``lax.conv_general_dilated_patches``. This script checks that commit out in a temporary
git worktree, loads that commit's ``benchmarks/dp_step.py`` with today's
``benchmarks/flop_count.py``, and prints one JSON line per (model, case, variant), so
that the arithmetic behind those timings can be compared with today's
(``benchmarks/dp_step.py --flops-only``).

Usage (from the repository root; traces only, a few minutes on a CPU)::

    python benchmarks/cpu/flops_at_commit.py --commit 23bfd90 \
        > benchmarks/cpu_dp_step_flops_23bfd90.jsonl
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", default="23bfd90")
    parser.add_argument("--models", default="dpdm,anchor")
    parser.add_argument("--cases", default="256x1,32x32")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="dpjax_at_commit_")
    tree = os.path.join(tmp, "tree")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "-q", "--detach", tree, args.commit],
                   check=True)  # fmt: skip
    try:
        shutil.copy(os.path.join(ROOT, "benchmarks", "flop_count.py"), tree + "/benchmarks/")
        sys.path[:0] = [tree, os.path.join(tree, "benchmarks")]
        import optax

        bench = importlib.import_module("dp_step")
        flop_count = importlib.import_module("flop_count")
        streams_mod = importlib.import_module("dpjax.randomness")
        for model in args.models.split(","):
            for case in args.cases.split(","):
                b, k = (int(v) for v in case.split("x"))
                streams = streams_mod.Streams.from_seed(0)
                method = bench.make_method(model, k, False)
                trainable = bench.init_params(method, streams)
                optimizer = optax.adam(3e-4)
                for variant in ("plain", "fast"):
                    step = bench.make_step(variant, method, optimizer, bench.make_plan_for(b), b)
                    state = bench.fresh_state(trainable, optimizer)
                    batch = bench._batch_args(bench.synthetic_batch(b), streams)
                    count = flop_count.count_flops(step, state, *batch)
                    record = {"commit": args.commit, "model": model, "case": case}
                    print(json.dumps({**record, "variant": variant, **count.as_dict()}), flush=True)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
