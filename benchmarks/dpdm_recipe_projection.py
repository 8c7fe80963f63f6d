"""Times the paper's DPDM recipe step (B=4096, K=32) and projects the whole run.

It builds exactly the train step that ``experiments/dpdm_fmnist.py:eps=10`` trains with
(the 1.75M-parameter UNet, K=32, micro-batches of ``--microbatch`` examples, the
calibrated plan), then runs it on real Fashion-MNIST Poisson batches whose real part is
cut to 1 and to 2 micro-batches. The loop over micro-batches stops at the last real one,
so the difference of the two timings is the cost of one micro-batch, and

    time per logical step = (expected batch / microbatch) * t_microbatch + fixed cost.

Usage::

    python benchmarks/dpdm_recipe_projection.py --microbatch=8 --out=benchmarks/dpdm_recipe_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpjax import data as data_lib  # noqa: E402
from dpjax import run_config  # noqa: E402
from dpjax.methods import get_method_module  # noqa: E402
from dpjax.methods.base import DataSpec, count_params  # noqa: E402
from dpjax.optim import make_optimizer  # noqa: E402
from dpjax.privacy.dp_step import make_train_step  # noqa: E402
from dpjax.privacy.plan import make_plan  # noqa: E402
from dpjax.privacy.sampling import PoissonSampler  # noqa: E402
from dpjax.randomness import Streams  # noqa: E402
from dpjax.state import TrainState  # noqa: E402
from experiments import dpdm_fmnist  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--microbatch", type=int, default=8)
    parser.add_argument("--eps", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    config = dpdm_fmnist.get_config(f"eps={args.eps},microbatch={args.microbatch}")
    cfg = run_config.from_configdict(config)
    dataset = data_lib.load(cfg.data)
    spec = DataSpec(dataset.image_shape, cfg.data.num_classes)
    method = get_method_module("dpdm").make(cfg.method_args, spec)
    plan = make_plan(
        num_examples=len(dataset),
        batch_size=cfg.dp.batch_size,
        delta=cfg.dp.delta,
        clip_norm=cfg.dp.clip_norm,
        epochs=cfg.dp.epochs,
        epsilon=cfg.dp.epsilon,
    )
    streams = Streams.from_seed(0)
    params = method.init(streams.init, spec)
    opt = make_optimizer(cfg.optim)
    m = cfg.dp.microbatch_size
    step = make_train_step(method, opt, plan, microbatch_size=m, ema_rate=0.999)
    images, labels = jnp.asarray(dataset.images), jnp.asarray(dataset.labels)
    batch = PoissonSampler(plan.num_examples, plan.sampling_rate, 0, multiple=m).batch(0)

    def run(num_mb: int) -> float:
        n = num_mb * m
        mask = np.zeros_like(batch.mask)
        mask[:n] = True
        state = TrainState.create(
            jax.tree_util.tree_map(jnp.copy, params.trainable), {}, opt.init(params.trainable)
        )
        t = time.perf_counter()
        state, metrics = step(state, images, labels, batch.indices, mask, n, streams)
        jax.block_until_ready(metrics)
        return time.perf_counter() - t

    t0 = time.perf_counter()
    run(1)
    compile_s = time.perf_counter() - t0
    t1 = min(run(1) for _ in range(args.repeats))
    t2 = min(run(2) for _ in range(args.repeats))
    per_mb = max(t2 - t1, 1e-9)
    fixed = max(t1 - per_mb, 0.0)
    step_s = plan.expected_batch_size / m * per_mb + fixed
    result = {
        "command": "python benchmarks/dpdm_recipe_projection.py " + " ".join(sys.argv[1:]),
        "device": str(jax.devices()[0]),
        "platform": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "params": count_params(params.trainable),
        "K": cfg.method_args.noise_multiplicity,
        "microbatch": m,
        "expected_batch": plan.expected_batch_size,
        "steps": plan.steps,
        "sigma": plan.noise_multiplier,
        "compile_plus_first_step_s": compile_s,
        "seconds_per_microbatch": per_mb,
        "fixed_seconds_per_step": fixed,
        "projected_seconds_per_step": step_s,
        "projected_hours_whole_recipe": step_s * plan.steps / 3600,
        "example_copies_per_second": m * cfg.method_args.noise_multiplicity / per_mb,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
