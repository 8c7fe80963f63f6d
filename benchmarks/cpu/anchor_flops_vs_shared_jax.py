"""FLOPs of ../shared/bench/unet_jax.py's plain step, to set beside dpjax's anchor plain step.

Tracing only (no compile, no device): ``benchmarks/flop_count.py`` on the anchor's own
JAX plain step at 256 x 1 and 32 x 32. Compare with the plain entries of
``benchmarks/cpu_dp_step_flops_anchor.json`` (results.md, the notes under the H100 table).

    PYTHONPATH=. python benchmarks/cpu/anchor_flops_vs_shared_jax.py [PATH_TO_unet_jax.py]
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import optax

from benchmarks import flop_count

DEFAULT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "bench",
                       "unet_jax.py")


def main(path: str = DEFAULT) -> None:
    """Prints one JSON line per case: the plain step's matmul and other GFLOPs."""
    spec = importlib.util.spec_from_file_location("unet_jax", path)
    anchor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(anchor)
    key = jax.random.PRNGKey(0)
    for batch, k in ((256, 1), (32, 32)):
        x = jnp.zeros((batch, 28, 28, 1))
        params = jax.eval_shape(anchor.model.init, key, x[:1], jnp.ones((1,)))
        opt = optax.adam(3e-4)
        plain, _ = anchor.make_steps(k, batch, opt)
        count = flop_count.count_flops(plain, params, jax.eval_shape(opt.init, params), x, key)
        print(json.dumps({"case": f"{batch}x{k}", "step": "shared/bench unet_jax.py plain",
                          "matmul_gflop": round(count.matmul_flops / 1e9, 1),
                          "other_gflop": round(count.other_flops / 1e9, 1)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
