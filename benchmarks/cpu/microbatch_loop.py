"""Times ``clipping.clipped_grad_sum`` with the micro-batches looped vs unrolled.

XLA:CPU rewrites convolutions into its fast (Eigen) layout only in the entry
computation, so backward convolutions inside a ``fori_loop`` body take a slow path;
``clipped_grad_sum`` therefore unrolls up to
``dpjax.privacy.microbatch_loop.MAX_UNROLLED_MICROBATCHES`` micro-batches on the CPU.
This script measures both forms on the f=4 KL autoencoder of
``experiments/ldm_fmnist.py`` (random weights, random 28x28 images), clipped (a DP step's
per-example path) and unclipped (public training), and checks that the sums agree.

Usage::

    python benchmarks/cpu/microbatch_loop.py --batch=64 --microbatch=16 \\
        --out=benchmarks/cpu_microbatch_loop.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.methods import autoencoder, base
from dpjax.privacy import clipping
from experiments import ldm_fmnist


def _time(fn, *args) -> tuple[float, float, object]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return compile_s, time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--microbatch", type=int, default=16)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    method = autoencoder.make(ldm_fmnist.PAIR.ae, base.DataSpec((28, 28, 1), 10))
    weights = jax.tree_util.tree_map(jnp.asarray, method.random_weights(np.random.default_rng(0)))
    n = args.batch
    rng = np.random.default_rng(1)
    examples = {
        "image": jnp.asarray(rng.uniform(-1, 1, (n, 28, 28, 1)), jnp.float32),
        "label": jnp.zeros((n,), jnp.int32),
    }
    mask = jnp.ones((n,), bool)
    keys = jax.random.split(jax.random.key(0), n)
    rows = []
    for clip in (1.0, None):
        sums = {}
        for unroll in (True, False):
            fn = jax.jit(
                lambda w, e, mk, k, clip=clip, unroll=unroll: clipping.clipped_grad_sum(
                    method.loss_per_example, w, {}, e, mk, k, clip_norm=clip,
                    microbatch_size=args.microbatch, unroll=unroll,
                )
            )  # fmt: skip
            compile_s, run_s, out = _time(fn, weights, examples, mask, keys)
            sums[unroll] = out.grad_sum
            row = {"clip": clip, "unroll": unroll, "compile_s": compile_s, "step_s": run_s}
            rows.append(row)
            print(json.dumps(row), flush=True)
        # Over the whole gradient: single leaves such as the biases of convolutions that a
        # GroupNorm follows have an exactly zero gradient in exact arithmetic, so their
        # (rounding-noise) sums differ arbitrarily in relative terms.
        a, b = (jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(sums[u])])
                for u in (True, False))  # fmt: skip
        diff = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        rows.append({"clip": clip, "relative_difference_of_the_sum": diff})
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": "python benchmarks/cpu/microbatch_loop.py "
        f"--batch={args.batch} --microbatch={args.microbatch}",
        "model": "experiments/ldm_fmnist.py autoencoder (f=4, ch=32, ch_mult=(1, 2, 2))",
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
