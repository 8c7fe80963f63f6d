"""What the ghost norm's rounding bound costs: ghost-path norms against the reference's.

``dpjax.privacy.ghost._ghost_sq_norm`` adds the worst case of float32 rounding to each
ghost norm, so that positions whose contributions cancel cannot hide a large gradient
(the clip then bounds what is added). This measures how far above the reference norms
(vmap of grad, materialized per-example gradients) that puts the norms of the 'ghost'
clipping path, on the DPDM 'cpu' experiment's UNet (180k parameters, K=1) at its
initial parameters or (``--workdir``) at a trained run's latest checkpoint (the
trainable weights, not the EMA), with the first B real Fashion-MNIST training images.
Per mode:
'auto' (what training uses) and 'ghost' (a ghost norm forced on every kernel, 28 x 28
layers included).

Usage::

    python benchmarks/cpu/ghost_bound.py --batch=16 --modes=auto,ghost \\
        --out=benchmarks/cpu_ghost_bound.json
    python benchmarks/cpu/ghost_bound.py --batch=649 --modes=auto \\
        --workdir=workdirs/dpdm_fmnist_cpu_eps10_360 --out=benchmarks/cpu_ghost_bound.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpjax import data as data_lib
from dpjax import run_config
from dpjax import sample as sample_lib
from dpjax.methods import dpdm
from dpjax.methods.base import DataSpec, Params
from dpjax.privacy import clipping, ghost
from experiments import dpdm_fmnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--modes", default="auto,ghost")
    parser.add_argument("--out", default="")
    parser.add_argument("--workdir", default="", help="a trained 'cpu' run (default: init)")
    args = parser.parse_args()
    cfg = run_config.from_configdict(dpdm_fmnist.get_config("cpu,eps=10"))
    dataset = data_lib.load(cfg.data)
    spec = DataSpec(dataset.image_shape, cfg.data.num_classes)
    method = dpdm.make(cfg.method_args, spec)
    params = method.init(jax.random.PRNGKey(0), spec)
    where = "dpdm_fmnist.py:cpu UNet at init"
    if args.workdir:
        _, state, _, _ = sample_lib.restore_state(args.workdir)
        params = Params(state.trainable, state.frozen)
        where = f"dpdm_fmnist.py:cpu UNet, {args.workdir} step {int(state.step)}"
    b = args.batch
    # As the data pipeline feeds the loss: images in [-1, 1].
    ex = {"image": jnp.asarray(dataset.images[:b], jnp.float32) / 127.5 - 1.0,
          "label": jnp.asarray(dataset.labels[:b])}
    mask, keys = jnp.ones(b, bool), jax.random.split(jax.random.PRNGKey(2), b)
    loss, trainable, frozen = method.loss_per_example, params.trainable, params.frozen

    def reference(t, f, e, m, k):
        return clipping.clipped_grad_sum(loss, t, f, e, m, k, clip_norm=1e9,
                                         microbatch_size=b, impl="vmap").norms

    t0 = time.time()
    ref = np.asarray(jax.jit(reference)(trainable, frozen, ex, mask, keys), np.float64)
    record = {"model": where, "batch": b,
              "reference_seconds": round(time.time() - t0, 1), "modes": {}}
    for mode in args.modes.split(","):
        def norms(t, f, e, m, k, mode=mode):
            return ghost.norms_and_sum(loss, t, f, e, m, k, mode=mode)[2]

        got = np.asarray(jax.jit(norms)(trainable, frozen, ex, mask, keys), np.float64)
        ratio = got / ref
        record["modes"][mode] = {
            "ghost_over_reference_min": float(ratio.min()),
            "ghost_over_reference_median": float(np.median(ratio)),
            "ghost_over_reference_max": float(ratio.max()),
            "ghosted_parameter_fraction": ghost.ghosted_fraction(
                loss, trainable, frozen, ex, mask, keys, mode=mode),
        }
    print(json.dumps(record, indent=2))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
